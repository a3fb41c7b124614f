"""Build revgn_ext, compiling the ops ahead of time. The package metadata lives in pyproject.toml.

    pip install .                          # isolated build: pip brings torch for the build
    pip install --no-build-isolation .     # build against the torch already installed (matching ABI)

* The C++ CPU kernels always; the CUDA kernels when a GPU is visible (with nvcc and a CUDA torch), or
  when TORCH_CUDA_ARCH_LIST or REVGN_FORCE_CUDA=1 asks for them. REVGN_NO_CUDA=1 skips CUDA.
* REVGN_NO_EXT=1, or a build where torch cannot be imported, installs the pure-Python package: the ops
  then run their pure-PyTorch references (REVGN_JIT=1 compiles the kernels on first use instead).
TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured as in torch.utils.cpp_extension.
"""
import os
import runpy
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
build = runpy.run_path(str(ROOT / "revgn_ext" / "ops" / "_build.py"))


def extensions():
    if os.environ.get("REVGN_NO_EXT", "0") == "1":
        print("revgn_ext: REVGN_NO_EXT=1, installing the pure-Python package (reference ops)", file=sys.stderr)
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension  # noqa: F401
    except ImportError as exc:
        print(f"revgn_ext: torch cannot be imported at build time ({exc}); installing the pure-Python "
              "package, whose ops run their pure-PyTorch references. For the compiled kernels install "
              "torch first, then `pip install --no-build-isolation .` (or set REVGN_JIT=1 to compile "
              "them on first use).", file=sys.stderr)
        return [], {}
    with_cuda = build["want_cuda"]()
    if with_cuda and not os.environ.get("CUDA_HOME") and build["cuda_home"]():
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = build["cuda_home"]()
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    if with_cuda:
        build["ensure_cuda_arch_list"]()
    print(build["describe"](with_cuda), file=sys.stderr, flush=True)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    srcs = [os.path.relpath(s, ROOT) for s in build["sources"](with_cuda)]
    args = build["compile_args"](with_cuda, debug=os.environ.get("REVGN_DEBUG", "0") == "1")
    if with_cuda:
        ext = CUDAExtension("revgn_ext._C", srcs, extra_compile_args=args,
                            include_dirs=build["cuda_include_dirs"]())
    else:
        ext = CppExtension("revgn_ext._C", srcs, extra_compile_args=args)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
PURE_MARKER = "_pure_python"  # read by revgn_ext/ops/_loader.py


class BuildPy(build_py):
    """Marks a pure-Python build, so that importing it uses the references without a warning."""

    def run(self):
        super().run()
        marker = Path(self.build_lib) / "revgn_ext" / PURE_MARKER
        if not ext_modules:
            marker.write_text("installed without compiled kernels: the ops run their pure-PyTorch references\n")
        elif marker.exists():  # left in build/ by an earlier pure-Python build of this tree
            marker.unlink()


cmdclass["build_py"] = BuildPy

setup(
    packages=find_packages(include=["revgn_ext", "revgn_ext.*"]) + ["revgn_ext._csrc"],
    # The kernel sources travel with the package so that REVGN_JIT=1 can build them after install.
    package_dir={"revgn_ext._csrc": "csrc"},
    package_data={"revgn_ext": ["py.typed"],
                  "revgn_ext._csrc": ["*.cpp", "*.h", "*/*.cpp", "*/*.h", "*/cuda/*.cpp", "*/cuda/*.cu",
                                      "*/cuda/*.h"],
                  # tuned learning rates of the experiments, with the command that produced them
                  "revgn_ext.experiments.revgn_paper": ["tuned/*.json"],
                  "revgn_ext.experiments.egn_paper": ["tuned/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
