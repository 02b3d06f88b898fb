// peft_kernels._C: op schemas, their CPU kernels, the plain-function entries of the kernels (direct_call.h)
// and build_info().
#include "../multi_lora.h"
#include "direct_call.h"

#include <pybind11/pybind11.h>
#include <torch/library.h>
#include <torch/version.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <string>

TORCH_LIBRARY_FRAGMENT(peft_kernels, m) {
  m.def(
      "multi_lora_fwd(Tensor x, Tensor lora_a, Tensor lora_b, Tensor? adapter_index, Tensor scaling, "
      "Tensor? ranks, Tensor? base) -> Tensor");
}

TORCH_LIBRARY_IMPL(peft_kernels, CPU, m) {
  m.impl("multi_lora_fwd", &peft_kernels::multi_lora_fwd_cpu);
}

PK_DIRECT_CALL(multi_lora_fwd, peft_kernels::multi_lora_fwd_cpu);
PK_DIRECT_CALL(multi_lora_add_, peft_kernels::multi_lora_add_cpu);

namespace peft_kernels {

std::vector<DirectBinder>& direct_binders() {
  static std::vector<DirectBinder> binders;
  return binders;
}

}  // namespace peft_kernels

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
#ifdef _OPENMP
  info["openmp"] = true;
  info["omp_max_threads"] = omp_get_max_threads();
#else
  info["openmp"] = false;
  info["omp_max_threads"] = 1;
#endif
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                          "." + std::to_string(TORCH_VERSION_PATCH);
#if defined(__clang__)
  info["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = "gcc " __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["cplusplus"] = __cplusplus;
  info["multi_lora_isa"] = peft_kernels::multi_lora_cpu_isa();
  info["multi_lora_linear"] = peft_kernels::multi_lora_linear_available();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peft_kernels C++ (CPU) ops; importing this module registers them with torch.ops.peft_kernels";
  m.def("build_info", &build_info, "How this extension was built");
  for (const peft_kernels::DirectBinder bind : peft_kernels::direct_binders()) bind(m);
}
