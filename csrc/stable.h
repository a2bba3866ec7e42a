// What the CPU kernels use of torch, all of it from the LibTorch stable ABI (torch/csrc/stable and
// torch/headeronly): tensors, the ops that allocate them, parallel loops and argument checks.
//
// Nothing here or in the kernels names a C++ symbol of libtorch, whose layout changes with every
// minor release; the library only calls the stable C shim (aoti_torch_*, torch_*), which later
// releases keep. So one build, made against the lowest supported torch (setup.py's
// TORCH_TARGET_VERSION), loads beside every later one.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace sgsc {

using Tensor = torch::stable::Tensor;
using ScalarType = torch::headeronly::ScalarType;
using IntArrayRef = torch::headeronly::IntHeaderOnlyArrayRef;
using Half = c10::Half;
using BFloat16 = c10::BFloat16;

constexpr ScalarType kFloat = ScalarType::Float;
constexpr ScalarType kHalf = ScalarType::Half;
constexpr ScalarType kBFloat16 = ScalarType::BFloat16;
constexpr ScalarType kByte = ScalarType::Byte;
constexpr ScalarType kInt = ScalarType::Int;
constexpr ScalarType kLong = ScalarType::Long;

// ---- messages: shapes and devices printed as ATen prints them (dtypes: torch/headeronly) ---------------------------

inline std::ostream& operator<<(std::ostream& out, IntArrayRef shape) {
  out << '[';
  for (size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  return out << ']';
}

inline std::ostream& operator<<(std::ostream& out, const torch::stable::Device& device) {
  switch (device.type()) {
    case torch::headeronly::DeviceType::CPU: out << "cpu"; break;
    case torch::headeronly::DeviceType::CUDA: out << "cuda"; break;
    case torch::headeronly::DeviceType::Meta: out << "meta"; break;
    default: out << "device type " << static_cast<int>(device.type());
  }
  if (device.has_index()) out << ':' << static_cast<int>(device.index());
  return out;
}

template <typename... Args>
std::string message(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

}  // namespace sgsc

// Argument checks. An exception crosses the stable ABI by its C++ type alone: torch turns
// std::invalid_argument into Python's ValueError and std::out_of_range into IndexError, but has no
// standard type that becomes TypeError (that needs c10::TypeError, a libtorch symbol). A wrong dtype
// therefore raises ValueError from the op itself; the public wrappers (sgsc/ops/functional.py,
// sgsc/ops/packed.py) check dtypes first and raise TypeError, as before.
#define SGSC_CHECK_VALUE(cond, ...) \
  if (!(cond)) throw std::invalid_argument(::sgsc::message(__VA_ARGS__))
#define SGSC_CHECK_TYPE(cond, ...) SGSC_CHECK_VALUE(cond, __VA_ARGS__)
#define SGSC_CHECK_INDEX(cond, ...) \
  if (!(cond)) throw std::out_of_range(::sgsc::message(__VA_ARGS__))

namespace sgsc {

inline bool same_device(const Tensor& a, const Tensor& b) { return a.device() == b.device(); }

inline Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }

inline Tensor to_dtype(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}

// A contiguous tensor on like's device, through the shim's aoti_torch_empty_strided: one C call, where
// torch::stable::empty finds aten::empty in the dispatcher by name and boxes its arguments (about 1 us a
// call on Zen 4, as much as a 64x64 layer's whole product).
inline Tensor empty(IntArrayRef shape, ScalarType dtype, const Tensor& like) {
  std::vector<int64_t> strides(shape.size(), 1);
  for (int64_t d = static_cast<int64_t>(shape.size()) - 2; d >= 0; --d) strides[d] = strides[d + 1] * shape[d + 1];
  int32_t device_type = 0, device_index = 0;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_type(like.get(), &device_type));
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_device_index(like.get(), &device_index));
  const int32_t shim_dtype = torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype));
  AtenTensorHandle out = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(static_cast<int64_t>(shape.size()), shape.data(),
                                                         strides.data(), shim_dtype, device_type, device_index,
                                                         &out));
  return Tensor(out);
}

inline Tensor zeros_like(const Tensor& t) { return torch::stable::new_zeros(t, t.sizes()); }

// aten::exp2_ through the dispatcher, the very kernel the PyTorch reference's torch.exp2 runs.
inline void exp2_(Tensor& t) {
  std::array<StableIValue, 1> stack{torch::stable::detail::from(t)};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher("aten::exp2_", "", stack.data(), TORCH_ABI_VERSION));
  torch::stable::detail::to<Tensor>(stack[0]);  // takes the returned handle, released here
}

// torch's intra-op parallel loop (at::parallel_for inside libtorch, so its OpenMP runtime: this
// library is built without OpenMP of its own).
template <class F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  if (begin >= end) return;
  torch::stable::parallel_for(begin, end, grain, f);
}

inline int64_t num_threads() { return static_cast<int64_t>(torch::stable::get_num_threads()); }

// The index of the calling thread within torch's parallel loop (0 outside one, and on its first thread).
inline int64_t thread_index() {
  uint32_t index = 0;
  STABLE_TORCH_ERROR_CODE_CHECK(torch_get_thread_idx(&index));
  return index;
}

}  // namespace sgsc
