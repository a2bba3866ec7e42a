// CPU kernel of sgsc::packed_linear_q8: y = x_hat W^T + b, where x_hat is x quantized to int8 in blocks of
// kQBlock = 480 columns (sgsc.ops.spec.Q8_BLOCK) and W is the packed layout's weight (csrc/packed_layout.h).
//
// Quantization (sgsc.ops.reference.quantize_activations is its twin): per batch row and per block of 480
// columns counted from the start of each segment's column range, s = absmax / 127 and
// q = round_half_even(x * (127 / absmax)) in [-127, 127]; x_hat = q * s (a block of zeros has s = 0).
//
// Segments whose codes fill whole bytes of a word (PER = 4, 8, 16, 32 codes per word: widths 7-8, 4, 2, 1)
// take integer dot products: slot phase p of a word, (v >> p * SLOT) & byte mask, holds in its 4 bytes the
// codes i * PER / 4 + p (i = 0..3) of the 8 rows, unsigned (u = code + 2^(W-1)), and x's q is laid out in
// the same order, 4 bytes per (word, phase), broadcast to every row. The sum of u * q per block is exact
// in int32 (|u * q| <= 255 * 127, 480 terms), converted to float and multiplied by the block's s; the
// offset 2^(W-1) * sum_b s_b * sum q is subtracted once per segment (in double).
//   * AVX-512 VNNI (vpdpbusd, 256-bit: 8 rows): one instruction per phase and word, 8 accumulator chains;
//   * AVX2 (vpmaddubsw + vpmaddwd): the phases of a word are summed in int16 first (at most
//     2 * 127 * 127 per pair at 7 bits; 8-bit codes would saturate, so they take the float loop there);
//   * elsewhere (SGSC_CPU_ISA=sse41/scalar, other CPUs): the same integer sums with plain vector code.
// The integer sums are exact, so every ISA gives the same per-block values; only the fp32 accumulation
// of the block terms rounds. With AVX-512 VBMI as well, 3, 5 and 6 bits take integer products too (vpmultishiftqb,
// csrc/packed_q8_dot.h). Other widths (elsewhere 3, 5, 6; 9-32 bits) run the float loop of csrc/packed_dot.h on
// x_hat. Result: W x_hat within the fp32 bound of sgsc/ops/packed.py, and W x within that plus
// sum_k |W_rk| * |x_k - x_hat_k| (|x_k - x_hat_k| <= s_b / 2).

#include "packed_q8_dot.h"

#include <cmath>

namespace sgsc {
namespace packed {
namespace {

enum class QPath : int { kPortable = 0, kAvx2 = 1, kVnni = 2, kVnniVbmi = 3 };

QPath q_path() {
  static const QPath path = [] {
#ifdef SGSC_X86_DISPATCH
    __builtin_cpu_init();
    if (isa_at_least(Isa::kAvx512) && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl"))
      return __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512bw") ? QPath::kVnniVbmi : QPath::kVnni;
    if (isa_at_least(Isa::kAvx2)) return QPath::kAvx2;
#endif
    return QPath::kPortable;
  }();
  return path;
}

// Whether segment width w runs on integer dot products on this path.
bool integer_segment(int64_t width, QPath path) {
  if (path == QPath::kVnniVbmi) return width <= 8;
  if (!byte_slots(codes_per_word(width))) return false;
  return path != QPath::kAvx2 || width <= 7;
}

struct QArgs {
  const Plan* plan;
  int64_t M;
  const uint8_t* integer;   // (S,): 1 where segment s takes integer dot products
  const int32_t* xa;        // arranged q: row m, segment s at xa[m * a_stride + a_off[s]]
  const int64_t* a_off;
  int64_t a_stride;
  const float* xf;          // pre-scaled x_hat of float segments: row m, segment s at xf[m * f_stride + f_off[s]]
  const int64_t* f_off;
  int64_t f_stride;
  const float* sx;          // block scales times seg_scale: row m, segment s at sx[m * s_stride + s_off[s]]
  const int64_t* s_off;
  int64_t s_stride;
  const float* offsets;     // (M, S): the offset term of segment s for row m
  float* y;
  const float* bias;
};


template <QPath PATH, int PER>
SGSC_ALWAYS_INLINE void q_dot(const uint32_t* w, int64_t n_words, const int32_t* xa, const float* sx, f8* out) {
#ifdef SGSC_X86_DISPATCH
  if constexpr (PATH == QPath::kVnni || PATH == QPath::kVnniVbmi) return q_dot_vnni<PER>(w, n_words, xa, sx, out);
  if constexpr (PATH == QPath::kAvx2) return q_dot_avx2<PER>(w, n_words, xa, sx, out);
#endif
  *out += q_dot_portable<PER>(w, n_words, xa, sx);
}

// Rows of a chunk that share each word's decoding: 8 on the VNNI path (q_dot_vnni_rows), 1 elsewhere.
template <QPath PATH>
SGSC_ALWAYS_INLINE void q8_chunk(const QArgs& a, int64_t t, int64_t m0, int64_t rows) {
  const Plan& p = *a.plan;
  const int64_t S = p.segments;
  f8 acc[8];
  for (int r = 0; r < rows; ++r) acc[r] = f8{};
  for (int64_t i = p.tile_ptr[t]; i < p.tile_ptr[t + 1]; ++i) {
    const int64_t s = p.tile_seg[2 * i];
    const uint32_t* w = p.words + p.tile_seg[2 * i + 1];
    const int64_t n = p.words_of(s);
    if (a.integer[s]) {
      const int32_t* xa = a.xa + m0 * a.a_stride + a.a_off[s];
      const float* sx = a.sx + m0 * a.s_stride + a.s_off[s];
#ifdef SGSC_X86_DISPATCH
      if ((PATH == QPath::kVnni || PATH == QPath::kVnniVbmi) && rows == 8) {
        switch (codes_per_word(p.width(s))) {
          case 10: q_dot_vbmi<10, 8>(w, n, xa, a.a_stride, sx, a.s_stride, acc); break;
          case 6: q_dot_vbmi<6, 8>(w, n, xa, a.a_stride, sx, a.s_stride, acc); break;
          case 5: q_dot_vbmi<5, 8>(w, n, xa, a.a_stride, sx, a.s_stride, acc); break;
          case 32: q_dot_vnni_rows<32>(w, n, xa, a.a_stride, sx, a.s_stride, acc); break;
          case 16: q_dot_vnni_rows<16>(w, n, xa, a.a_stride, sx, a.s_stride, acc); break;
          case 8: q_dot_vnni_rows<8>(w, n, xa, a.a_stride, sx, a.s_stride, acc); break;
          default: q_dot_vnni_rows<4>(w, n, xa, a.a_stride, sx, a.s_stride, acc); break;
        }
        for (int r = 0; r < rows; ++r) acc[r] -= a.offsets[(m0 + r) * S + s];
        continue;
      }
#endif
      for (int r = 0; r < rows; ++r, xa += a.a_stride, sx += a.s_stride) {
        switch (codes_per_word(p.width(s))) {
#ifdef SGSC_X86_DISPATCH
          case 10: q_dot_vbmi<10, 1>(w, n, xa, 0, sx, 0, acc + r); break;  // reached on kVnniVbmi only
          case 6: q_dot_vbmi<6, 1>(w, n, xa, 0, sx, 0, acc + r); break;
          case 5: q_dot_vbmi<5, 1>(w, n, xa, 0, sx, 0, acc + r); break;
#endif
          case 32: q_dot<PATH, 32>(w, n, xa, sx, acc + r); break;
          case 16: q_dot<PATH, 16>(w, n, xa, sx, acc + r); break;
          case 8: q_dot<PATH, 8>(w, n, xa, sx, acc + r); break;
          default: q_dot<PATH, 4>(w, n, xa, sx, acc + r); break;
        }
      }
    } else {
      for (int r = 0; r < rows; ++r) {
        const float* xs = a.xf + (m0 + r) * a.f_stride + a.f_off[s];
        switch (codes_per_word(p.width(s))) {
          case 32: segment_dot<32, 1>(w, n, xs, acc + r); break;
          case 16: segment_dot<16, 1>(w, n, xs, acc + r); break;
          case 10: segment_dot<10, 1>(w, n, xs, acc + r); break;
          case 8: segment_dot<8, 1>(w, n, xs, acc + r); break;
          case 6: segment_dot<6, 1>(w, n, xs, acc + r); break;
          case 5: segment_dot<5, 1>(w, n, xs, acc + r); break;
          case 4: segment_dot<4, 1>(w, n, xs, acc + r); break;
          case 3: segment_dot<3, 1>(w, n, xs, acc + r); break;
          case 2: segment_dot<2, 1>(w, n, xs, acc + r); break;
          default: segment_dot<1, 1>(w, n, xs, acc + r); break;
        }
      }
    }
    for (int r = 0; r < rows; ++r) acc[r] -= a.offsets[(m0 + r) * S + s];
  }
  for (int r = 0; r < rows; ++r) {
    float* y = a.y + (m0 + r) * p.out_features;
    for (int l = 0; l < kLanes; ++l) {
      const int32_t row = p.rows[kLanes * t + l];
      if (row >= 0) y[row] = acc[r][l] * p.row_scale[kLanes * t + l] + (a.bias ? a.bias[row] : 0.0f);
    }
  }
}

template <QPath PATH>
SGSC_ALWAYS_INLINE void q8_tiles_body(const QArgs& a, int64_t first, int64_t last) {
  for (int64_t t = first; t < last; ++t) {
    int64_t m0 = 0;  // the tile's words stay in L1 from one chunk of batch rows to the next
    if (PATH == QPath::kVnni || PATH == QPath::kVnniVbmi)
      for (; m0 + 8 <= a.M; m0 += 8) q8_chunk<PATH>(a, t, m0, 8);
    for (; m0 < a.M; ++m0) q8_chunk<PATH>(a, t, m0, 1);
  }
}

using QTilesFn = void (*)(const QArgs&, int64_t, int64_t);

void q8_tiles_portable(const QArgs& a, int64_t first, int64_t last) { q8_tiles_body<QPath::kPortable>(a, first, last); }
#ifdef SGSC_X86_DISPATCH
__attribute__((target(SGSC_Q8_AVX2))) void q8_tiles_avx2(const QArgs& a, int64_t first, int64_t last) {
  q8_tiles_body<QPath::kAvx2>(a, first, last);
}
__attribute__((target(SGSC_Q8_VNNI))) void q8_tiles_vnni(const QArgs& a, int64_t first, int64_t last) {
  q8_tiles_body<QPath::kVnni>(a, first, last);
}
__attribute__((target(SGSC_Q8_VNNI))) void q8_tiles_vnni_vbmi(const QArgs& a, int64_t first, int64_t last) {
  q8_tiles_body<QPath::kVnniVbmi>(a, first, last);
}
#endif

QTilesFn q8_kernel(QPath path) {
#ifdef SGSC_X86_DISPATCH
  if (path == QPath::kVnniVbmi) return q8_tiles_vnni_vbmi;
  if (path == QPath::kVnni) return q8_tiles_vnni;
  if (path == QPath::kAvx2) return q8_tiles_avx2;
#endif
  return q8_tiles_portable;
}

// ---- the call: quantize x per block, arrange it per segment, run the tiles ----------------------------------

// Quantizes len columns of one row in blocks of kQBlock: q (len bytes), the block scales s_b, and returns
// sum_b s_b * sum q (double), the offset term's sum. A block with a non-finite value gets s = NaN, q = 0.
double quantize_row(const float* x, int64_t len, int8_t* q, float* s) {
  double total = 0.0;
  for (int64_t k0 = 0, b = 0; k0 < len; k0 += kQBlock, ++b) {
    const int64_t k1 = std::min(len, k0 + kQBlock);
    float absmax = 0.0f;
    bool finite = true;
    for (int64_t k = k0; k < k1; ++k) {
      finite = finite && std::isfinite(x[k]);
      absmax = std::max(absmax, std::fabs(x[k]));
    }
    int32_t qsum = 0;
    if (!finite || absmax == 0.0f) {
      std::fill(q + k0, q + k1, int8_t{0});
      s[b] = finite ? 0.0f : std::nanf("");
    } else {
      const float inv = 127.0f / absmax;
      for (int64_t k = k0; k < k1; ++k) {
        const float r = std::min(127.0f, std::max(-127.0f, std::nearbyint(x[k] * inv)));
        q[k] = static_cast<int8_t>(r);
        qsum += q[k];
      }
      s[b] = absmax / 127.0f;
    }
    total += static_cast<double>(s[b]) * qsum;
  }
  return total;
}

Tensor packed_linear_q8_cpu(const Tensor& x, const Tensor& words, const Tensor& seg_table, const Tensor& seg_scale,
                            const Tensor& tile_table, const Tensor& tile_ptr, const Tensor& rows,
                            const Tensor& row_scale, int64_t out_features, const std::optional<Tensor>& bias) {
  check_tensor(x, kFloat, 2, "x", "packed_linear_q8");
  const Plan p = make_plan(words, seg_table, seg_scale, tile_table, tile_ptr, rows, row_scale, out_features,
                           x.size(1), "packed_linear_q8");
  const float* bias_ptr = checked_bias(bias, out_features, "packed_linear_q8");
  const int64_t M = x.size(0), K = p.in_features, S = p.segments;
  Tensor y = empty({M, out_features}, kFloat, x);
  float* y_ptr = y.mutable_data_ptr<float>();
  if (!p.covers_all_rows || p.tiles == 0) {
    for (int64_t m = 0; m < M; ++m) {
      if (bias_ptr) std::copy_n(bias_ptr, out_features, y_ptr + m * out_features);
      else std::fill_n(y_ptr + m * out_features, out_features, 0.0f);
    }
  }
  if (M == 0 || p.tiles == 0) return y;
  const QPath path = q_path();
  // Per segment: where its arranged q, its pre-scaled x_hat and its block scales start within a row.
  std::vector<uint8_t> integer(S);
  std::vector<int64_t> a_off(S + 1, 0), f_off(S + 1, 0), s_off(S + 1, 0), q_off(S, 0), r_off(S, 0);
  int64_t q_stride = 0, r_stride = 0;  // per row: q and raw block scales of the distinct column ranges
  for (int64_t s = 0; s < S; ++s) {
    integer[s] = integer_segment(p.width(s), path);
    const int64_t n = p.xs_offset[s + 1] - p.xs_offset[s];  // codes, padded to whole words
    a_off[s + 1] = a_off[s] + (integer[s] ? n / codes_per_word(p.width(s)) * phases(codes_per_word(p.width(s))) : 0);
    f_off[s + 1] = f_off[s] + (integer[s] ? 0 : n);
    s_off[s + 1] = s_off[s] + (p.len(s) + kQBlock - 1) / kQBlock;
    if (p.same_columns_as[s] == s) {
      q_off[s] = q_stride;
      r_off[s] = r_stride;
      q_stride += p.len(s);
      r_stride += s_off[s + 1] - s_off[s];
    }
  }
  // Kept by the calling thread from one call to the next (a small layer's call then allocates nothing);
  // the helper threads reach them through these pointers.
  thread_local std::vector<int8_t> q_buffer;
  thread_local std::vector<int32_t> xa_buffer;
  thread_local std::vector<float> float_buffer;
  thread_local std::vector<double> qdot_buffer;
  const bool any_float = f_off[S] > 0;
  q_buffer.resize(M * q_stride);
  xa_buffer.resize(M * a_off[S]);
  qdot_buffer.resize(M * S);
  const int64_t xf_at = 0, sx_at = xf_at + M * f_off[S], raw_at = sx_at + M * s_off[S],
                offsets_at = raw_at + M * r_stride, xhat_at = offsets_at + M * S;
  float_buffer.resize(xhat_at + (any_float ? M * q_stride : 0));
  int8_t* const q = q_buffer.data();
  int32_t* const xa = xa_buffer.data();
  double* const qdot = qdot_buffer.data();
  float* const xf = float_buffer.data() + xf_at;
  float* const sx = float_buffer.data() + sx_at;
  float* const raw = float_buffer.data() + raw_at;
  float* const offsets = float_buffer.data() + offsets_at;
  float* const xhat = float_buffer.data() + xhat_at;
  const float* xp = x.const_data_ptr<float>();
  steal_blocks(M, K * 4, [&](int64_t first, int64_t last) {
    for (int64_t m = first; m < last; ++m) {
      // Quantize each distinct column range once, then lay q out per segment.
      for (int64_t s = 0; s < S; ++s) {
        const int64_t rep = p.same_columns_as[s], len = p.len(s);
        const int8_t* qr = q + m * q_stride + q_off[rep];
        const float* rs = raw + m * r_stride + r_off[rep];
        if (rep == s) {
          qdot[m * S + s] = quantize_row(xp + m * K + p.k0(s), len, q + m * q_stride + q_off[s], raw + m * r_stride + r_off[s]);
          if (any_float) {  // x_hat = q * s; a non-finite block is NaN
            float* xh = xhat + m * q_stride + q_off[s];
            for (int64_t k = 0; k < len; ++k) xh[k] = std::isnan(rs[k / kQBlock]) ? rs[k / kQBlock] : qr[k] * rs[k / kQBlock];
          }
        }
        offsets[m * S + s] = static_cast<float>(p.offset_factor[s] * qdot[m * S + rep]);
        if (integer[s]) {
          const int per = codes_per_word(p.width(s)), np = phases(per);
          int32_t* dst = xa + m * a_off[S] + a_off[s];
          const int64_t groups = a_off[s + 1] - a_off[s];  // (word, phase) pairs
          for (int64_t g = 0; g < groups; ++g) {
            const int64_t word = g / np, phase = g % np;
            uint32_t packed = 0;
            for (int i = 0; i < 4; ++i) {  // byte i of phase p: code i * PER / 4 + p, or 4p + i (csrc/packed_q8_dot.h)
              const int64_t j = byte_slots(per) ? i * np + phase : 4 * phase + i, k = word * per + j;
              packed |= static_cast<uint32_t>(static_cast<uint8_t>(j < per && k < len ? qr[k] : 0)) << (8 * i);
            }
            dst[g] = static_cast<int32_t>(packed);
          }
          for (int64_t b = 0; b < s_off[s + 1] - s_off[s]; ++b) sx[m * s_off[S] + s_off[s] + b] = rs[b] * p.seg_scale[s];
        } else {
          // x_hat pre-scaled like the float kernel's x (prescale_rows adds the segment's k0 itself).
          prescale_rows<1>(p, s, xhat + m * q_stride + q_off[rep] - p.k0(s), K, xf + m * f_off[S] + f_off[s]);
        }
      }
    }
  });
  const QArgs args{&p, M, integer.data(), xa, a_off.data(), a_off[S], xf, f_off.data(), f_off[S],
                   sx, s_off.data(), s_off[S], offsets, y_ptr, bias_ptr};
  const QTilesFn kernel = q8_kernel(path);
  steal_blocks(p.tiles, kLanes * K * M, [&](int64_t first, int64_t last) { kernel(args, first, last); });
  return y;
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(sgsc, CPU, m) { m.impl("packed_linear_q8", TORCH_BOX(&packed_linear_q8_cpu)); }

}  // namespace packed
}  // namespace sgsc
