// CPU kernels of sgsc::pack, sgsc::unpack and sgsc::unpack_dequantize(_out): integer codes stored with
// a bit width per group, and (the packed runtime's) their float32 values code * scale[group].
//
// The schemas live in sgsc/ops/library.py, the layout with a worked example in sgsc.ops.pack's docstring. In short:
// group g's stream starts at byte offset[g] = sum over h < g of ceil(width[h] * L / 8); code i of
// the group fills bits [i*w, (i+1)*w) of that stream with the low w bits of its two's complement,
// least significant bit first (bit k of the stream is bit k % 8 of byte k / 8).
//
// Work is split into tasks of kChunk codes of one group. kChunk is a multiple of 8, and 8 codes of
// any width fill a whole number of bytes, so every task starts on a byte boundary and owns its own
// bytes: tasks run in parallel without sharing a byte. Width is a template parameter of the inner
// loops (one instantiation per width 1..32), so every shift and mask is a constant. On CPUs with
// AVX2, unpack of widths up to 25 bits runs 8 codes per instruction sequence (unpack_avx2, chosen
// at run time by isa.h's active_isa()); the portable loops finish the tails. With AVX-512 VBMI, widths
// up to 8 run 64 codes per step with no tail (unpack_vbmi, csrc/bitpack.h).

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "bitpack.h"
#include "buffers.h"
#include "isa.h"
#include "stable.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace sgsc {
namespace {

// The w-bit field in the low bits of x, read as two's complement.
template <int W>
SGSC_ALWAYS_INLINE int32_t sign_extend(uint64_t x) {
  return static_cast<int32_t>(static_cast<int64_t>(x << (64 - W)) >> (64 - W));
}

Layout make_layout(const Tensor& widths, int64_t group_len, const char* op) {
  auto dtype = widths.scalar_type();
  SGSC_CHECK_TYPE(dtype == kByte || dtype == kInt || dtype == kLong, "sgsc.", op,
                  ": widths must be uint8, int32 or int64, got ", dtype);
  SGSC_CHECK_VALUE(widths.dim() == 1 && widths.numel() > 0, "sgsc.", op,
                   ": widths must be a non-empty 1-D tensor of per-group bit widths, got shape ",
                   widths.sizes());
  Layout layout;
  layout.groups = widths.numel();
  layout.group_len = group_len;
  layout.chunks_per_group = std::max<int64_t>(1, (group_len + kChunk - 1) / kChunk);
  layout.width.resize(layout.groups);
  layout.offset.resize(layout.groups + 1);
  // uint8 widths (the packed runtime's) are read in place; other dtypes through one int64 copy
  std::vector<int64_t> w(layout.groups);
  if (dtype == kByte && widths.is_contiguous()) {
    std::copy_n(widths.const_data_ptr<uint8_t>(), layout.groups, w.begin());
  } else {
    Tensor w64 = as_contiguous(to_dtype(widths, kLong));
    std::copy_n(w64.const_data_ptr<int64_t>(), layout.groups, w.begin());
  }
  layout.offset[0] = 0;
  for (int64_t g = 0; g < layout.groups; ++g) {
    // the width limit and the stream size are sgsc.ops.spec's MAX_WIDTH and stream_bytes
    SGSC_CHECK_VALUE(w[g] >= 0 && w[g] <= 32, "sgsc.", op, ": widths must be in [0, 32], got ", w[g],
                     " at group ", g);
    layout.width[g] = static_cast<int>(w[g]);
    layout.offset[g + 1] = layout.offset[g] + (w[g] * group_len + 7) / 8;
  }
  return layout;
}

// ---- unpack --------------------------------------------------------------------------------

// n codes of width W starting at src (a byte boundary). 8 codes fill exactly W bytes, so the main
// loop reads 8 codes per step with unaligned 64-bit loads; it stops while a load could still reach
// past `end`, the end of the whole buffer, and the tail reads byte by byte.
template <int W>
SGSC_ALWAYS_INLINE void unpack_span(const uint8_t* src, const uint8_t* end, int32_t* dst, int64_t n) {
  int64_t i = 0;
  if constexpr (W <= 8) {
    // All 8 codes lie in one 64-bit word.
    for (; i + 8 <= n && end - src >= 8; i += 8, src += W, dst += 8) {
      uint64_t x = load_le64(src);
      for (int j = 0; j < 8; ++j) dst[j] = sign_extend<W>(x >> (j * W));
    }
  } else {
    for (; i + 8 <= n && end - src >= W + 8; i += 8, src += W, dst += 8) {
      for (int j = 0; j < 8; ++j) dst[j] = sign_extend<W>(load_le64(src + j * W / 8) >> (j * W % 8));
    }
  }
  for (int64_t bit = 0; i < n; ++i, bit += W) {
    uint64_t x = 0;
    const int64_t first = bit / 8, last = (bit + W - 1) / 8;
    for (int64_t k = last; k >= first; --k) x = (x << 8) | src[k];
    *dst++ = sign_extend<W>(x >> (bit % 8));
  }
}

#if defined(SGSC_X86_DISPATCH) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define SGSC_BITPACK_AVX2 1

// AVX2 unpack of 8 codes per step, for widths 1..kAvx2MaxWidth (a code then lies in the 4 bytes
// starting at its first byte). The 8 codes of a step fill W bytes: codes 0-3 are read from a 16-byte
// load at the step's first byte, codes 4-7 from one at byte 4W/8. A byte shuffle gathers each
// code's 4 bytes into its 32-bit lane; shifting left by (32 - W - first bit) puts the field at the
// top of the lane, and an arithmetic shift right by 32 - W brings it down sign-extended.
// Returns how many codes it unpacked; the caller finishes the rest.
constexpr int kAvx2MaxWidth = 25;

// The byte shuffle and left shifts of width W, built at compile time (a packed layer's weight is unpacked a
// group of a few dozen codes at a time, where building them on every call cost more than the unpack).
template <int W>
struct Avx2UnpackTables {
  alignas(32) int8_t shuffle[32];
  alignas(32) int32_t left[8];
  constexpr Avx2UnpackTables() : shuffle(), left() {
    const int high_half = 4 * W / 8;  // byte where the second 16-byte load starts
    for (int j = 0; j < 8; ++j) {
      const int bit = j * W - (j < 4 ? 0 : 8 * high_half);  // first bit of code j within its half
      for (int k = 0; k < 4; ++k) shuffle[4 * j + k] = static_cast<int8_t>(bit / 8 + k);
      left[j] = 32 - W - bit % 8;
    }
  }
};

template <int W>
constexpr Avx2UnpackTables<W> kAvx2UnpackTables{};

template <int W>
__attribute__((target("avx2"))) int64_t unpack_avx2(const uint8_t* src, const uint8_t* end, int32_t* dst, int64_t n) {
  constexpr int high_half = 4 * W / 8;
  const __m256i shuffle_v = _mm256_load_si256(reinterpret_cast<const __m256i*>(kAvx2UnpackTables<W>.shuffle));
  const __m256i left_v = _mm256_load_si256(reinterpret_cast<const __m256i*>(kAvx2UnpackTables<W>.left));
  const __m128i right = _mm_cvtsi32_si128(32 - W);
  int64_t i = 0;
  for (; i + 8 <= n && end - src >= high_half + 16; i += 8, src += W, dst += 8) {
    const __m256i bytes = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(src + high_half),
                                              reinterpret_cast<const __m128i*>(src));
    const __m256i fields = _mm256_sllv_epi32(_mm256_shuffle_epi8(bytes, shuffle_v), left_v);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_sra_epi32(fields, right));
  }
  return i;
}

#endif

#ifdef SGSC_UNPACK_VBMI
// unpack_vbmi (csrc/bitpack.h) at a width fixed at compile time, for the unpack table.
template <int W>
__attribute__((target(SGSC_VBMI_TARGET))) void unpack_vbmi_fixed(const uint8_t* src, const uint8_t* end, int32_t* dst,
                                                                  int64_t n) {
  unpack_vbmi(W, src, end, dst, n);
}
#endif

using UnpackSpanFn = void (*)(const uint8_t*, const uint8_t*, int32_t*, int64_t);

template <int W>
void unpack_span_fn(const uint8_t* src, const uint8_t* end, int32_t* dst, int64_t n) {
#ifdef SGSC_UNPACK_VBMI
  if constexpr (W <= 8) {
    if (vbmi_unpack_enabled()) return unpack_vbmi_fixed<W>(src, end, dst, n);
  }
#endif
#ifdef SGSC_BITPACK_AVX2
  if constexpr (W <= kAvx2MaxWidth) {
    if (isa_at_least(Isa::kAvx2)) {
      const int64_t done = unpack_avx2<W>(src, end, dst, n);  // done is a multiple of 8: W whole bytes each
      src += done / 8 * W;
      dst += done;
      n -= done;
    }
  }
#endif
  unpack_span<W>(src, end, dst, n);
}

void unpack_zeros(const uint8_t*, const uint8_t*, int32_t* dst, int64_t n) { std::fill(dst, dst + n, 0); }

template <int... W>
constexpr std::array<UnpackSpanFn, 33> make_unpack_table(std::integer_sequence<int, W...>) {
  return {unpack_zeros, unpack_span_fn<W + 1>...};
}

// unpack_table[w] unpacks codes of width w.
constexpr auto unpack_table = make_unpack_table(std::make_integer_sequence<int, 32>{});

// ---- pack ----------------------------------------------------------------------------------

// Packs 8 codes of width W into exactly W bytes at dst. The fields are ORed into four 64-bit words;
// with W a constant every shift and word index is one, so the words stay in registers.
template <int W>
SGSC_ALWAYS_INLINE void pack8(const int32_t* src, uint8_t* dst) {
  constexpr uint64_t mask = (uint64_t{1} << W) - 1;
  uint64_t words[4] = {0, 0, 0, 0};
  for (int j = 0; j < 8; ++j) {
    const uint64_t field = static_cast<uint64_t>(static_cast<uint32_t>(src[j])) & mask;
    const int bit = j * W;
    words[bit / 64] |= field << (bit % 64);
    if (bit % 64 + W > 64) words[bit / 64 + 1] |= field >> (64 - bit % 64);  // straddles two words
  }
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  std::memcpy(dst, words, W);
#else
  for (int k = 0; k < W; ++k) dst[k] = static_cast<uint8_t>(words[k / 8] >> (8 * (k % 8)));
#endif
}

// n codes of width W written from dst (a byte boundary) on, 8 at a time; the last step pads its
// missing codes with zeros and writes only the ceil(n * W / 8) bytes that belong to the span.
template <int W>
void pack_span(const int32_t* src, uint8_t* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8, src += 8, dst += W) pack8<W>(src, dst);
  if (i < n) {
    int32_t tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::copy(src, src + (n - i), tail);
    uint8_t bytes[W];
    pack8<W>(tail, bytes);
    std::copy(bytes, bytes + ((n - i) * W + 7) / 8, dst);
  }
}

using PackSpanFn = void (*)(const int32_t*, uint8_t*, int64_t);

void pack_nothing(const int32_t*, uint8_t*, int64_t) {}

template <int... W>
constexpr std::array<PackSpanFn, 33> make_pack_table(std::integer_sequence<int, W...>) {
  return {pack_nothing, pack_span<W + 1>...};
}

// pack_table[w] packs codes of width w.
constexpr auto pack_table = make_pack_table(std::make_integer_sequence<int, 32>{});

// True when every code of the span lies in [lo, hi]. Branch-free min/max, so it vectorises.
SGSC_ALWAYS_INLINE bool span_in_range_body(const int32_t* src, int64_t n, int32_t lo, int32_t hi) {
  int32_t mn = std::numeric_limits<int32_t>::max(), mx = std::numeric_limits<int32_t>::min();
  for (int64_t i = 0; i < n; ++i) {
    mn = std::min(mn, src[i]);
    mx = std::max(mx, src[i]);
  }
  return n == 0 || (mn >= lo && mx <= hi);
}
SGSC_CLONES(bool, span_in_range, (const int32_t* src, int64_t n, int32_t lo, int32_t hi), (src, n, lo, hi))

std::pair<int32_t, int32_t> code_range(int width) {
  if (width == 0) return {0, 0};
  if (width == 32) return {std::numeric_limits<int32_t>::min(), std::numeric_limits<int32_t>::max()};
  return {-(int32_t{1} << (width - 1)), (int32_t{1} << (width - 1)) - 1};
}

// ---- ops -----------------------------------------------------------------------------------

void check_ints(const Tensor& ints, int64_t groups) {
  SGSC_CHECK_TYPE(ints.scalar_type() == kInt, "sgsc.pack: ints must be int32, got ", ints.scalar_type());
  SGSC_CHECK_VALUE(ints.dim() >= 1, "sgsc.pack: ints must have at least one dimension");
  SGSC_CHECK_VALUE(ints.size(0) % groups == 0, "sgsc.pack: ", groups,
                   " groups do not divide ints' first dimension ", ints.size(0));
}

Tensor pack_cpu(const Tensor& ints, const Tensor& widths) {
  SGSC_CHECK_VALUE(widths.dim() == 1 && widths.numel() > 0,
                   "sgsc.pack: widths must be a non-empty 1-D tensor, got shape ", widths.sizes());
  check_ints(ints, widths.numel());
  const Layout layout = make_layout(widths, ints.numel() / widths.numel(), "pack");
  auto codes = as_contiguous(ints);
  auto packed = empty_output({layout.offset[layout.groups]}, kByte, ints);
  if (codes.numel() == 0) return packed;
  const int32_t* src = codes.const_data_ptr<int32_t>();
  uint8_t* dst = packed.mutable_data_ptr<uint8_t>();

  // Tasks that met an out-of-range code; reported after the loop, lowest group first.
  std::vector<uint8_t> bad(layout.tasks(), 0);
  parallel_for(0, layout.tasks(), layout.grain(), [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t g = layout.group(task), n = layout.codes(task);
      const int w = layout.width[g];
      const int32_t* task_src = src + g * layout.group_len + layout.first_code(task);
      const auto [lo, hi] = code_range(w);
      if (w < 32 && !span_in_range(task_src, n, lo, hi)) {
        bad[task] = 1;
        continue;
      }
      pack_table[w](task_src, dst + layout.first_byte(task), n);
    }
  });

  auto first_bad = std::find(bad.begin(), bad.end(), 1);
  if (first_bad != bad.end()) {
    const int64_t task = first_bad - bad.begin(), g = layout.group(task);
    const int w = layout.width[g];
    const auto [lo, hi] = code_range(w);
    const int32_t* group_src = src + g * layout.group_len;
    for (int64_t i = layout.first_code(task);; ++i) {
      SGSC_CHECK_VALUE(group_src[i] >= lo && group_src[i] <= hi, "sgsc.pack: group ", g, " (width ", w,
                       ") holds code ", group_src[i], " at position ", i, ", outside the range [", lo,
                       ", ", hi, "] of its width");
    }
  }
  return packed;
}

// Checks the arguments of unpack (or of op, which reads the same stream) and returns the layout they describe.
Layout unpack_layout(const Tensor& packed, const Tensor& widths, int64_t rows_per_group, int64_t row_len,
                     const char* op = "unpack") {
  SGSC_CHECK_TYPE(packed.scalar_type() == kByte, "sgsc.", op, ": packed must be uint8, got ", packed.scalar_type());
  SGSC_CHECK_VALUE(packed.dim() == 1, "sgsc.", op, ": packed must be 1-D, got shape ", packed.sizes());
  SGSC_CHECK_VALUE(rows_per_group >= 0 && row_len >= 0, "sgsc.", op,
                   ": rows_per_group and row_len must be >= 0, got ", rows_per_group, " and ", row_len);
  Layout layout = make_layout(widths, rows_per_group * row_len, op);
  SGSC_CHECK_VALUE(packed.numel() == layout.offset[layout.groups], "sgsc.", op, ": packed must hold ",
                   layout.offset[layout.groups], " bytes for these widths and shape, got ", packed.numel());
  return layout;
}

void unpack_into(const Tensor& packed, const Layout& layout, Tensor& out) {
  if (out.numel() == 0) return;
  auto stream = as_contiguous(packed);
  const uint8_t* src = stream.const_data_ptr<uint8_t>();
  const uint8_t* end = src + stream.numel();
  int32_t* dst = out.mutable_data_ptr<int32_t>();
  parallel_for(0, layout.tasks(), layout.grain(), [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t g = layout.group(task);
      unpack_table[layout.width[g]](src + layout.first_byte(task), end,
                                    dst + g * layout.group_len + layout.first_code(task), layout.codes(task));
    }
  });
}

Tensor unpack_cpu(const Tensor& packed, const Tensor& widths, int64_t rows_per_group,
                  int64_t row_len) {
  const Layout layout = unpack_layout(packed, widths, rows_per_group, row_len);
  auto out = empty_output({layout.groups * rows_per_group, row_len}, kInt, packed);
  unpack_into(packed, layout, out);
  return out;
}

void unpack_out_cpu(const Tensor& packed, const Tensor& widths, int64_t rows_per_group, int64_t row_len,
                    Tensor out) {
  const Layout layout = unpack_layout(packed, widths, rows_per_group, row_len);
  SGSC_CHECK_VALUE(out.scalar_type() == kInt && out.numel() == layout.groups * layout.group_len,
                   "sgsc.unpack: out must be int32 with ", layout.groups * layout.group_len, " elements, got ",
                   out.scalar_type(), " of shape ", out.sizes());
  SGSC_CHECK_VALUE(out.is_contiguous(), "sgsc.unpack: out must be contiguous");
  unpack_into(packed, layout, out);
}

// ---- unpack_dequantize: code * scale[group] as float32, straight from the stream ---------------

// dst[i] = code[i] * scale, vectorised for each ISA (the loop is most of a small weight's dequantization).
SGSC_ALWAYS_INLINE void scale_codes_body(const int32_t* codes, int64_t n, float scale, float* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(codes[i]) * scale;
}
SGSC_CLONES(void, scale_codes, (const int32_t* codes, int64_t n, float scale, float* dst), (codes, n, scale, dst))

// Each task unpacks its codes into a per-thread int32 buffer of kChunk codes (64 KiB, in cache) and
// writes them to out as floats: the int32 codes are never a tensor of their own, so the packed
// runtime's workspace is the float weight alone. Each value is float(code) * scale rounded once, as
// the float runtime computes it (exact for power-of-two scales and codes of up to 24 bits).
void unpack_dequantize_into(const Tensor& packed, const Layout& layout, const Tensor& scales, float* out) {
  if (layout.groups * layout.group_len == 0) return;
  auto stream = as_contiguous(packed);
  const uint8_t* src = stream.const_data_ptr<uint8_t>();
  const uint8_t* end = src + stream.numel();
  const float* scale = scales.const_data_ptr<float>();
  parallel_for(0, layout.tasks(), layout.grain(), [&](int64_t first, int64_t last) {
    thread_local std::vector<int32_t> codes;
    codes.resize(kChunk);
    for (int64_t task = first; task < last; ++task) {
      const int64_t g = layout.group(task), n = layout.codes(task);
      unpack_table[layout.width[g]](src + layout.first_byte(task), end, codes.data(), n);
      scale_codes(codes.data(), n, scale[g], out + g * layout.group_len + layout.first_code(task));
    }
  });
}

Tensor unpack_dequantize_cpu(const Tensor& packed, const Tensor& widths, const Tensor& scales,
                             int64_t rows_per_group, int64_t row_len) {
  const Layout layout =
      unpack_dequantize_layout(packed, widths, scales, rows_per_group, row_len, "unpack_dequantize");
  auto out = empty({layout.groups * rows_per_group, row_len}, kFloat, packed);
  unpack_dequantize_into(packed, layout, scales, out.mutable_data_ptr<float>());
  return out;
}

void unpack_dequantize_out_cpu(const Tensor& packed, const Tensor& widths, const Tensor& scales,
                               int64_t rows_per_group, int64_t row_len, Tensor out) {
  const Layout layout =
      unpack_dequantize_layout(packed, widths, scales, rows_per_group, row_len, "unpack_dequantize_out");
  SGSC_CHECK_VALUE(out.scalar_type() == kFloat && out.numel() == layout.groups * layout.group_len,
                   "sgsc.unpack_dequantize: out must be float32 with ", layout.groups * layout.group_len,
                   " elements, got ", out.scalar_type(), " of shape ", out.sizes());
  SGSC_CHECK_VALUE(out.is_contiguous(), "sgsc.unpack_dequantize: out must be contiguous");
  unpack_dequantize_into(packed, layout, scales, out.mutable_data_ptr<float>());
}

}  // namespace

Layout unpack_dequantize_layout(const Tensor& packed, const Tensor& widths, const Tensor& scales,
                                int64_t rows_per_group, int64_t row_len, const char* op) {
  Layout layout = unpack_layout(packed, widths, rows_per_group, row_len, op);
  SGSC_CHECK_TYPE(scales.scalar_type() == kFloat, "sgsc.", op, ": scales must be float32, got ",
                  scales.scalar_type());
  SGSC_CHECK_VALUE(scales.dim() == 1 && scales.numel() == layout.groups && scales.is_contiguous(), "sgsc.", op,
                   ": scales must be contiguous with one scale per group (", layout.groups, "), got shape ",
                   scales.sizes());
  return layout;
}

#ifdef SGSC_UNPACK_VBMI
bool vbmi_unpack_enabled() {
  static const bool enabled = isa_at_least(Isa::kAvx512) && __builtin_cpu_supports("avx512vbmi") &&
                              __builtin_cpu_supports("avx512bw");
  return enabled;
}
#endif

void unpack_codes(int width, const uint8_t* src, const uint8_t* end, int32_t* dst, int64_t n) {
  unpack_table[width](src, end, dst, n);
}

STABLE_TORCH_LIBRARY_IMPL(sgsc, CPU, m) {
  m.impl("pack", TORCH_BOX(&pack_cpu));
  m.impl("unpack", TORCH_BOX(&unpack_cpu));
  m.impl("unpack_out", TORCH_BOX(&unpack_out_cpu));
  m.impl("unpack_dequantize", TORCH_BOX(&unpack_dequantize_cpu));
  m.impl("unpack_dequantize_out", TORCH_BOX(&unpack_dequantize_out_cpu));
}

}  // namespace sgsc
