"""CUDA and torch discovery shared by setup.py and CMakeLists.txt.

    python tools/cuda_env.py           # human-readable KEY=VALUE lines
    python tools/cuda_env.py --cmake   # set(PK_KEY "value") lines that CMakeLists.txt include()s

Importing this module imports torch but not torch.utils.cpp_extension, so setup.py can set
CUDA_HOME from `discover()` before cpp_extension reads it.
"""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

DEFAULT_ARCH_LIST = "8.0;9.0a"  # no GPU to detect on the build machine: A100 + H100/H200


def find_cuda_home():
    """Return (toolkit root or None, how it was found)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"], "CUDA_HOME"
    nvcc = shutil.which("nvcc")
    if nvcc:
        nvcc = os.path.realpath(nvcc)
        real = _nvcc_from_wrapper(nvcc) or nvcc
        return os.path.dirname(os.path.dirname(real)), f"nvcc on PATH ({nvcc})"
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return os.path.realpath("/usr/local/cuda"), "/usr/local/cuda"
    return None, "no CUDA_HOME, no nvcc on PATH, no /usr/local/cuda"


def _nvcc_from_wrapper(path):
    """If `path` is a shell script that execs the real nvcc, return that nvcc's path."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head.startswith(b"#!"):
        return None
    for match in re.findall(rb"""[^\s'"]*/bin/nvcc\b""", head):
        real = os.path.realpath(match.decode())
        if real != path and os.access(real, os.X_OK):
            return real
    return None


def nvcc_version(cuda_home):
    try:
        out = subprocess.run([os.path.join(cuda_home, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


# Math-library headers that ATen/cuda/CUDAContext.h includes; a bare toolkit may lack them.
TORCH_CUDA_HEADERS = ("cublas_v2.h", "cublasLt.h", "cusparse.h", "cusolverDn.h")


def nvidia_wheel_dirs(sub):
    """`sub` folders of the nvidia-* wheels in site-packages."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    return sorted(d for root in roots for d in glob.glob(os.path.join(root, "*", sub)) if os.path.isdir(d))


def extra_include_dirs(cuda_home):
    """Wheel include dirs that supply the TORCH_CUDA_HEADERS missing from the toolkit."""
    missing = [h for h in TORCH_CUDA_HEADERS if not os.path.exists(os.path.join(cuda_home, "include", h))]
    return [d for d in nvidia_wheel_dirs("include") if any(os.path.exists(os.path.join(d, h)) for h in missing)]


def nvrtc_library(cuda_home):
    candidates = [f for d in nvidia_wheel_dirs("lib") for f in glob.glob(os.path.join(d, "libnvrtc.so.*"))
                  if re.search(r"libnvrtc\.so\.\d+$", f)]
    candidates += glob.glob(os.path.join(cuda_home, "lib64", "libnvrtc.so"))
    return candidates[0] if candidates else ""


def arch_list():
    value = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH_LIST
    return ";".join(a for a in re.split(r"[;\s]+", value) if a)


def discover():
    """Everything both build systems need, as a dict of plain values."""
    import torch

    info = {
        "TORCH_VERSION": torch.__version__,
        "TORCH_CMAKE_PREFIX_PATH": torch.utils.cmake_prefix_path,
        "TORCH_LIB_DIR": os.path.join(os.path.dirname(torch.__file__), "lib"),
        "TORCH_INCLUDE_DIRS": ";".join(os.path.join(os.path.dirname(torch.__file__), "include", *sub)
                                       for sub in ((), ("torch", "csrc", "api", "include"))),
        "TORCH_CXX11_ABI": int(torch._C._GLIBCXX_USE_CXX11_ABI),
        # Older torch exposes its pybind11 ABI tags; cpp_extension passes them as defines, CMake must too.
        "PYBIND11_ABI_DEFINES": ";".join(
            f'PYBIND11_{k}="{getattr(torch._C, f"_PYBIND11_{k}")}"'
            for k in ("COMPILER_TYPE", "STDLIB", "BUILD_ABI")
            if getattr(torch._C, f"_PYBIND11_{k}", None) is not None),
        "TORCH_CUDA": torch.version.cuda or "",
        "BUILD_CUDA": False,
        "WHY_NO_CUDA": "",
    }
    cuda_home, how = find_cuda_home()
    if os.environ.get("PEFT_KERNELS_NO_CUDA") == "1":
        info["WHY_NO_CUDA"] = "PEFT_KERNELS_NO_CUDA=1"
    elif not torch.version.cuda:
        info["WHY_NO_CUDA"] = f"torch {torch.__version__} is not a CUDA build"
    elif cuda_home is None:
        info["WHY_NO_CUDA"] = f"CUDA toolkit not found: {how}"
    elif not os.access(os.path.join(cuda_home, "bin", "nvcc"), os.X_OK):
        info["WHY_NO_CUDA"] = f"no executable nvcc in {cuda_home}/bin (found via {how})"
    else:
        version = nvcc_version(cuda_home)
        if version is None:
            info["WHY_NO_CUDA"] = f"{cuda_home}/bin/nvcc --version failed"
        elif version.split(".")[0] != torch.version.cuda.split(".")[0]:
            info["WHY_NO_CUDA"] = f"nvcc {version} in {cuda_home} does not match torch's CUDA {torch.version.cuda}"
        else:
            info.update(
                BUILD_CUDA=True,
                CUDA_HOME=cuda_home,
                CUDA_FOUND_BY=how,
                CUDA_VERSION=version,
                NVCC=os.path.join(cuda_home, "bin", "nvcc"),
                # The toolkit's own include dir first, so the wheels only fill in what it lacks.
                CUDA_INCLUDE_DIRS=";".join([os.path.join(cuda_home, "include")] + extra_include_dirs(cuda_home)),
                CUDA_LIB_DIR=os.path.join(cuda_home, "lib64"),
                NVRTC_LIBRARY=nvrtc_library(cuda_home),
                TORCH_CUDA_ARCH_LIST=arch_list(),
            )
    return info


def _cmake_quote(value):
    value = "ON" if value is True else "OFF" if value is False else str(value)
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def main(argv):
    info = discover()
    for key, value in info.items():
        print(f"set(PK_{key} {_cmake_quote(value)})" if "--cmake" in argv else f"{key}={value}")


if __name__ == "__main__":
    main(sys.argv[1:])
