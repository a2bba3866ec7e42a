// CPU kernels of sgsc::packed_linear and sgsc::packed_dequantize(_out): y = x W^T computed from
// integer codes bit-packed at each group's width, never materialising W for small batches.
//
// The schemas and the layout's documentation (with a worked example) live in sgsc/ops/packed.py;
// sgsc.ops.reference.packed_dequantize is the twin that reads it in plain PyTorch. In short:
//
// * Rows are cut into tiles of 8. A tile holds one or more segments: a run of columns [k0, k1)
//   stored at one width W. A word of 32 bits holds PER = 32 / W codes (W <= 16; one raw int32 code
//   otherwise) in slots of SLOT = 32 / PER bits, code j of the word in bits [j*SLOT, j*SLOT + W).
//   Word t of the tile's 8 rows are 8 consecutive int32: one 32-byte load feeds all 8 rows.
// * W <= 16 stores u = code + 2^(W-1) (unsigned, so no sign extension in the inner loop); the
//   offset comes back as one subtraction per row: sum_k code*x = sum_k u*x - 2^(W-1) * sum_k x.
//   W > 16 stores the signed code itself (one per word, offset 0).
// * Slot j < PER-1 is converted in place, as u * 2^(j*SLOT) (exact: W significant bits), and x is
//   pre-scaled by 2^(-j*SLOT) once per call, so extracting a code costs one AND; the top slot is
//   brought down by one logical shift (its u may set the sign bit). Scaling x by powers of two is
//   exact unless x * 2^(-j*SLOT) is subnormal (|x| < 2^-98 for SLOT*(PER-1) <= 28).
// * Output-row groups: every row has its own scale (row_scale), applied once per output. Input-
//   column groups: segments are the column groups, their scale (seg_scale) folds into the
//   pre-scaled x, and row_scale is 1.
//
// Every batch runs the fused kernel: per tile, 8 rows x MB batch rows of fp32 accumulators, the
// batch cut into chunks of MB = 8, 4, 2, 1 rows (only those four widths are compiled: the compile
// time grows with every instance). Each tile's words (8 rows x K codes, 16 KiB at 4 bits and K = 4096)
// stay in L1 while every chunk of a panel of kPanelRows batch rows passes over them, so the weights
// are read from memory once per panel, and the codes are never written out as floats. (An earlier
// path dequantized 512-row blocks for at::mm: 64 MiB written and read back per call for a 4096^2
// layer, plus a parallel region per block; on the shared 2-core host it ran at 0.44-0.9x float32.)
// Tiles go to threads in small blocks from a shared counter (steal_blocks): on a loaded machine a
// thread that lost its core does less of the work, and nobody waits for it at a barrier.
//
// The inner loops use GCC vector extensions, compiled twice: for AVX2+FMA (chosen at run time with
// __builtin_cpu_supports, as csrc/bitpack.cpp does for its AVX2 unpack) and for the baseline ISA.
// isa.h's target_clones list has no FMA clone, and without FMA the avx2 clone would split every
// multiply-add in two. An AVX-512 host runs the AVX2+FMA code.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <memory>
#include <thread>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "isa.h"

// The 32-byte vector types never cross a call boundary between ISAs (every helper is inlined into
// its ISA's entry point), so GCC's note that their by-value ABI differs without AVX does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace sgsc {
namespace {

constexpr int kLanes = 8;            // rows per tile: one 256-bit vector of fp32 accumulators
constexpr int kMaxChunk = 8;         // batch rows per pass of the fused kernel (8 x 8 accumulators: 8 of 16 ymm)
constexpr int64_t kPanelRows = 64;   // batch rows whose pre-scaled x (1 MiB at K = 4096) one parallel region serves
constexpr int64_t kStealTiles = 4;   // tiles (or prescale rows) a thread takes from the shared counter at a time

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8v __attribute__((vector_size(32)));
typedef uint32_t u8v __attribute__((vector_size(32)));

// Codes per 32-bit word at width w (sgsc.ops.packed.codes_per_word mirrors it).
inline int codes_per_word(int64_t width) { return width <= 16 ? static_cast<int>(32 / width) : 1; }

// The layout's tensors, checked once per call.
struct Plan {
  int64_t out_features = 0, in_features = 0, segments = 0, tiles = 0;
  const uint32_t* words = nullptr;
  const int64_t* seg = nullptr;  // (S, 3): k0, k1, width
  const float* seg_scale = nullptr;
  const int64_t* tile_seg = nullptr;  // (TS, 2): segment, word offset
  const int64_t* tile_ptr = nullptr;  // (T + 1,)
  const int32_t* rows = nullptr;      // (T, 8): output row of each lane, -1 for padding
  const float* row_scale = nullptr;   // (T, 8)
  std::vector<int64_t> xs_offset;     // (S + 1,): where each segment's pre-scaled x starts, in codes
  // Per segment: slot j's factor on x, seg_scale * 2^(-j * SLOT) (the top slot's 2^0), at [32 * s + j];
  // 2^(W-1) * seg_scale, the offset term's factor on the sum of x; and the first segment over the
  // same columns (output groups: every width spans [0, K), so one sum of x serves them all).
  std::vector<float> slot_factor;
  std::vector<double> offset_factor;
  std::vector<int64_t> same_columns_as;
  bool covers_all_columns = true;     // every tile's segments run end to end over [0, K)
  bool covers_all_rows = false;       // every output row is one tile lane: the kernel writes all of y
  std::vector<uint8_t> row_in_tile;   // (N,): 1 where a tile lane names the row

  int64_t k0(int64_t s) const { return seg[3 * s]; }
  int64_t len(int64_t s) const { return seg[3 * s + 1] - seg[3 * s]; }
  int64_t width(int64_t s) const { return seg[3 * s + 2]; }
  int64_t words_of(int64_t s) const { return (len(s) + codes_per_word(width(s)) - 1) / codes_per_word(width(s)); }
};

void check_tensor(const at::Tensor& t, at::ScalarType dtype, int64_t dim, const char* name, const char* op) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "sgsc.", op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, "sgsc.", op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), "sgsc.", op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK_VALUE(t.is_contiguous(), "sgsc.", op, ": ", name, " must be contiguous");
}

void set_segment_factors(Plan& p) {
  const int64_t S = p.segments;
  p.slot_factor.assign(32 * S, 0.0f);
  p.offset_factor.assign(S, 0.0);
  p.same_columns_as.assign(S, 0);
  for (int64_t s = 0; s < S; ++s) {
    const int per = codes_per_word(p.width(s)), slot = 32 / per;
    for (int j = 0; j < per; ++j)
      p.slot_factor[32 * s + j] = p.seg_scale[s] * (j == per - 1 ? 1.0f : std::ldexp(1.0f, -j * slot));
    p.offset_factor[s] = per == 1 ? 0.0 : std::ldexp(1.0, static_cast<int>(p.width(s)) - 1) * p.seg_scale[s];
    p.same_columns_as[s] = s > 0 && p.seg[3 * s] == p.seg[3 * (s - 1)] && p.seg[3 * s + 1] == p.seg[3 * (s - 1) + 1]
                               ? p.same_columns_as[s - 1]
                               : s;
  }
}

Plan make_plan(const at::Tensor& words, const at::Tensor& seg_table, const at::Tensor& seg_scale,
               const at::Tensor& tile_table, const at::Tensor& tile_ptr, const at::Tensor& rows,
               const at::Tensor& row_scale, int64_t out_features, int64_t in_features, const char* op) {
  check_tensor(words, at::kInt, 1, "words", op);
  check_tensor(seg_table, at::kLong, 2, "seg_table", op);
  check_tensor(seg_scale, at::kFloat, 1, "seg_scale", op);
  check_tensor(tile_table, at::kLong, 2, "tile_table", op);
  check_tensor(tile_ptr, at::kLong, 1, "tile_ptr", op);
  check_tensor(rows, at::kInt, 2, "rows", op);
  check_tensor(row_scale, at::kFloat, 2, "row_scale", op);
  TORCH_CHECK_VALUE(out_features >= 0 && in_features >= 0, "sgsc.", op,
                    ": out_features and in_features must be >= 0, got ", out_features, " and ", in_features);
  const int64_t S = seg_table.size(0), T = rows.size(0), TS = tile_table.size(0);
  TORCH_CHECK_VALUE(seg_table.size(1) == 3 && seg_scale.size(0) == S, "sgsc.", op,
                    ": seg_table must be (S, 3) and seg_scale (S,), got ", seg_table.sizes(), " and ", seg_scale.sizes());
  TORCH_CHECK_VALUE(rows.size(1) == kLanes && row_scale.sizes() == rows.sizes(), "sgsc.", op,
                    ": rows and row_scale must be (T, 8), got ", rows.sizes(), " and ", row_scale.sizes());
  TORCH_CHECK_VALUE(tile_table.size(1) == 2 && tile_ptr.size(0) == T + 1, "sgsc.", op,
                    ": tile_table must be (TS, 2) and tile_ptr (T + 1,), got ", tile_table.sizes(), " and ",
                    tile_ptr.sizes());
  Plan p;
  p.out_features = out_features;
  p.in_features = in_features;
  p.segments = S;
  p.tiles = T;
  p.words = reinterpret_cast<const uint32_t*>(words.data_ptr<int32_t>());
  p.seg = seg_table.data_ptr<int64_t>();
  p.seg_scale = seg_scale.data_ptr<float>();
  p.tile_seg = tile_table.data_ptr<int64_t>();
  p.tile_ptr = tile_ptr.data_ptr<int64_t>();
  p.rows = rows.data_ptr<int32_t>();
  p.row_scale = row_scale.data_ptr<float>();
  // Every index the kernels follow is checked here, so a corrupt layout is an error, never a wild read.
  p.xs_offset.assign(S + 1, 0);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(p.width(s) >= 1 && p.width(s) <= 32 && p.k0(s) >= 0 && p.k0(s) <= p.seg[3 * s + 1] &&
                          p.seg[3 * s + 1] <= in_features,
                      "sgsc.", op, ": seg_table row ", s, " = [", p.k0(s), ", ", p.seg[3 * s + 1], ", ", p.width(s),
                      "] is not [k0, k1, width] with 0 <= k0 <= k1 <= ", in_features, " and width in [1, 32]");
    p.xs_offset[s + 1] = p.xs_offset[s] + p.words_of(s) * codes_per_word(p.width(s));
  }
  set_segment_factors(p);
  TORCH_CHECK_VALUE(T == 0 || (p.tile_ptr[0] == 0 && p.tile_ptr[T] == TS), "sgsc.", op,
                    ": tile_ptr must run from 0 to the ", TS, " rows of tile_table");
  std::vector<uint8_t>& seen = p.row_in_tile;
  seen.assign(out_features, 0);
  int64_t covered_rows = 0;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK_VALUE(p.tile_ptr[t] <= p.tile_ptr[t + 1], "sgsc.", op, ": tile_ptr must be non-decreasing, it falls at tile ", t);
    int64_t next_column = 0;  // the segments cover [0, K) exactly when each starts where the last ended
    for (int64_t i = p.tile_ptr[t]; i < p.tile_ptr[t + 1]; ++i) {
      const int64_t s = p.tile_seg[2 * i], offset = p.tile_seg[2 * i + 1];
      TORCH_CHECK_VALUE(s >= 0 && s < S, "sgsc.", op, ": tile_table row ", i, " names segment ", s, " of ", S);
      TORCH_CHECK_VALUE(offset >= 0 && offset + kLanes * p.words_of(s) <= words.numel(), "sgsc.", op,
                        ": tile_table row ", i, " reads words past the end of words (", words.numel(), ")");
      next_column = p.k0(s) == next_column ? p.seg[3 * s + 1] : -1;
    }
    p.covers_all_columns = p.covers_all_columns && next_column == in_features;
    for (int r = 0; r < kLanes; ++r) {
      const int32_t row = p.rows[kLanes * t + r];
      TORCH_CHECK_VALUE(row >= -1 && row < out_features, "sgsc.", op, ": rows[", t, ", ", r, "] = ", row,
                        " is not an output row (or -1) of ", out_features);
      if (row >= 0) {
        TORCH_CHECK_VALUE(!seen[row], "sgsc.", op, ": output row ", row, " appears in two tile lanes");
        seen[row] = 1;
        ++covered_rows;
      }
    }
  }
  p.covers_all_rows = covered_rows == out_features;
  return p;
}

// ---- fused kernel: 8 rows x MB batch rows per tile --------------------------------------

SGSC_ALWAYS_INLINE u8v load8(const uint32_t* p) {
  u8v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Slot J of 8 words as floats: u * 2^(J*SLOT) in place (x carries 2^(-J*SLOT)), the top slot shifted down.
template <int PER, int J>
SGSC_ALWAYS_INLINE f8 slot_in_place(u8v v) {
  if constexpr (PER == 1) {
    return __builtin_convertvector((i8v)v, f8);  // a raw signed code
  } else if constexpr (J == PER - 1) {
    return __builtin_convertvector((i8v)(v >> (J * (32 / PER))), f8);
  } else {
    constexpr uint32_t mask = ((uint32_t{1} << (32 / PER)) - 1) << (J * (32 / PER));
    return __builtin_convertvector((i8v)(v & mask), f8);
  }
}

// Slots J.. of one word times their x, into accumulator set J % A (unrolled: every shift and mask
// is a constant).
template <int PER, int MB, int A, int J>
SGSC_ALWAYS_INLINE void multiply_slots(u8v v, const float* x, f8 (&part)[A][MB]) {
  if constexpr (J < PER) {
    const f8 code = slot_in_place<PER, J>(v);
    for (int m = 0; m < MB; ++m) part[J % A][m] += code * x[J * MB + m];
    multiply_slots<PER, MB, A, J + 1>(v, x, part);
  }
}

// acc[m] += sum over the segment's codes of u * xs, for one tile's 8 rows. xs is the segment's
// pre-scaled x, batch-row-minor: xs[(t * PER + j) * MB + m]. A accumulator sets hide the FMA
// latency when MB alone gives too few independent chains.
template <int PER, int MB>
SGSC_ALWAYS_INLINE void segment_dot(const uint32_t* words, int64_t n_words, const float* xs, f8* acc) {
  constexpr int A = MB >= 4 ? 1 : 4 / MB;
  f8 part[A][MB];
  for (int a = 0; a < A; ++a)
    for (int m = 0; m < MB; ++m) part[a][m] = f8{};
  for (int64_t t = 0; t < n_words; ++t) {
    multiply_slots<PER, MB, A, 0>(load8(words + kLanes * t), xs + t * PER * MB, part);
  }
  for (int m = 0; m < MB; ++m) {
    f8 sum = part[0][m];
    for (int a = 1; a < A; ++a) sum += part[a][m];
    acc[m] += sum;
  }
}

struct FusedArgs {
  const Plan* plan;
  const float* xs;       // pre-scaled x of this batch chunk: segment s at xs_offset[s] * MB
  const float* offsets;  // (S, MB): 2^(W-1) * sum of the segment's scaled x, subtracted per segment
  float* y;              // output row of the chunk's first batch row
  int64_t ldy;           // out_features
  const float* bias;     // (N,) or nullptr
};

template <int MB>
SGSC_ALWAYS_INLINE void fused_tiles_body(const FusedArgs& a, int64_t first, int64_t last) {
  const Plan& p = *a.plan;
  for (int64_t t = first; t < last; ++t) {
    f8 acc[MB];
    for (int m = 0; m < MB; ++m) acc[m] = f8{};
    for (int64_t i = p.tile_ptr[t]; i < p.tile_ptr[t + 1]; ++i) {
      const int64_t s = p.tile_seg[2 * i];
      const uint32_t* w = p.words + p.tile_seg[2 * i + 1];
      const float* xs = a.xs + p.xs_offset[s] * MB;
      const int64_t n = p.words_of(s);
      switch (codes_per_word(p.width(s))) {
        case 32: segment_dot<32, MB>(w, n, xs, acc); break;
        case 16: segment_dot<16, MB>(w, n, xs, acc); break;
        case 10: segment_dot<10, MB>(w, n, xs, acc); break;
        case 8: segment_dot<8, MB>(w, n, xs, acc); break;
        case 6: segment_dot<6, MB>(w, n, xs, acc); break;
        case 5: segment_dot<5, MB>(w, n, xs, acc); break;
        case 4: segment_dot<4, MB>(w, n, xs, acc); break;
        case 3: segment_dot<3, MB>(w, n, xs, acc); break;
        case 2: segment_dot<2, MB>(w, n, xs, acc); break;
        default: segment_dot<1, MB>(w, n, xs, acc); break;
      }
      for (int m = 0; m < MB; ++m) acc[m] -= a.offsets[s * MB + m];
    }
    for (int r = 0; r < kLanes; ++r) {
      const int32_t row = p.rows[kLanes * t + r];
      if (row < 0) continue;
      const float scale = p.row_scale[kLanes * t + r], b = a.bias ? a.bias[row] : 0.0f;
      for (int m = 0; m < MB; ++m) a.y[m * a.ldy + row] = acc[m][r] * scale + b;
    }
  }
}

using FusedFn = void (*)(const FusedArgs&, int64_t, int64_t);

template <int MB>
void fused_tiles_portable(const FusedArgs& a, int64_t first, int64_t last) {
  fused_tiles_body<MB>(a, first, last);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(SGSC_NO_MULTIVERSION)
#define SGSC_PACKED_AVX2 1
template <int MB>
__attribute__((target("avx2,fma"))) void fused_tiles_avx2(const FusedArgs& a, int64_t first, int64_t last) {
  fused_tiles_body<MB>(a, first, last);
}

bool cpu_has_avx2_fma() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return has;
}
#endif

// fused_kernel(mb) runs the fused kernel for a chunk of mb in {1, 2, 4, 8} batch rows.
FusedFn fused_kernel(int64_t mb) {
  static const std::array<FusedFn, 4> table = [] {
#ifdef SGSC_PACKED_AVX2
    if (cpu_has_avx2_fma())
      return std::array<FusedFn, 4>{fused_tiles_avx2<1>, fused_tiles_avx2<2>, fused_tiles_avx2<4>, fused_tiles_avx2<8>};
#endif
    return std::array<FusedFn, 4>{fused_tiles_portable<1>, fused_tiles_portable<2>, fused_tiles_portable<4>,
                                  fused_tiles_portable<8>};
  }();
  return table[mb == 8 ? 3 : mb == 4 ? 2 : mb == 2 ? 1 : 0];
}

// Segment s's pre-scaled x of MB batch rows (x0: the first, rows ld floats apart), batch-row-minor:
// dst[i * MB + m] = x[m][k0 + i] * factor[i % PER], zeros past the segment's end (where the words hold
// zero codes too). Writing MB floats at a time keeps the stores sequential.
template <int MB>
void prescale_rows(const Plan& p, int64_t s, const float* x0, int64_t ld, float* dst) {
  const int per = codes_per_word(p.width(s));
  const int64_t len = p.len(s), full_words = len / per, n = p.xs_offset[s + 1] - p.xs_offset[s];
  const float* factor = p.slot_factor.data() + 32 * s;
  x0 += p.k0(s);
  for (int64_t w = 0; w < full_words; ++w)
    for (int j = 0; j < per; ++j) {
      const int64_t i = w * per + j;
      for (int m = 0; m < MB; ++m) dst[i * MB + m] = x0[m * ld + i] * factor[j];
    }
  for (int64_t i = full_words * per; i < n; ++i)
    for (int m = 0; m < MB; ++m) dst[i * MB + m] = i < len ? x0[m * ld + i] * factor[i % per] : 0.0f;
}

void prescale_chunk(const Plan& p, int64_t s, const float* x0, int64_t mb, float* dst) {
  switch (mb) {
    case 8: return prescale_rows<8>(p, s, x0, p.in_features, dst);
    case 4: return prescale_rows<4>(p, s, x0, p.in_features, dst);
    case 2: return prescale_rows<2>(p, s, x0, p.in_features, dst);
    default: return prescale_rows<1>(p, s, x0, p.in_features, dst);
  }
}

// Sum of segment s's columns of one batch row, in double so that the offset term adds no rounding
// error worth counting; four partial sums, so the adds do not wait on each other.
double column_sum(const Plan& p, int64_t s, const float* xm) {
  double sum[4] = {0.0, 0.0, 0.0, 0.0};
  xm += p.k0(s);
  for (int64_t i = 0, len = p.len(s); i < len; ++i) sum[i & 3] += xm[i];
  return (sum[0] + sum[1]) + (sum[2] + sum[3]);
}

// Runs body(first, last) over [0, items) in blocks of kStealTiles, taken from a shared counter by the
// calling thread and by helper tasks on ATen's inter-op pool. The call returns once every block is
// done, never waiting for a helper to start or finish idle: with at::parallel_for, whose end is a
// barrier, a helper that had lost its core to another process held every batch-1 call until the
// scheduler gave it back (8 ms instead of 1.5 ms on the loaded 2-core host). A helper that starts
// late finds the counter past the end and touches nothing but the shared counters it co-owns.
template <typename Body>
void steal_blocks(int64_t items, int64_t work_per_item, const Body& body) {
  // About 64K multiply-adds per thread at least: tiny layers stay on one thread, where a helper costs more.
  const int64_t threads =
      std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, items * work_per_item / (1 << 16)));
  if (threads <= 1 || at::in_parallel_region()) return body(0, items);
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  const Body* work = &body;  // dereferenced only by a thread holding a block, i.e. before this call returns
  auto run = [counters, items, work] {
    for (int64_t first = counters->next.fetch_add(kStealTiles); first < items;
         first = counters->next.fetch_add(kStealTiles)) {
      const int64_t last = std::min(items, first + kStealTiles);
      (*work)(first, last);
      counters->done.fetch_add(last - first, std::memory_order_release);
    }
  };
  for (int64_t h = 1; h < threads; ++h) at::launch(run);
  run();
  while (counters->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

// Scratch of up to kScratchFloats floats kept by each calling thread from one call to the next: a
// small layer's call then allocates nothing (fresh pages of a new buffer cost more than its product).
// Larger panels take a buffer of their own, freed on return, so what stays resident is bounded.
constexpr int64_t kScratchFloats = 1 << 18;  // 1 MiB per thread that calls the op

float* scratch(std::vector<float>& own, int64_t floats) {
  thread_local std::vector<float> kept;
  std::vector<float>& buffer = floats <= kScratchFloats ? kept : own;
  if (static_cast<int64_t>(buffer.size()) < floats) buffer.resize(floats);
  return buffer.data();
}

void fused_linear(const Plan& p, const float* x, int64_t M, float* y, const float* bias) {
  const int64_t xs_per_row = p.xs_offset[p.segments], panel = std::min(M, kPanelRows);
  // One buffer: the pre-scaled x (xs_per_row * panel floats), the offset terms (S * panel) and, from an
  // even float index (8-byte aligned), the sums of x (S * panel doubles, two floats each).
  const int64_t sums_at = ((xs_per_row + p.segments) * panel + 1) / 2 * 2;
  std::vector<float> own;
  float* const xs = scratch(own, sums_at + 2 * p.segments * panel);
  float* const offsets = xs + xs_per_row * panel;
  double* const sums = reinterpret_cast<double*>(xs + sums_at);
  std::vector<int64_t> chunk_start;
  for (int64_t p0 = 0; p0 < M; p0 += panel) {
    const int64_t rows = std::min(panel, M - p0);
    // Chunks of 8 rows, the rest as 4 + 2 + 1: each chunk size is one compiled instance.
    chunk_start.assign(1, 0);
    for (int64_t size = kMaxChunk; size >= 1; size /= 2)
      while (rows - chunk_start.back() >= size) chunk_start.push_back(chunk_start.back() + size);
    const int64_t chunks = static_cast<int64_t>(chunk_start.size()) - 1;
    // The offset term 2^(W-1) * sum of the segment's scaled x (seg_scale is a power of two: scaling the
    // sum equals summing scaled x), one sum per distinct column range and batch row.
    steal_blocks(p.segments * rows, p.in_features, [&](int64_t first, int64_t last) {
      for (int64_t item = first; item < last; ++item) {
        const int64_t s = item / rows, r = item % rows;
        if (p.same_columns_as[s] == s) sums[s * rows + r] = column_sum(p, s, x + (p0 + r) * p.in_features);
      }
    });
    // Chunk c's pre-scaled x starts at xs[xs_per_row * m0]: segment s at xs_offset[s] * mb, row-minor.
    steal_blocks(p.segments * chunks, p.in_features * kMaxChunk, [&](int64_t first, int64_t last) {
      for (int64_t item = first; item < last; ++item) {
        const int64_t s = item / chunks, c = item % chunks;
        const int64_t m0 = chunk_start[c], mb = chunk_start[c + 1] - m0;
        prescale_chunk(p, s, x + (p0 + m0) * p.in_features, mb, xs + xs_per_row * m0 + p.xs_offset[s] * mb);
        for (int64_t m = 0; m < mb; ++m)
          offsets[p.segments * m0 + s * mb + m] = static_cast<float>(p.offset_factor[s] * sums[p.same_columns_as[s] * rows + m0 + m]);
      }
    });
    steal_blocks(p.tiles, kLanes * p.in_features * rows, [&](int64_t first, int64_t last) {
      for (int64_t c = 0; c < chunks; ++c) {  // the tiles' words stay in cache from one chunk to the next
        const int64_t m0 = chunk_start[c], mb = chunk_start[c + 1] - m0;
        const FusedArgs args{&p, xs + xs_per_row * m0, offsets + p.segments * m0,
                             y + (p0 + m0) * p.out_features, p.out_features, bias};
        fused_kernel(mb)(args, first, last);
      }
    });
  }
}

// ---- dequantization: one tile's codes times their scales, into a float buffer ------------

// Column k of a segment's 8 lanes, code * scale.
template <int PER>
SGSC_ALWAYS_INLINE f8 dequantize_column(const uint32_t* words, int64_t k, f8 code_offset, f8 scale) {
  const u8v v = load8(words + kLanes * (k / PER));
  if constexpr (PER == 1) {
    return __builtin_convertvector((i8v)v, f8) * scale;
  } else {
    constexpr int slot = 32 / PER;
    const u8v field = (v >> static_cast<uint32_t>((k % PER) * slot)) & ((uint32_t{1} << slot) - 1);
    return (__builtin_convertvector((i8v)field, f8) - code_offset) * scale;
  }
}

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define SGSC_HAS_SHUFFLEVECTOR 1
#endif
#endif

#ifdef SGSC_HAS_SHUFFLEVECTOR
// c[j][r] -> c[r][j]: 8 columns of 8 lanes become 8 rows of 8 columns, so each row is one 32-byte
// store instead of eight scalar ones (the unpack / shuffle / 128-bit-permute transpose).
SGSC_ALWAYS_INLINE void transpose8x8(f8 (&c)[8]) {
  f8 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = __builtin_shufflevector(c[i], c[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    t[i + 1] = __builtin_shufflevector(c[i], c[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 10, 11, 6, 7, 14, 15);
    u[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 8, 9, 4, 5, 12, 13);
    u[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 10, 11, 6, 7, 14, 15);
  }
  for (int i = 0; i < 4; ++i) {
    c[i] = __builtin_shufflevector(u[i], u[i + 4], 0, 1, 2, 3, 8, 9, 10, 11);
    c[i + 4] = __builtin_shufflevector(u[i], u[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
  }
}
#endif

template <int PER>
SGSC_ALWAYS_INLINE void dequantize_segment(const uint32_t* words, int64_t len, float code_offset, f8 scale,
                                           const int32_t* rows, float* dst, int64_t ld) {
  const f8 offset = f8{} + code_offset;
  int64_t k = 0;
#ifdef SGSC_HAS_SHUFFLEVECTOR
  for (; k + 8 <= len; k += 8) {  // blocks of 8 columns, each row written as one vector
    f8 block[8];
    for (int j = 0; j < 8; ++j) block[j] = dequantize_column<PER>(words, k + j, offset, scale);
    transpose8x8(block);
    for (int r = 0; r < kLanes; ++r)
      if (rows[r] >= 0) std::memcpy(dst + rows[r] * ld + k, &block[r], sizeof(f8));
  }
#endif
  for (; k < len; ++k) {  // the last columns one at a time
    const f8 value = dequantize_column<PER>(words, k, offset, scale);
    for (int r = 0; r < kLanes; ++r)
      if (rows[r] >= 0) dst[rows[r] * ld + k] = value[r];
  }
}

// Tile t's codes times their scales into dst, whose column 0 is the layer's column 0.
SGSC_ALWAYS_INLINE void dequantize_tile_body(const Plan& p, int64_t t, float* dst, int64_t ld) {
  f8 lane_scale;
  std::memcpy(&lane_scale, p.row_scale + kLanes * t, sizeof(lane_scale));
  const int32_t* rows = p.rows + kLanes * t;
  for (int64_t i = p.tile_ptr[t]; i < p.tile_ptr[t + 1]; ++i) {
    const int64_t s = p.tile_seg[2 * i];
    const uint32_t* w = p.words + p.tile_seg[2 * i + 1];
    const float offset = std::ldexp(1.0f, static_cast<int>(p.width(s)) - 1);
    const f8 scale = lane_scale * p.seg_scale[s];
    float* d = dst + p.k0(s);
    const int64_t len = p.len(s);
    switch (codes_per_word(p.width(s))) {
      case 32: dequantize_segment<32>(w, len, offset, scale, rows, d, ld); break;
      case 16: dequantize_segment<16>(w, len, offset, scale, rows, d, ld); break;
      case 10: dequantize_segment<10>(w, len, offset, scale, rows, d, ld); break;
      case 8: dequantize_segment<8>(w, len, offset, scale, rows, d, ld); break;
      case 6: dequantize_segment<6>(w, len, offset, scale, rows, d, ld); break;
      case 5: dequantize_segment<5>(w, len, offset, scale, rows, d, ld); break;
      case 4: dequantize_segment<4>(w, len, offset, scale, rows, d, ld); break;
      case 3: dequantize_segment<3>(w, len, offset, scale, rows, d, ld); break;
      case 2: dequantize_segment<2>(w, len, offset, scale, rows, d, ld); break;
      default: dequantize_segment<1>(w, len, offset, scale, rows, d, ld); break;
    }
  }
}

using DequantizeFn = void (*)(const Plan&, int64_t, float*, int64_t);

void dequantize_tile_portable(const Plan& p, int64_t t, float* dst, int64_t ld) { dequantize_tile_body(p, t, dst, ld); }

#ifdef SGSC_PACKED_AVX2
__attribute__((target("avx2,fma"))) void dequantize_tile_avx2(const Plan& p, int64_t t, float* dst, int64_t ld) {
  dequantize_tile_body(p, t, dst, ld);
}
#endif

DequantizeFn dequantize_kernel() {
#ifdef SGSC_PACKED_AVX2
  if (cpu_has_avx2_fma()) return dequantize_tile_avx2;
#endif
  return dequantize_tile_portable;
}

void dequantize_into(const Plan& p, float* out) {
  // Pruned rows and columns of pruned input groups are zeros; when the tiles write every column of
  // their rows, only the rows no tile names need filling (a whole fill doubled the writes).
  const int64_t K = p.in_features;
  if (!p.covers_all_columns) {
    std::fill(out, out + p.out_features * K, 0.0f);
  } else if (!p.covers_all_rows) {
    for (int64_t row = 0; row < p.out_features; ++row)
      if (!p.row_in_tile[row]) std::fill(out + row * K, out + (row + 1) * K, 0.0f);
  }
  const DequantizeFn kernel = dequantize_kernel();
  steal_blocks(p.tiles, kLanes * p.in_features, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) kernel(p, t, out, p.in_features);
  });
}

// ---- ops -----------------------------------------------------------------------------------

at::Tensor packed_linear_cpu(const at::Tensor& x, const at::Tensor& words, const at::Tensor& seg_table,
                             const at::Tensor& seg_scale, const at::Tensor& tile_table, const at::Tensor& tile_ptr,
                             const at::Tensor& rows, const at::Tensor& row_scale, int64_t out_features,
                             const std::optional<at::Tensor>& bias) {
  check_tensor(x, at::kFloat, 2, "x", "packed_linear");
  const Plan p = make_plan(words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features,
                           x.size(1), "packed_linear");
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    check_tensor(*bias, at::kFloat, 1, "bias", "packed_linear");
    TORCH_CHECK_VALUE(bias->size(0) == out_features, "sgsc.packed_linear: bias must have ", out_features,
                      " elements, got ", bias->size(0));
    bias_ptr = bias->data_ptr<float>();
  }
  const int64_t M = x.size(0);
  // Rows no tile covers (pruned) are the bias alone; when the tiles cover every row the kernel writes
  // all of y, and filling it first would cost a second pass (most of a small layer's call).
  // (A fresh tensor: for M == 1 an expanded bias is already "contiguous" and would alias it.)
  auto y = at::empty({M, out_features}, x.options());
  if (!p.covers_all_rows || p.tiles == 0) {
    if (bias_ptr) y.copy_(bias->unsqueeze(0).expand({M, out_features}));
    else y.zero_();
  }
  if (M == 0 || p.tiles == 0) return y;
  fused_linear(p, x.data_ptr<float>(), M, y.data_ptr<float>(), bias_ptr);
  return y;
}

at::Tensor packed_dequantize_cpu(const at::Tensor& words, const at::Tensor& seg_table, const at::Tensor& seg_scale,
                                 const at::Tensor& tile_table, const at::Tensor& tile_ptr, const at::Tensor& rows,
                                 const at::Tensor& row_scale, int64_t out_features, int64_t in_features) {
  const Plan p = make_plan(words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features,
                           in_features, "packed_dequantize");
  auto out = at::empty({out_features, in_features}, seg_scale.options());
  dequantize_into(p, out.data_ptr<float>());
  return out;
}

void packed_dequantize_out_cpu(const at::Tensor& words, const at::Tensor& seg_table, const at::Tensor& seg_scale,
                               const at::Tensor& tile_table, const at::Tensor& tile_ptr, const at::Tensor& rows,
                               const at::Tensor& row_scale, int64_t out_features, int64_t in_features, at::Tensor out) {
  const Plan p = make_plan(words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features,
                           in_features, "packed_dequantize_out");
  TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, "sgsc.packed_dequantize_out: out must be float32, got ",
                   out.scalar_type());
  TORCH_CHECK_VALUE(out.numel() == out_features * in_features && out.is_contiguous(),
                    "sgsc.packed_dequantize_out: out must be contiguous with ", out_features * in_features,
                    " elements, got shape ", out.sizes());
  dequantize_into(p, out.data_ptr<float>());
}

}  // namespace

TORCH_LIBRARY_IMPL(sgsc, CPU, m) {
  m.impl("packed_linear", &packed_linear_cpu);
  m.impl("packed_dequantize", &packed_dequantize_cpu);
  m.impl("packed_dequantize_out", &packed_dequantize_out_cpu);
}

}  // namespace sgsc
