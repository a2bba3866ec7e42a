// CPU kernel of sgsc::unpack_linear: y = x W^T + bias with W the stream's codes times their group's scale
// (sgsc::pack's layout, csrc/bitpack.h), the product of the packed runtime's small layers
// (sgsc.nn.PackedStreamLinear). The schema and the reference twin live in sgsc/ops/library.py.
//
// W is never written out whole: each block of L output rows (L = 16 on AVX-512, 8 elsewhere: one vector)
// by up to 512 columns is decoded into per-thread buffers (its int32 codes, then its floats), stored
// column-major (one vector holds column k of the L rows), and every batch row then multiplies it by
// broadcasting x[m][k] onto that column: no horizontal sums. Below 4 batch rows, each decoded row is
// multiplied as it is (dot products: the transpose would cost more than the products it feeds). One call
// instead of a dequantization into a buffer followed by a matrix product: on a 64x64 layer those two
// calls cost more than the float layer's one.
//
// Numerics: fp32 multiply-adds (FMA on AVX2 and up), in independent partial sums over interleaved columns,
// the bias, and each later chunk of 512 columns added to y: within the fp32 bound of a dot product of
// length K, like sgsc::packed_linear. The weights themselves are exact (code * power-of-two scale).

#include <cstring>
#include <vector>

#include "bitpack.h"
#include "packed_layout.h"

namespace sgsc {
namespace packed {
namespace {

// The most rows a block holds (AVX-512's 16 floats).
constexpr int kMaxRows = 16;
// Columns decoded at a time (a multiple of 8, so every chunk of a row starts on a byte): each thread's buffers
// then hold a fixed 64.5 KiB, whatever the layer, as bitpack.cpp's unpack keeps a fixed chunk per thread.
constexpr int64_t kColumns = 512;
static_assert(kColumns % 8 == 0, "a chunk of a row must start on a byte boundary");
// Codes of slack after each decoded row: the codes skipped before it (< 8).
constexpr int64_t kRowSlack = 8;

template <int L>
struct Vec {
  typedef float type __attribute__((vector_size(4 * L)));
};

// Where one output row's codes start: a row inside a group starts at code (r % rows_per_group) * K, which
// is byte-aligned only at multiples of 8 codes, so decoding starts at the multiple of 8 below it and
// skips the codes before the row.
struct RowSource {
  const uint8_t* bytes;  // the byte of the multiple of 8 codes at or below the row's first code
  int64_t skip;          // codes to skip from there, < 8
  int width;
  float scale;           // 0 for a missing lane
};

// The sources of rows [r0, r0 + lanes) and of the missing lanes up to kMaxRows (scale 0; group and position
// found by stepping, not dividing per row).
void row_sources(const uint8_t* src, const Layout& layout, const float* scales, int64_t rows_per_group, int64_t r0,
                 int64_t lanes, int64_t K, RowSource (&rows)[kMaxRows]) {
  int64_t g = r0 / rows_per_group, within = r0 % rows_per_group;
  for (int64_t lane = 0; lane < kMaxRows; ++lane) {
    if (lane >= lanes) {
      rows[lane] = RowSource{src, 0, 0, 0.0f};
      continue;
    }
    const int64_t first = within * K, aligned = first & ~int64_t{7};
    rows[lane] = RowSource{src + layout.offset[g] + aligned * layout.width[g] / 8, first - aligned, layout.width[g],
                           scales[g]};
    if (++within == rows_per_group) within = 0, ++g;
  }
}

// The L rows' codes times their scales, column-major: w[k * L + lane] = row[lane][k] * scale[lane] (exactly
// the dequantized weight: a power-of-two scale). Blocks of 8 rows by 8 columns go through an 8x8 transpose,
// so every store is 8 lanes of a column.
template <int L>
SGSC_ALWAYS_INLINE void columns(const int32_t* const (&row)[L], const float (&scale)[L], int64_t K, float* w) {
  int64_t k = 0;
#ifdef SGSC_HAS_SHUFFLEVECTOR
  for (; k + 8 <= K; k += 8)
    for (int half = 0; half < L; half += 8) {
      f8 block[8], lane_scale;
      std::memcpy(&lane_scale, scale + half, sizeof(lane_scale));
      for (int lane = 0; lane < 8; ++lane) {
        i8v codes;
        std::memcpy(&codes, row[half + lane] + k, sizeof(codes));
        block[lane] = __builtin_convertvector(codes, f8);
      }
      transpose8x8(block);
      for (int j = 0; j < 8; ++j) {
        const f8 column = block[j] * lane_scale;
        std::memcpy(w + (k + j) * L + half, &column, sizeof(column));
      }
    }
#endif
  for (; k < K; ++k)
    for (int lane = 0; lane < L; ++lane) w[k * L + lane] = static_cast<float>(row[lane][k]) * scale[lane];
}

// y[m][0..lanes) = bias + sum_k x[m][k] * w[k] for MB batch rows (x rows ldx apart, y rows ldy apart), or
// y += the sum when accumulating a later chunk of columns. A sets of partial sums over interleaved columns give
// MB * A = 8 independent chains, enough to hide the FMA latency at any batch size.
template <int L, int MB>
SGSC_ALWAYS_INLINE void multiply_block(const float* w, int64_t K, const float* x, int64_t ldx,
                                       const typename Vec<L>::type& bias, bool accumulate, int64_t lanes, float* y,
                                       int64_t ldy) {
  using V = typename Vec<L>::type;
  constexpr int A = 8 / MB;
  V part[A][MB];
  for (int a = 0; a < A; ++a)
    for (int m = 0; m < MB; ++m) part[a][m] = V{};
  int64_t k = 0;
  for (; k + A <= K; k += A)
    for (int a = 0; a < A; ++a) {
      V column;
      std::memcpy(&column, w + (k + a) * L, sizeof(column));
      for (int m = 0; m < MB; ++m) part[a][m] += column * x[m * ldx + k + a];
    }
  for (; k < K; ++k) {
    V column;
    std::memcpy(&column, w + k * L, sizeof(column));
    for (int m = 0; m < MB; ++m) part[0][m] += column * x[m * ldx + k];
  }
  for (int m = 0; m < MB; ++m) {
    V sum = part[0][m];
    for (int a = 1; a < A; ++a) sum += part[a][m];
    float* out = y + m * ldy;
    if (lanes == L) {
      V start = bias;
      if (accumulate) std::memcpy(&start, out, sizeof(start));
      start += sum;
      std::memcpy(out, &start, sizeof(start));
    } else {
      for (int64_t lane = 0; lane < lanes; ++lane) out[lane] = (accumulate ? out[lane] : bias[lane]) + sum[lane];
    }
  }
}

// Below this many batch rows a block's rows are multiplied as they are (dot_row), without the transpose to
// columns, which then costs more than the products it feeds.
constexpr int64_t kFewRows = 4;

// L codes times L values of x, as floats.
template <int L>
SGSC_ALWAYS_INLINE typename Vec<L>::type code_times_x(const int32_t* code, const float* x) {
  typedef int32_t IV __attribute__((vector_size(4 * L)));
  IV c;
  typename Vec<L>::type xs;
  std::memcpy(&c, code, sizeof(c));
  std::memcpy(&xs, x, sizeof(xs));
  return __builtin_convertvector(c, typename Vec<L>::type) * xs;
}

// y[m * ldy] = bias + scale * sum_k code[k] * x[m][k] for M batch rows (or y += the scaled sum, accumulating
// a later chunk of columns): one output row's codes as they were decoded, L columns per step in two partial
// sums, the scale applied once (a power of two: the same value as multiplying each code by it).
template <int L>
SGSC_ALWAYS_INLINE void dot_row(const int32_t* code, float scale, int64_t K, const float* x, int64_t ldx, int64_t M,
                                float bias, bool accumulate, float* y, int64_t ldy) {
  using V = typename Vec<L>::type;
  for (int64_t m = 0; m < M; ++m, x += ldx) {
    V part[2] = {V{}, V{}};  // named, not indexed by k: an indexed pair lived in memory, one store per step
    int64_t k = 0;
    for (; k + 2 * L <= K; k += 2 * L) {
      part[0] += code_times_x<L>(code + k, x + k);
      part[1] += code_times_x<L>(code + k + L, x + k + L);
    }
    if (k + L <= K) part[0] += code_times_x<L>(code + k, x + k), k += L;
    const V both = part[0] + part[1];
    float sum = 0.0f;
    for (int lane = 0; lane < L; ++lane) sum += both[lane];
    for (; k < K; ++k) sum += static_cast<float>(code[k]) * x[k];
    y[m * ldy] = (accumulate ? y[m * ldy] : bias) + sum * scale;
  }
}

// Every batch row times a block of L output rows over K columns (a chunk of at most kColumns), the rows' codes
// as decoded (row[lane], scale[lane]): dot products below kFewRows batch rows, else the block's values into w
// and every batch row times w, in chunks of 8, 4, 2 and 1 rows. bias: the block's lanes of the bias, or nullptr;
// accumulate: add to y (a later chunk) instead of starting from the bias.
template <int L>
SGSC_ALWAYS_INLINE void multiply_decoded(const int32_t* const (&row)[L], const float (&scale)[L], float* w, int64_t K,
                                         const float* x, int64_t ldx, int64_t M, const float* bias_ptr,
                                         bool accumulate, int64_t lanes, float* y, int64_t ldy) {
  if (M < kFewRows) {
    for (int64_t lane = 0; lane < lanes; ++lane)
      dot_row<L>(row[lane], scale[lane], K, x, ldx, M, bias_ptr ? bias_ptr[lane] : 0.0f, accumulate, y + lane, ldy);
    return;
  }
  columns<L>(row, scale, K, w);
  typename Vec<L>::type bias{};
  if (bias_ptr)
    for (int64_t lane = 0; lane < lanes; ++lane) bias[lane] = bias_ptr[lane];
  int64_t m = 0;
  for (; m + 8 <= M; m += 8) multiply_block<L, 8>(w, K, x + m * ldx, ldx, bias, accumulate, lanes, y + m * ldy, ldy);
  if (m + 4 <= M) multiply_block<L, 4>(w, K, x + m * ldx, ldx, bias, accumulate, lanes, y + m * ldy, ldy), m += 4;
  if (m + 2 <= M) multiply_block<L, 2>(w, K, x + m * ldx, ldx, bias, accumulate, lanes, y + m * ldy, ldy), m += 2;
  if (m < M) multiply_block<L, 1>(w, K, x + m * ldx, ldx, bias, accumulate, lanes, y + m * ldy, ldy);
}

#define SGSC_BLOCK_PARAMS                                                                                    \
  (const RowSource(&rows)[kMaxRows], const uint8_t* end, int32_t* codes, float* w, int64_t K, const float* x, \
   int64_t ldx, int64_t M, const float* bias, bool accumulate, int64_t lanes, float* y, int64_t ldy)
#define SGSC_BLOCK_ARGS (rows, end, codes, w, K, x, ldx, M, bias, accumulate, lanes, y, ldy)

struct BlockKernel {
  int rows;  // L
  void(*run) SGSC_BLOCK_PARAMS;
};

// One block of L output rows: lane l's codes decoded (through bitpack.cpp's unpack table) to codes + l * (K +
// kRowSlack), then multiplied. A missing lane keeps whatever integer codes the buffer holds (zeros at first):
// its scale is 0 and its outputs are never stored.
template <int L>
SGSC_ALWAYS_INLINE void block_body SGSC_BLOCK_PARAMS {
  const int32_t* row[L];
  float scale[L];
  for (int lane = 0; lane < L; ++lane) {
    int32_t* dst = codes + lane * (K + kRowSlack);
    if (lane < lanes) unpack_codes(rows[lane].width, rows[lane].bytes, end, dst, rows[lane].skip + K);
    row[lane] = dst + rows[lane].skip;
    scale[lane] = rows[lane].scale;
  }
  multiply_decoded<L>(row, scale, w, K, x, ldx, M, bias, accumulate, lanes, y, ldy);
}

void block_portable SGSC_BLOCK_PARAMS { block_body<8> SGSC_BLOCK_ARGS; }

#ifdef SGSC_PACKED_AVX2
__attribute__((target("avx2,fma"))) void block_avx2 SGSC_BLOCK_PARAMS { block_body<8> SGSC_BLOCK_ARGS; }
__attribute__((target("avx512f,avx2,fma"))) void block_avx512 SGSC_BLOCK_PARAMS { block_body<16> SGSC_BLOCK_ARGS; }
#endif

#ifdef SGSC_UNPACK_VBMI
// block_body<16> with rows of widths up to 8 decoded inline by VBMI (a small layer's rows are a few dozen
// codes, where a call per row through the unpack table cost as much as decoding it).
__attribute__((target(SGSC_VBMI_TARGET ",fma"))) void block_avx512_vbmi SGSC_BLOCK_PARAMS {
  const int32_t* row[16];
  float scale[16];
  for (int lane = 0; lane < 16; ++lane) {
    int32_t* dst = codes + lane * (K + kRowSlack);
    const RowSource& r = rows[lane];
    if (lane < lanes) {
      if (r.width >= 1 && r.width <= 8) unpack_vbmi(r.width, r.bytes, end, dst, r.skip + K);
      else unpack_codes(r.width, r.bytes, end, dst, r.skip + K);
    }
    row[lane] = dst + r.skip;
    scale[lane] = r.scale;
  }
  multiply_decoded<16>(row, scale, w, K, x, ldx, M, bias, accumulate, lanes, y, ldy);
}
#endif

BlockKernel block_kernel() {
#ifdef SGSC_PACKED_AVX2
#ifdef SGSC_UNPACK_VBMI
  if (vbmi_unpack_enabled()) return {16, block_avx512_vbmi};
#endif
  if (isa_at_least(Isa::kAvx512)) return {16, block_avx512};
  if (isa_at_least(Isa::kAvx2)) return {8, block_avx2};
#endif
  return {8, block_portable};
}

Tensor unpack_linear_cpu(const Tensor& x_in, const Tensor& packed, const Tensor& widths, const Tensor& scales,
                         int64_t rows_per_group, int64_t in_features, const std::optional<Tensor>& bias) {
  SGSC_CHECK_TYPE(x_in.scalar_type() == kFloat, "sgsc.unpack_linear: x must be float32, got ", x_in.scalar_type());
  SGSC_CHECK_VALUE(x_in.dim() >= 1 && x_in.size(-1) == in_features, "sgsc.unpack_linear: x must have shape (..., ",
                   in_features, "), got ", x_in.sizes());
  const Tensor x = as_contiguous(x_in);
  const int64_t K = in_features;
  int64_t M = 1;  // batch rows: every dimension but the last (x.numel() / K fails for K == 0)
  for (int64_t d = 0; d + 1 < x.dim(); ++d) M *= x.size(d);
  const Layout layout = unpack_dequantize_layout(packed, widths, scales, rows_per_group, K, "unpack_linear");
  const int64_t N = layout.groups * rows_per_group;
  const float* bias_ptr = checked_bias(bias, N, "unpack_linear");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  Tensor y = empty(shape, kFloat, x);
  if (M == 0 || N == 0) return y;
  const Tensor stream = as_contiguous(packed);
  const uint8_t* src = stream.const_data_ptr<uint8_t>();
  const uint8_t* end = src + stream.numel();
  const float* scale = scales.const_data_ptr<float>();
  const float* x_ptr = x.const_data_ptr<float>();
  float* y_ptr = y.mutable_data_ptr<float>();
  const BlockKernel block = block_kernel();
  const int64_t L = block.rows, blocks = (N + L - 1) / L;
  steal_blocks(blocks, L * K * M, [&](int64_t first, int64_t last) {
    thread_local std::vector<int32_t> codes(kMaxRows * (kColumns + kRowSlack));
    thread_local std::vector<float> w(kMaxRows * kColumns);
    RowSource rows[kMaxRows], chunk[kMaxRows];
    for (int64_t b = first; b < last; ++b) {
      const int64_t r0 = b * L, lanes = std::min(L, N - r0);
      row_sources(src, layout, scale, rows_per_group, r0, lanes, K, rows);
      for (int64_t k0 = 0; k0 == 0 || k0 < K; k0 += kColumns) {  // one pass when K == 0: y is the bias
        for (int lane = 0; lane < kMaxRows; ++lane) {
          chunk[lane] = rows[lane];
          chunk[lane].bytes += k0 / 8 * rows[lane].width;
        }
        block.run(chunk, end, codes.data(), w.data(), std::min(kColumns, K - k0), x_ptr + k0, K, M,
                  bias_ptr ? bias_ptr + r0 : nullptr, k0 > 0, lanes, y_ptr + r0, N);
      }
    }
  });
  return y;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(sgsc, CPU, m) { m.impl("unpack_linear", TORCH_BOX(&unpack_linear_cpu)); }

}  // namespace packed
}  // namespace sgsc
