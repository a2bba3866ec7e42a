// CPU kernels of sgsc::fake_quantize and its fused backward.
//
// The schemas and the autograd live in sgsc/ops/library.py; this file only provides the CPU implementations.
// The per-group constants (2^-e, 2^e and the clamp range) come from ATen's exp2 on the (G,) tensors with
// exactly the calls the PyTorch reference makes, so forward outputs match it bit for bit. The element loops
// are compiled once per instruction set through function multiversioning: without SSE4.1, floor
// and rint are libm calls and the loop runs at a fraction of memory bandwidth.

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <cstring>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <vector>

#include "buffers.h"
#include "isa.h"

namespace sgsc {
namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per parallel task: large enough to amortise scheduling
constexpr double kLn2 = 0.69314718055994530942;

// Calls f with a value of the element type of the weight dtypes the op accepts (check_inputs refused
// the others); the arithmetic is float32 in every case.
template <typename F>
void dispatch_weight_type(ScalarType dtype, const F& f) {
  switch (dtype) {
    case kHalf: return f(Half{});
    case kBFloat16: return f(BFloat16{});
    default: return f(float{});
  }
}

// Per-group constants of eq. (1), one struct per group for the element loops.
struct Group {
  float scale, inv_scale, lo, hi;
  bool pruned;
};

// Mirrors sgsc.ops.reference.group_params: the three powers of two come from one ATen exp2 over a
// (3, G) tensor laid out exactly as the reference's, so every value (including ATen's choice of
// vector or scalar exp2 for each position) is the same; the rest is exact arithmetic.
std::vector<Group> group_constants(const Tensor& b, const Tensor& e) {
  const int64_t groups = b.numel();
  Tensor powers = empty({3, groups}, kFloat, b);
  const float* b_ptr = b.const_data_ptr<float>();
  const float* e_ptr = e.const_data_ptr<float>();
  float* p = powers.mutable_data_ptr<float>();
  for (int64_t g = 0; g < groups; ++g) {
    p[g] = -e_ptr[g];
    p[groups + g] = e_ptr[g];
    p[2 * groups + g] = std::max(b_ptr[g], 0.0f) - 1.0f;
  }
  exp2_(powers);
  std::vector<Group> out(groups);
  for (int64_t g = 0; g < groups; ++g) {
    float half = p[2 * groups + g];
    out[g] = {p[g], p[groups + g], -half, half - 1.0f, !(b_ptr[g] > 0.0f)};
  }
  return out;
}

enum class Rounding { kNearest, kFloor };

Rounding parse_rounding(std::string_view rounding) {
  if (rounding == "nearest") return Rounding::kNearest;
  if (rounding == "floor") return Rounding::kFloor;
  SGSC_CHECK_VALUE(false, "sgsc.fake_quantize: rounding must be 'nearest' or 'floor', got '",
                   std::string(rounding), "'");
}

// sgsc.ops.spec.MAX_EXPONENT: beyond it 2^e or 2^-e leaves the normal float32 range, where eq. (1)'s
// float arithmetic gives NaN (0 * inf) instead of its real value.
constexpr float kMaxExponent = 126.0f;

void check_finite(const Tensor& t, const char* name, float bound) {
  Tensor values = as_contiguous(t);
  const float* p = values.const_data_ptr<float>();
  for (int64_t g = 0; g < values.numel(); ++g) {
    SGSC_CHECK_VALUE(std::isfinite(p[g]), "sgsc.fake_quantize: ", name, " must be finite, found ", p[g],
                     " at group ", g);
    SGSC_CHECK_VALUE(std::fabs(p[g]) <= bound, "sgsc.fake_quantize: ", name, " must lie in [", -bound, ", ",
                     bound, "], found ", p[g], " at group ", g);
  }
}

void check_inputs(const Tensor& w, const Tensor& b, const Tensor& e) {
  SGSC_CHECK_TYPE(w.scalar_type() == kFloat || w.scalar_type() == kHalf ||
                  w.scalar_type() == kBFloat16,
                  "sgsc.fake_quantize: w must be float32, float16 or bfloat16, got ", w.scalar_type());
  SGSC_CHECK_TYPE(b.scalar_type() == kFloat && e.scalar_type() == kFloat,
                  "sgsc.fake_quantize: b and e must be float32, got ", b.scalar_type(), " and ",
                  e.scalar_type());
  SGSC_CHECK_VALUE(w.dim() >= 1, "sgsc.fake_quantize: w must have at least one dimension");
  SGSC_CHECK_VALUE(b.dim() == 1 && e.sizes().equals(b.sizes()),
                   "sgsc.fake_quantize: b and e must be 1-D of equal length, got ", b.sizes(), " and ",
                   e.sizes());
  SGSC_CHECK_VALUE(b.size(0) > 0 && w.size(0) % b.size(0) == 0, "sgsc.fake_quantize: ", b.size(0),
                   " groups do not divide w's first dimension ", w.size(0));
  // The CPU kernel reads b and e through raw pointers: on another device (meta, CUDA) they hold no host values.
  SGSC_CHECK_VALUE(same_device(b, w) && same_device(e, w),
                   "sgsc.fake_quantize: w, b and e must be on one device, got ", w.device(), ", ", b.device(),
                   " and ", e.device());
  check_finite(b, "b", std::numeric_limits<float>::max());
  check_finite(e, "e", kMaxExponent);
}

// ---- element loops, one clone per ISA ------------------------------------------------------

template <Rounding R>
SGSC_ALWAYS_INLINE float round_scaled(float clamped) {
  return R == Rounding::kFloor ? std::floor(clamped) : std::nearbyint(clamped);
}

// The comparisons are written so that NaN in w falls through both and propagates.
SGSC_ALWAYS_INLINE float clamp_scaled(float s, float lo, float hi) {
  float c = s < lo ? lo : s;
  return c > hi ? hi : c;
}

template <Rounding R>
SGSC_ALWAYS_INLINE void forward_span(const float* w, float* q, int64_t n, float scale, float inv_scale,
                                     float lo, float hi) {
  for (int64_t i = 0; i < n; ++i) {
    q[i] = round_scaled<R>(clamp_scaled(w[i] * scale, lo, hi)) * inv_scale;
  }
}

#define SGSC_FORWARD_PARAMS (const float* w, float* q, int64_t n, float scale, float inv_scale, float lo, float hi)
#define SGSC_FORWARD_ARGS (w, q, n, scale, inv_scale, lo, hi)
SGSC_ALWAYS_INLINE void forward_span_floor_body SGSC_FORWARD_PARAMS {
  forward_span<Rounding::kFloor> SGSC_FORWARD_ARGS;
}
SGSC_ALWAYS_INLINE void forward_span_nearest_body SGSC_FORWARD_PARAMS {
  forward_span<Rounding::kNearest> SGSC_FORWARD_ARGS;
}
SGSC_CLONES(void, forward_span_floor, SGSC_FORWARD_PARAMS, SGSC_FORWARD_ARGS)
SGSC_CLONES(void, forward_span_nearest, SGSC_FORWARD_PARAMS, SGSC_FORWARD_ARGS)

// Straight-through backward of one block of at most kBlock elements: writes grad_w and adds to
// sums[0] the sum of g * (r - s * inside) and to sums[1] the sum of g * ([s > hi] - [s < lo]),
// the per-group sums before their common factors. The element loop only writes arrays, so it
// vectorises as the forward does; the sums are then taken over the block, still in L1, with
// explicit 8-wide vectors, in float within the block and in double across blocks.
constexpr int64_t kBlock = 1024;
typedef float Float8 __attribute__((vector_size(32)));

template <Rounding R>
SGSC_ALWAYS_INLINE void backward_block(const float* __restrict g, const float* __restrict w,
                                       float* __restrict gw, int64_t n, float scale, float lo, float hi,
                                       double* __restrict sums) {
  float terms_e[kBlock], terms_b[kBlock];
  for (int64_t k = 0; k < n; ++k) {
    float s = w[k] * scale;
    float r = round_scaled<R>(clamp_scaled(s, lo, hi));
    bool inside = (s >= lo) & (s <= hi);
    gw[k] = inside ? g[k] : 0.0f;
    terms_e[k] = g[k] * (inside ? r - s : r);
    terms_b[k] = (s > hi ? g[k] : 0.0f) - (s < lo ? g[k] : 0.0f);
  }
  Float8 acc_e0 = {}, acc_e1 = {}, acc_b0 = {}, acc_b1 = {};
  int64_t k = 0;
  for (; k + 16 <= n; k += 16) {
    Float8 e0, e1, b0, b1;
    std::memcpy(&e0, terms_e + k, sizeof(Float8));
    std::memcpy(&e1, terms_e + k + 8, sizeof(Float8));
    std::memcpy(&b0, terms_b + k, sizeof(Float8));
    std::memcpy(&b1, terms_b + k + 8, sizeof(Float8));
    acc_e0 += e0;
    acc_e1 += e1;
    acc_b0 += b0;
    acc_b1 += b1;
  }
  double sum_e = 0.0, sum_b = 0.0;
  for (; k < n; ++k) {
    sum_e += terms_e[k];
    sum_b += terms_b[k];
  }
  for (int lane = 0; lane < 8; ++lane) {
    sum_e += static_cast<double>(acc_e0[lane]) + acc_e1[lane];
    sum_b += static_cast<double>(acc_b0[lane]) + acc_b1[lane];
  }
  sums[0] += sum_e;
  sums[1] += sum_b;
}

#define SGSC_BACKWARD_PARAMS                                                                          \
  (const float* __restrict g, const float* __restrict w, float* __restrict gw, int64_t n, float scale, float lo, \
   float hi, double* __restrict sums)
#define SGSC_BACKWARD_ARGS (g, w, gw, n, scale, lo, hi, sums)
SGSC_ALWAYS_INLINE void backward_block_floor_body SGSC_BACKWARD_PARAMS {
  backward_block<Rounding::kFloor> SGSC_BACKWARD_ARGS;
}
SGSC_ALWAYS_INLINE void backward_block_nearest_body SGSC_BACKWARD_PARAMS {
  backward_block<Rounding::kNearest> SGSC_BACKWARD_ARGS;
}
SGSC_CLONES(void, backward_block_floor, SGSC_BACKWARD_PARAMS, SGSC_BACKWARD_ARGS)
SGSC_CLONES(void, backward_block_nearest, SGSC_BACKWARD_PARAMS, SGSC_BACKWARD_ARGS)

using BackwardBlockFn = void (*)(const float*, const float*, float*, int64_t, float, float, float, double*);

std::array<double, 2> backward_span(BackwardBlockFn block_fn, const float* g, const float* w, float* gw,
                                    int64_t n, float scale, float lo, float hi) {
  std::array<double, 2> sums = {0.0, 0.0};
  for (int64_t begin = 0; begin < n; begin += kBlock) {
    block_fn(g + begin, w + begin, gw + begin, std::min(kBlock, n - begin), scale, lo, hi, sums.data());
  }
  return sums;
}

// ---- drivers -------------------------------------------------------------------------------

// Every group is cut into chunks of at most kChunk elements; a task is one (group, chunk) pair.
struct Tiling {
  int64_t groups, group_len, chunks_per_group;
  int64_t tasks() const { return groups * chunks_per_group; }
  int64_t group(int64_t task) const { return task / chunks_per_group; }
  int64_t begin(int64_t task) const { return group(task) * group_len + (task % chunks_per_group) * kChunk; }
  int64_t length(int64_t task) const {
    return std::min(kChunk, group_len - (task % chunks_per_group) * kChunk);
  }
};

Tiling make_tiling(const Tensor& w, int64_t groups) {
  int64_t group_len = w.numel() / groups;
  return {groups, group_len, std::max<int64_t>(1, (group_len + kChunk - 1) / kChunk)};
}

int64_t task_grain(const Tiling& tiling) {
  // Keep tiny tensors on one thread, where waking the pool costs more than the work.
  return std::max<int64_t>(1, kChunk / std::max<int64_t>(1, tiling.group_len));
}

// Float32 view of one chunk: the pointer itself for float32, a converted copy for narrow dtypes.
template <typename scalar_t>
struct FloatSpan {
  std::vector<float> storage;
  const float* load(const scalar_t* src, int64_t n) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      return src;
    } else {
      storage.resize(n);
      for (int64_t i = 0; i < n; ++i) storage[i] = static_cast<float>(src[i]);
      return storage.data();
    }
  }
  float* out(scalar_t* dst, int64_t n) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      return dst;
    } else {
      storage.resize(n);
      return storage.data();
    }
  }
  void store(scalar_t* dst, int64_t n) {
    if constexpr (!std::is_same_v<scalar_t, float>) {
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(storage[i]);
    }
  }
};

void forward_into(const Tensor& w, const Tensor& b, const Tensor& e, Rounding rounding,
                  Tensor& q) {
  if (w.numel() == 0) return;
  const std::vector<Group> constants = group_constants(b, e);
  Tiling tiling = make_tiling(w, b.size(0));
  auto span_fn = rounding == Rounding::kFloor ? forward_span_floor : forward_span_nearest;
  dispatch_weight_type(w.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    const auto* w_ptr = static_cast<const scalar_t*>(w.const_data_ptr());
    auto* q_ptr = static_cast<scalar_t*>(q.mutable_data_ptr());
    parallel_for(0, tiling.tasks(), task_grain(tiling), [&](int64_t first, int64_t last) {
      FloatSpan<scalar_t> in, out;
      for (int64_t task = first; task < last; ++task) {
        int64_t g = tiling.group(task), begin = tiling.begin(task), n = tiling.length(task);
        const Group& k = constants[g];
        if (k.pruned) {
          std::fill(q_ptr + begin, q_ptr + begin + n, scalar_t(0));
          continue;
        }
        const float* src = in.load(w_ptr + begin, n);
        span_fn(src, out.out(q_ptr + begin, n), n, k.scale, k.inv_scale, k.lo, k.hi);
        out.store(q_ptr + begin, n);
      }
    });
  });
}

Tensor fake_quantize_cpu(const Tensor& w, const Tensor& b, const Tensor& e,
                         std::string_view rounding) {
  check_inputs(w, b, e);
  Tensor w_contig = as_contiguous(w);
  Tensor q = empty_output(w_contig.sizes(), w_contig.scalar_type(), w_contig);
  forward_into(w_contig, as_contiguous(b), as_contiguous(e), parse_rounding(rounding), q);
  return q;
}

void fake_quantize_out_cpu(const Tensor& w, const Tensor& b, const Tensor& e,
                           std::string_view rounding, Tensor out) {
  check_inputs(w, b, e);
  SGSC_CHECK_VALUE(out.sizes().equals(w.sizes()) && out.scalar_type() == w.scalar_type() && same_device(out, w),
                   "sgsc.fake_quantize: out must match w's shape, dtype and device");
  SGSC_CHECK_VALUE(out.is_contiguous(), "sgsc.fake_quantize: out must be contiguous");
  forward_into(as_contiguous(w), as_contiguous(b), as_contiguous(e), parse_rounding(rounding), out);
}

std::tuple<Tensor, Tensor, Tensor> fake_quantize_backward_cpu(
    const Tensor& grad_q, const Tensor& w, const Tensor& b, const Tensor& e,
    std::string_view rounding) {
  check_inputs(w, b, e);
  SGSC_CHECK_VALUE(grad_q.sizes().equals(w.sizes()) && same_device(grad_q, w),
                   "sgsc.fake_quantize backward: grad_q (shape ", grad_q.sizes(), " on ", grad_q.device(),
                   ") does not match w (shape ", w.sizes(), " on ", w.device(), ")");
  Tensor w_contig = as_contiguous(w);
  Tensor g_contig = as_contiguous(to_dtype(grad_q, w.scalar_type()));
  Tensor grad_w = empty_output(w_contig.sizes(), w_contig.scalar_type(), w_contig);
  Tensor grad_b = zeros_like(b);
  Tensor grad_e = zeros_like(e);
  if (w.numel() == 0) return {grad_w, grad_b, grad_e};

  const std::vector<Group> constants = group_constants(as_contiguous(b), as_contiguous(e));
  Tiling tiling = make_tiling(w_contig, b.size(0));
  BackwardBlockFn block_fn =
      parse_rounding(rounding) == Rounding::kFloor ? backward_block_floor : backward_block_nearest;
  // Partial sums per task, added up in task order afterwards: the result does not depend on
  // how many threads ran or how the tasks were split between them.
  std::vector<std::array<double, 2>> partial(tiling.tasks(), {0.0, 0.0});

  dispatch_weight_type(w.scalar_type(), [&](auto element) {
    using scalar_t = decltype(element);
    const auto* w_ptr = static_cast<const scalar_t*>(w_contig.const_data_ptr());
    const auto* g_ptr = static_cast<const scalar_t*>(g_contig.const_data_ptr());
    auto* gw_ptr = static_cast<scalar_t*>(grad_w.mutable_data_ptr());
    parallel_for(0, tiling.tasks(), task_grain(tiling), [&](int64_t first, int64_t last) {
      FloatSpan<scalar_t> w_in, g_in, gw_out;
      for (int64_t task = first; task < last; ++task) {
        int64_t g = tiling.group(task), begin = tiling.begin(task), n = tiling.length(task);
        const Group& k = constants[g];
        if (k.pruned) {
          std::fill(gw_ptr + begin, gw_ptr + begin + n, scalar_t(0));
          continue;
        }
        partial[task] = backward_span(block_fn, g_in.load(g_ptr + begin, n), w_in.load(w_ptr + begin, n),
                                gw_out.out(gw_ptr + begin, n), n, k.scale, k.lo, k.hi);
        gw_out.store(gw_ptr + begin, n);
      }
    });
  });

  float* grad_b_ptr = grad_b.mutable_data_ptr<float>();
  float* grad_e_ptr = grad_e.mutable_data_ptr<float>();
  for (int64_t g = 0; g < tiling.groups; ++g) {
    const Group& k = constants[g];
    if (k.pruned) continue;
    double sum_e = 0.0, sum_b = 0.0;
    for (int64_t c = 0; c < tiling.chunks_per_group; ++c) {
      sum_e += partial[g * tiling.chunks_per_group + c][0];
      sum_b += partial[g * tiling.chunks_per_group + c][1];
    }
    double step = kLn2 * static_cast<double>(k.inv_scale);
    grad_e_ptr[g] = static_cast<float>(step * sum_e);
    grad_b_ptr[g] = static_cast<float>(step * static_cast<double>(-k.lo) * sum_b);
  }
  return {grad_w, grad_b, grad_e};
}

}  // namespace

STABLE_TORCH_LIBRARY_IMPL(sgsc, CPU, m) {
  m.impl("fake_quantize", TORCH_BOX(&fake_quantize_cpu));
  m.impl("fake_quantize_out", TORCH_BOX(&fake_quantize_out_cpu));
  m.impl("fake_quantize_backward", TORCH_BOX(&fake_quantize_backward_cpu));
}

}  // namespace sgsc
