"""Build and install revgn_ext, compiling the ops on the fly.

    pip install --no-build-isolation .     # the build needs the torch you already have

* CUDAExtension when nvcc and a CUDA build of torch are present, or when REVGN_FORCE_CUDA=1;
* CppExtension otherwise;
* REVGN_NO_EXT=1 installs the pure-Python package (reference ops) without compiling.
TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured as in torch.utils.cpp_extension.
"""
import os
import runpy
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
build = runpy.run_path(str(ROOT / "revgn_ext" / "_build.py"))

ext_modules = []
cmdclass = {}
if os.environ.get("REVGN_NO_EXT", "0") != "1":
    with_cuda = build["want_cuda"]()
    if with_cuda and not os.environ.get("CUDA_HOME") and build["cuda_home"]():
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = build["cuda_home"]()
    if with_cuda:
        build["ensure_cuda_arch_list"]()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    srcs = [os.path.relpath(s, ROOT) for s in build["sources"](with_cuda)]
    args = build["compile_args"](with_cuda, debug=os.environ.get("REVGN_DEBUG", "0") == "1")
    if with_cuda:
        ext = CUDAExtension("revgn_ext._C", srcs, extra_compile_args=args,
                            include_dirs=build["cuda_include_dirs"]())
    else:
        ext = CppExtension("revgn_ext._C", srcs, extra_compile_args=args)
    ext_modules = [ext]
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}

setup(
    name="revgn_ext",
    version="0.1.0",
    description="Exact Gauss-Newton optimisation for PyTorch: RevGN for reversible MLPs and EGN for any "
                "nn.Module, with fused C++/CUDA kernels",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["revgn_ext", "revgn_ext.*"]) + ["revgn_ext._csrc"],
    # The kernel sources travel with the package so that REVGN_JIT=1 can build them after install.
    package_dir={"revgn_ext._csrc": "csrc"},
    package_data={"revgn_ext._csrc": ["*.cpp", "*.h", "cuda/*.cpp", "cuda/*.cu", "cuda/*.h"],
                  # tuned learning rates of the experiments, with the command that produced them
                  "revgn_ext.experiments": ["tuned/*.json"]},
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "experiments": ["tqdm", "matplotlib", "scikit-learn", "pytorch-optimizer"],
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "tqdm", "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
