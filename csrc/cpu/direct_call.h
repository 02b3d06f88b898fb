// Every CPU kernel is reachable twice: through the dispatcher (torch.ops.peft_kernels.<op>: autograd,
// torch.compile, opcheck, and the CUDA kernels of the same op) and as a plain function
// peft_kernels._C.<op> that eager inference calls (peft_kernels/ops/_dispatch.py). The plain call skips
// torch.ops' boxed dispatch, which in a model's decode step on a 2-core CPU (cold caches between layers)
// cost about as much as the LoRA kernel itself.
//
//   PK_DIRECT_CALL(multi_lora_fwd, peft_kernels::multi_lora_fwd_cpu);   // at namespace scope, once per op
//
// The function runs with the GIL released; a c10::Error becomes a RuntimeError with the message that
// torch.ops would give (no C++ backtrace).
#pragma once

#include <pybind11/pybind11.h>
#include <torch/csrc/utils/pybind.h>

#include <stdexcept>
#include <vector>

namespace peft_kernels {

using DirectBinder = void (*)(pybind11::module_&);

// The binders of every translation unit, run by peft_kernels._C's module init (registration.cpp).
std::vector<DirectBinder>& direct_binders();

struct DirectCallRegistrar {
  explicit DirectCallRegistrar(DirectBinder binder) { direct_binders().push_back(binder); }
};

template <typename Signature, Signature* Fn>
struct DirectCall;

template <typename R, typename... Args, R (*Fn)(Args...)>
struct DirectCall<R(Args...), Fn> {
  static R call(Args... args) {
    pybind11::gil_scoped_release no_gil;
    try {
      return Fn(args...);
    } catch (const c10::Error& e) {
      throw std::runtime_error(e.what_without_backtrace());
    }
  }
};

}  // namespace peft_kernels

#define PK_DIRECT_CALL(name, fn)                                                                      \
  static const ::peft_kernels::DirectCallRegistrar pk_direct_call_##name([](pybind11::module_& m) { \
    m.def(#name, &::peft_kernels::DirectCall<decltype(fn), fn>::call);                              \
  })
