// CPU kernels of sgsc::packed_dequantize(_out): a packed layout's weight, code * scale, written out as
// float32 (the layout is csrc/packed_layout.h's), compiled for AVX2+FMA and the baseline ISA like the
// fused kernel of csrc/packed_linear.cpp.

#include "packed_layout.h"

namespace sgsc {
namespace packed {
namespace {

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
  if (isa_at_least(Isa::kAvx2)) return dequantize_tile_avx2;
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

Tensor packed_dequantize_cpu(const Tensor& words, const Tensor& seg_table, const Tensor& seg_scale,
                             const Tensor& tile_table, const Tensor& tile_ptr, const Tensor& rows,
                             const Tensor& row_scale, int64_t out_features, int64_t in_features) {
  const Plan p = make_plan(words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features,
                           in_features, "packed_dequantize");
  Tensor out = empty({out_features, in_features}, kFloat, seg_scale);
  dequantize_into(p, out.mutable_data_ptr<float>());
  return out;
}

void packed_dequantize_out_cpu(const Tensor& words, const Tensor& seg_table, const Tensor& seg_scale,
                               const Tensor& tile_table, const Tensor& tile_ptr, const Tensor& rows,
                               const Tensor& row_scale, int64_t out_features, int64_t in_features, Tensor out) {
  const Plan p = make_plan(words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features,
                           in_features, "packed_dequantize_out");
  SGSC_CHECK_TYPE(out.scalar_type() == kFloat, "sgsc.packed_dequantize_out: out must be float32, got ",
                  out.scalar_type());
  SGSC_CHECK_VALUE(out.numel() == out_features * in_features && out.is_contiguous(),
                   "sgsc.packed_dequantize_out: out must be contiguous with ", out_features * in_features,
                   " elements, got shape ", out.sizes());
  dequantize_into(p, out.mutable_data_ptr<float>());
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(sgsc, CPU, m) {
  m.impl("packed_dequantize", TORCH_BOX(&packed_dequantize_cpu));
  m.impl("packed_dequantize_out", TORCH_BOX(&packed_dequantize_out_cpu));
}

}  // namespace packed
}  // namespace sgsc
