// peft_kernels._C_cuda: build_info(); importing the module registers the CUDA kernels.
#include <cuda_runtime_api.h>
#include <pybind11/pybind11.h>
#include <torch/version.h>

#include <algorithm>
#include <string>

// The build passes TORCH_CUDA_ARCH_LIST with ',' for ';' (e.g. 8.0,9.0a): no quoting needed.
#define PK_STR(...) #__VA_ARGS__
#define PK_XSTR(...) PK_STR(__VA_ARGS__)

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  pybind11::list archs;
#ifdef PEFT_KERNELS_CUDA_ARCHS
  const std::string list = PK_XSTR(PEFT_KERNELS_CUDA_ARCHS);
  for (size_t start = 0, end; start < list.size(); start = end + 1) {
    end = std::min(list.find(',', start), list.size());
    archs.append(list.substr(start, end - start));
  }
#endif
  info["cuda_arch_list"] = archs;
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) +
                          "." + std::to_string(TORCH_VERSION_PATCH);
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "peft_kernels CUDA ops; import peft_kernels._C first (it defines the op schemas)";
  m.def("build_info", &build_info, "How this extension was built");
}
