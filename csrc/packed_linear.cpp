// CPU kernel of sgsc::packed_linear: y = x W^T computed from integer codes bit-packed at each group's
// width (the layout is csrc/packed_layout.h's), never materialising W.
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
// The inner loops use GCC vector extensions, compiled twice: for AVX2+FMA (taken when isa.h's
// active_isa() is avx2 or above, as csrc/bitpack.cpp does for its AVX2 unpack) and for the baseline
// ISA. isa.h's clones have no FMA, and without FMA the avx2 clone would split every multiply-add in
// two. An AVX-512 host runs the AVX2+FMA code; the two paths round differently (FMA), within the
// fp32 bound of sgsc/ops/packed.py.

#include "packed_dot.h"

#include <array>

namespace sgsc {
namespace packed {
namespace {

constexpr int kMaxChunk = 8;         // batch rows per pass of the fused kernel (8 x 8 accumulators: 8 of 16 ymm)
constexpr int64_t kPanelRows = 64;   // batch rows whose pre-scaled x (1 MiB at K = 4096) one parallel region serves

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

#ifdef SGSC_PACKED_AVX2
template <int MB>
__attribute__((target("avx2,fma"))) void fused_tiles_avx2(const FusedArgs& a, int64_t first, int64_t last) {
  fused_tiles_body<MB>(a, first, last);
}
#endif

// fused_kernel(mb) runs the fused kernel for a chunk of mb in {1, 2, 4, 8} batch rows.
FusedFn fused_kernel(int64_t mb) {
  static const std::array<FusedFn, 4> table = [] {
#ifdef SGSC_PACKED_AVX2
    if (isa_at_least(Isa::kAvx2))
      return std::array<FusedFn, 4>{fused_tiles_avx2<1>, fused_tiles_avx2<2>, fused_tiles_avx2<4>, fused_tiles_avx2<8>};
#endif
    return std::array<FusedFn, 4>{fused_tiles_portable<1>, fused_tiles_portable<2>, fused_tiles_portable<4>,
                                  fused_tiles_portable<8>};
  }();
  return table[mb == 8 ? 3 : mb == 4 ? 2 : mb == 2 ? 1 : 0];
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

// ---- op -----------------------------------------------------------------------------------

Tensor packed_linear_cpu(const Tensor& x, const Tensor& words, const Tensor& seg_table,
                         const Tensor& seg_scale, const Tensor& tile_table, const Tensor& tile_ptr,
                         const Tensor& rows, const Tensor& row_scale, int64_t out_features,
                         const std::optional<Tensor>& bias) {
  check_tensor(x, kFloat, 2, "x", "packed_linear");
  const Plan p = make_plan(words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features,
                           x.size(1), "packed_linear");
  const float* bias_ptr = checked_bias(bias, out_features, "packed_linear");
  const int64_t M = x.size(0);
  // Rows no tile covers (pruned) are the bias alone; when the tiles cover every row the kernel writes
  // all of y, and filling it first would cost a second pass (most of a small layer's call).
  // (A fresh tensor: for M == 1 an expanded bias is already "contiguous" and would alias it.)
  Tensor y = empty({M, out_features}, kFloat, x);
  float* y_ptr = y.mutable_data_ptr<float>();
  if (!p.covers_all_rows || p.tiles == 0) {
    for (int64_t m = 0; m < M; ++m) {
      float* y_row = y_ptr + m * out_features;
      if (bias_ptr) std::copy_n(bias_ptr, out_features, y_row);
      else std::fill_n(y_row, out_features, 0.0f);
    }
  }
  if (M == 0 || p.tiles == 0) return y;
  fused_linear(p, x.const_data_ptr<float>(), M, y_ptr, bias_ptr);
  return y;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(sgsc, CPU, m) { m.impl("packed_linear", TORCH_BOX(&packed_linear_cpu)); }

}  // namespace packed
}  // namespace sgsc
