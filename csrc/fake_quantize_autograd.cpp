// Autograd of sgsc::fake_quantize for every device, in C++.
//
// The same straight-through backward could be registered from Python (sgsc/ops/library.py does so when
// this extension is missing), but there the autograd wrapper costs ~150 us per forward+backward,
// several times the kernels' own time on a layer-sized weight. This node calls the forward and
// backward ops through the dispatcher, so CPU (C++) and CUDA (Triton) kernels, and the fake
// kernels torch.compile traces with, are all reached the same way.

#include <torch/extension.h>

#include <ATen/core/dispatch/Dispatcher.h>

#include <string>
#include <tuple>

namespace sgsc {
namespace {

at::Tensor dispatch_forward(const at::Tensor& w, const at::Tensor& b, const at::Tensor& e,
                            c10::string_view rounding) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sgsc::fake_quantize", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::string_view)>();
  return op.call(w, b, e, rounding);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dispatch_backward(const at::Tensor& grad_q, const at::Tensor& w,
                                                                 const at::Tensor& b, const at::Tensor& e,
                                                                 c10::string_view rounding) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("sgsc::fake_quantize_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           c10::string_view)>();
  return op.call(grad_q, w, b, e, rounding);
}

class FakeQuantize : public torch::autograd::Function<FakeQuantize> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& w, const at::Tensor& b,
                            const at::Tensor& e, const std::string& rounding) {
    ctx->saved_data["rounding"] = rounding;
    ctx->save_for_backward({w, b, e});
    // Below the autograd keys, so the call reaches the device (or fake) kernel, not this node again.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return dispatch_forward(w, b, e, rounding);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    auto [grad_w, grad_b, grad_e] =
        dispatch_backward(grad_outputs[0], saved[0], saved[1], saved[2], ctx->saved_data["rounding"].toStringRef());
    auto needed = [&](size_t input, at::Tensor grad) { return ctx->needs_input_grad(input) ? grad : at::Tensor(); };
    return {needed(0, grad_w), needed(1, grad_b), needed(2, grad_e), at::Tensor()};
  }
};

// The gradients are linear in grad_q, so a second derivative is not zero; rather than let autograd
// treat this op as constant (a silently wrong double backward), any attempt is an error.
class FakeQuantizeBackward : public torch::autograd::Function<FakeQuantizeBackward> {
 public:
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& grad_q,
                                                const at::Tensor& w, const at::Tensor& b, const at::Tensor& e,
                                                const std::string& rounding) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [grad_w, grad_b, grad_e] = dispatch_backward(grad_q, w, b, e, rounding);
    return {grad_w, grad_b, grad_e};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    TORCH_CHECK_NOT_IMPLEMENTED(false,
                                "sgsc.fake_quantize: double backward (differentiating its gradients, e.g. "
                                "create_graph=True) is not supported");
  }
};

at::Tensor fake_quantize_autograd(const at::Tensor& w, const at::Tensor& b, const at::Tensor& e,
                                  c10::string_view rounding) {
  return FakeQuantize::apply(w, b, e, std::string(rounding));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quantize_backward_autograd(const at::Tensor& grad_q,
                                                                              const at::Tensor& w,
                                                                              const at::Tensor& b,
                                                                              const at::Tensor& e,
                                                                              c10::string_view rounding) {
  auto grads = FakeQuantizeBackward::apply(grad_q, w, b, e, std::string(rounding));
  return {grads[0], grads[1], grads[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(sgsc, Autograd, m) {
  m.impl("fake_quantize", &fake_quantize_autograd);
  m.impl("fake_quantize_backward", &fake_quantize_backward_autograd);
}

}  // namespace sgsc
