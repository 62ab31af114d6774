"""Builds attnkit._C (C++, always) and attnkit._C_cuda (CUDA, when nvcc and a
CUDA build of torch are present, GPU or not).

Environment:
  TORCH_CUDA_ARCH_LIST   GPU architectures to compile for (default below).
  ATTNKIT_BUILD_CUDA     0 skips the CUDA extension; 1 requires it (a failure
                         then fails the install instead of a warning).
  ATTNKIT_REQUIRE_CUDA   same as ATTNKIT_BUILD_CUDA=1.
  MAX_JOBS               parallel compile jobs (torch's ninja builder).
  ATTNKIT_NO_EXTENSIONS  1 builds no extension: the Python package alone. `make
                         gpu-check` installs it so on a bare machine, then
                         builds once, for the GPU present (pip -e recompiles
                         everything each time: a full first build would be wasted).
"""
import glob
import json
import os
import shutil
import sys
import traceback

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0"


def find_cuda_home():
    """The toolkit holding nvcc. torch guesses /usr/local when nvcc is a wrapper
    script in /usr/local/bin, so look at the usual places ourselves first."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


CUDA_HOME = find_cuda_home()
if CUDA_HOME and not os.environ.get("CUDA_HOME"):
    os.environ["CUDA_HOME"] = CUDA_HOME  # read by torch.utils.cpp_extension at import

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def env_flag(name):
    value = os.environ.get(name)
    return None if value is None or value == "" else value.lower() not in ("0", "false", "no", "off")


def cuda_wanted():
    """(build it?, required?, reason when not built)."""
    required = bool(env_flag("ATTNKIT_REQUIRE_CUDA")) or env_flag("ATTNKIT_BUILD_CUDA") is True
    if env_flag("ATTNKIT_BUILD_CUDA") is False:
        return False, False, "skipped: ATTNKIT_BUILD_CUDA=0 at install time"
    if torch.version.cuda is None:
        return False, required, f"skipped: torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None:
        return False, required, "skipped: nvcc not found (set CUDA_HOME) at install time"
    return True, required, None


def nvidia_wheel_include_dirs():
    """Headers the pip CUDA wheels ship (cuBLAS, cuSPARSE, ...) that a bare
    toolkit install may lack; ATen's CUDA headers include them."""
    dirs = []
    for path in sys.path:
        dirs += glob.glob(os.path.join(path, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


# The C++ standard is left to torch.utils.cpp_extension (C++17 or C++20 by torch version).
CXX_FLAGS = ["-O3", "-fopenmp"]
INCLUDE_DIRS = [os.path.join(HERE, "csrc", "include")]


def extensions():
    if env_flag("ATTNKIT_NO_EXTENSIONS"):
        return []
    exts = [
        CppExtension(
            "attnkit._C",
            sorted(glob.glob("csrc/cpu/*.cpp")),
            include_dirs=INCLUDE_DIRS,
            extra_compile_args={"cxx": CXX_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    ]
    build_cuda, _, _ = cuda_wanted()
    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
        exts.append(
            CUDAExtension(
                "attnkit._C_cuda",
                sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")),
                include_dirs=INCLUDE_DIRS + nvidia_wheel_include_dirs(),
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "--use_fast_math"]},
                extra_link_args=["-fopenmp"],
            )
        )
    return exts


class BuildExtensionReportingCuda(BuildExtension):
    """Builds the optional CUDA extension without letting its failure stop the
    install (unless required), and records in attnkit/_build_info.json what was
    built and why not, so attnkit.available_backends() can say."""

    def run(self):
        self.build_info = {"torch": torch.__version__, "cuda_arch_list": None, "extensions": {}}
        super().run()
        self.write_build_info()

    def build_extension(self, ext):
        if ext.name != "attnkit._C_cuda":
            super().build_extension(ext)
            self.build_info["extensions"][ext.name] = None
            return
        self.build_info["cuda_arch_list"] = os.environ.get("TORCH_CUDA_ARCH_LIST")
        _, required, _ = cuda_wanted()
        try:
            super().build_extension(ext)
            self.build_info["extensions"][ext.name] = None
        except Exception as exc:  # a compiler error is reported, then the install goes on
            if required:
                raise
            reason = f"build failed: {type(exc).__name__}: {exc}"
            self.build_info["extensions"][ext.name] = reason
            bar = "=" * 78
            sys.stderr.write(
                f"\n{bar}\nattnkit: the optional CUDA extension attnkit._C_cuda FAILED to build;\n"
                f"the install continues without the cuda backend.\n{reason}\n"
                f"{traceback.format_exc()}\nRebuild with ATTNKIT_REQUIRE_CUDA=1 to make this an error.\n{bar}\n"
            )

    def write_build_info(self):
        _, _, reason = cuda_wanted()
        self.build_info["extensions"].setdefault("attnkit._C_cuda", reason)
        out_dir = os.path.dirname(self.get_ext_fullpath("attnkit._C"))
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
            json.dump(self.build_info, f, indent=1)


setup(
    # triton_kernels/ is installed inside attnkit: a top-level package of that
    # name belongs to another project. benchmarks/ likewise, as the benchmark
    # families `python -m attnkit.bench` runs.
    packages=find_packages(where="python") + ["attnkit.triton_kernels", "attnkit.benchmarks"],
    package_dir={"": "python", "attnkit.triton_kernels": "triton_kernels", "attnkit.benchmarks": "benchmarks"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtensionReportingCuda.with_options(use_ninja=True)},
    zip_safe=False,
)
