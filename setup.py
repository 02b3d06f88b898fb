"""Native extensions of peft_kernels (metadata lives in pyproject.toml).

    MAX_JOBS=2 pip install --no-build-isolation -e .   # builds _C, and _C_cuda when CUDA is usable
    PEFT_KERNELS_NO_CUDA=1 pip install --no-build-isolation -e .   # _C only

_C (csrc/cpu, C++/OpenMP) defines the ops and their CPU kernels; _C_cuda (csrc/cuda) adds CUDA
kernels. A missing or failing CUDA toolchain never stops _C from building.
"""
import copy
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import cuda_env  # noqa: E402

CPU_EXT, CUDA_EXT = "peft_kernels._C", "peft_kernels._C_cuda"

env = cuda_env.discover()
if env["BUILD_CUDA"]:
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported, and the arch list when it builds.
    os.environ["CUDA_HOME"] = env["CUDA_HOME"]
    os.environ["TORCH_CUDA_ARCH_LIST"] = env["TORCH_CUDA_ARCH_LIST"]
    print(f"peft_kernels: CUDA {env['CUDA_VERSION']} at {env['CUDA_HOME']} ({env['CUDA_FOUND_BY']}), "
          f"archs {env['TORCH_CUDA_ARCH_LIST']}")
else:
    print(f"peft_kernels: building {CPU_EXT} only: {env['WHY_NO_CUDA']}")

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def sources(*patterns):
    return sorted(path for pattern in patterns for path in glob.glob(pattern, root_dir=ROOT))


class BuildExtensions(BuildExtension):
    """BuildExtension that drops _C_cuda, instead of failing, when its toolchain check or build fails."""

    def build_extension(self, ext):
        self._building = ext.name
        super().build_extension(ext)

    def build_extensions(self):
        args = {ext.name: copy.deepcopy(ext.extra_compile_args) for ext in self.extensions}
        self._building = None  # stays None if the toolchain check before any compile fails
        try:
            super().build_extensions()
        except Exception as err:
            cuda = [ext for ext in self.extensions if ext.name == CUDA_EXT]
            if not cuda or self._building not in (None, CUDA_EXT):
                raise
            print(f"WARNING peft_kernels: {CUDA_EXT} failed, building {CPU_EXT} only: {err}", file=sys.stderr)
            self.extensions.remove(cuda[0])
            for ext in self.extensions:  # undo the flags the first attempt appended, so ninja reuses its objects
                ext.extra_compile_args = args[ext.name]
            super().build_extensions()

    def run(self):
        super().run()
        if self.inplace and all(ext.name != CUDA_EXT for ext in self.extensions):
            for stale in glob.glob(os.path.join(ROOT, "peft_kernels", "_C_cuda.*")):
                print(f"peft_kernels: removing stale {stale}")
                os.remove(stale)


ext_modules = [
    CppExtension(
        CPU_EXT,
        sources("csrc/cpu/*.cpp"),
        extra_compile_args={"cxx": ["-O3", "-fopenmp"]},
        extra_link_args=["-fopenmp"],
    )
]
if env["BUILD_CUDA"]:
    ext_modules.append(
        CUDAExtension(
            CUDA_EXT,
            sources("csrc/cuda/*.cu", "csrc/cuda/*.cpp"),
            include_dirs=env["CUDA_INCLUDE_DIRS"].split(";"),
            library_dirs=[env["CUDA_LIB_DIR"]],
            # module.cpp only: nvcc would split a -D value at its commas.
            extra_compile_args={
                "cxx": ["-O3", "-DPEFT_KERNELS_CUDA_ARCHS=" + env["TORCH_CUDA_ARCH_LIST"].replace(";", ",")],
                "nvcc": ["-O3"],
            },
        )
    )

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtensions})
