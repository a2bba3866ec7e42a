// The stream layout of sgsc::pack (each group's codes at its own width, byte-aligned groups), shared by
// csrc/bitpack.cpp (pack, unpack, unpack_dequantize) and csrc/unpack_linear.cpp (the product computed
// from the stream). The layout with a worked example is in sgsc.ops.pack's docstring.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "isa.h"
#include "stable.h"

namespace sgsc {

// Codes per parallel task of one group: a multiple of 8, and 8 codes of any width fill whole bytes, so every
// task starts on a byte boundary and owns its bytes.
constexpr int64_t kChunk = 1 << 14;
static_assert(kChunk % 8 == 0, "tasks must start on a byte boundary");

// ---- layout: widths and byte offsets of every group ----------------------------------------

struct Layout {
  int64_t groups = 0;
  int64_t group_len = 0;          // L, codes per group
  int64_t chunks_per_group = 0;   // tasks per group
  std::vector<int> width;         // (G,) validated to [0, 32]
  std::vector<int64_t> offset;    // (G + 1,) byte offset of each group's stream; offset[G] = total

  int64_t tasks() const { return groups * chunks_per_group; }
  int64_t group(int64_t task) const { return task / chunks_per_group; }
  int64_t first_code(int64_t task) const { return (task % chunks_per_group) * kChunk; }
  int64_t codes(int64_t task) const { return std::min(kChunk, group_len - first_code(task)); }
  // Byte where a task's codes start: exact, since first_code is a multiple of 8.
  int64_t first_byte(int64_t task) const {
    return offset[group(task)] + first_code(task) * width[group(task)] / 8;
  }
  int64_t grain() const {
    // Keep tiny inputs on one thread, where waking the pool costs more than the work.
    return std::max<int64_t>(1, kChunk / std::max<int64_t>(1, std::min(group_len, kChunk)));
  }
};

#if defined(SGSC_X86_DISPATCH) && defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#include <immintrin.h>
// GCC 12's AVX-512 permute, multishift and extract intrinsics pass an unset vector as their unused merge
// source, which it then warns about where they are inlined (as csrc/packed_q8_dot.h notes).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define SGSC_UNPACK_VBMI 1
#define SGSC_VBMI_TARGET "avx512f,avx512bw,avx512vbmi,avx2"

// AVX-512 VBMI unpack of widths 1..8, 64 codes per step (their 8W bytes, a byte boundary): vpermb gives
// each 64-bit lane the W bytes of its 8 codes, vpmultishiftqb puts code j's bits at the bottom of byte j
// (shift j*W), and a mask, an xor and a subtraction of the sign bit sign-extend the bytes, which widen to
// int32 16 at a time. Masked loads and stores touch nothing past the stream's end or the span's last
// code, so a span needs no tail. On Zen 4 this is about 6x fewer instructions per code than bitpack.cpp's
// AVX2 unpack. Inline, so that csrc/unpack_linear.cpp decodes a short row without a call.
struct VbmiUnpackTables {
  alignas(64) uint8_t permute[64];
  alignas(64) uint8_t shift[64];
  constexpr explicit VbmiUnpackTables(int width) : permute(), shift() {
    for (int i = 0; i < 64; ++i) {
      // bytes past 8W never reach a code
      permute[i] = static_cast<uint8_t>(std::min((i / 8) * width + i % 8, 63));
      shift[i] = static_cast<uint8_t>((i % 8) * width);
    }
  }
};

inline constexpr VbmiUnpackTables kVbmiUnpackTables[9] = {
    VbmiUnpackTables(1), VbmiUnpackTables(1), VbmiUnpackTables(2), VbmiUnpackTables(3), VbmiUnpackTables(4),
    VbmiUnpackTables(5), VbmiUnpackTables(6), VbmiUnpackTables(7), VbmiUnpackTables(8)};

// Whether unpack_vbmi may run: AVX-512 allowed (SGSC_CPU_ISA) and VBMI present.
bool vbmi_unpack_enabled();

// Codes 16Q..16Q+15 of a step's 64 bytes, widened to int32; only the first `left` are written.
template <int Q>
__attribute__((target(SGSC_VBMI_TARGET), always_inline)) inline void vbmi_store_quarter(__m512i codes, int32_t* dst,
                                                                                       int64_t left) {
  if (left <= 0) return;
  const __mmask16 mask = left >= 16 ? __mmask16{0xFFFF} : static_cast<__mmask16>((1u << left) - 1);
  _mm512_mask_storeu_epi32(dst + 16 * Q, mask, _mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(codes, Q)));
}

// n codes of width 1..8 from src (a byte boundary) into dst, sign-extended; no read reaches end.
__attribute__((target(SGSC_VBMI_TARGET), always_inline)) inline void unpack_vbmi(int width, const uint8_t* src,
                                                                                const uint8_t* end, int32_t* dst,
                                                                                int64_t n) {
  const __m512i permute = _mm512_load_si512(kVbmiUnpackTables[width].permute);
  const __m512i shift = _mm512_load_si512(kVbmiUnpackTables[width].shift);
  const __m512i low = _mm512_set1_epi8(static_cast<char>((1 << width) - 1));
  const __m512i sign = _mm512_set1_epi8(static_cast<char>(1 << (width - 1)));
  for (int64_t i = 0; i < n; i += 64, src += 8 * width, dst += 64) {
    const int64_t avail = std::min<int64_t>(8 * width, end - src);
    const __m512i bytes = _mm512_maskz_loadu_epi8(avail >= 64 ? ~__mmask64{0} : (__mmask64{1} << avail) - 1, src);
    const __m512i fields = _mm512_multishift_epi64_epi8(shift, _mm512_permutexvar_epi8(permute, bytes));
    const __m512i codes = _mm512_sub_epi8(_mm512_xor_si512(_mm512_and_si512(fields, low), sign), sign);
    vbmi_store_quarter<0>(codes, dst, n - i);
    vbmi_store_quarter<1>(codes, dst, n - i - 16);
    vbmi_store_quarter<2>(codes, dst, n - i - 32);
    vbmi_store_quarter<3>(codes, dst, n - i - 48);
  }
}
#endif

// The checked layout of unpack_dequantize's arguments: a uint8 stream of groups*rows_per_group rows of
// row_len codes, one width and one float32 scale per group; errors name op.
Layout unpack_dequantize_layout(const Tensor& packed, const Tensor& widths, const Tensor& scales,
                                int64_t rows_per_group, int64_t row_len, const char* op);

// n codes of the given width from src (a byte boundary) into dst, sign-extended; no read reaches end.
void unpack_codes(int width, const uint8_t* src, const uint8_t* end, int32_t* dst, int64_t n);

}  // namespace sgsc
