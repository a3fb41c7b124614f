"""Build facts shared by setup.py (ahead-of-time) and the JIT path, so both compile the same thing.

This module imports nothing from the package: setup.py runs it as a plain file.
"""
from __future__ import annotations

import glob
import os
import shutil
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent  # revgn_ext/
ROOT = PACKAGE.parent
# In a source tree the kernels live in ROOT/csrc; an installed package carries a copy in _csrc.
CSRC = ROOT / "csrc" if (ROOT / "csrc" / "revgn.cpp").exists() else PACKAGE / "_csrc"


def cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    if Path("/usr/local/cuda/bin/nvcc").exists():
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else None


def cuda_requested() -> bool:
    """The environment asks for CUDA kernels: REVGN_FORCE_CUDA=1 or a TORCH_CUDA_ARCH_LIST."""
    return os.environ.get("REVGN_FORCE_CUDA", "0") == "1" or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))


def want_cuda() -> bool:
    """Whether to compile the CUDA kernels.

    * ``REVGN_NO_CUDA=1``: never; ``REVGN_FORCE_CUDA=1``: always.
    * Otherwise only with a CUDA build of torch and nvcc, and then only when a GPU is visible or
      ``TORCH_CUDA_ARCH_LIST`` names the architectures: on a machine without a GPU the CUDA kernels
      could not run, and compiling them takes minutes.
    """
    if os.environ.get("REVGN_NO_CUDA", "0") == "1":
        return False
    if os.environ.get("REVGN_FORCE_CUDA", "0") == "1":
        return True
    import torch

    if torch.version.cuda is None or cuda_home() is None:
        return False
    return cuda_requested() or torch.cuda.is_available()


def describe(with_cuda: bool) -> str:
    """The one line the build prints: what it compiles and roughly how long that takes."""
    files = sources(with_cuda)
    n_cu = sum(f.endswith(".cu") for f in files)
    jobs = os.environ.get("MAX_JOBS", "all cores")
    if with_cuda:
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH
        return (f"revgn_ext: compiling the C++ CPU kernels and the CUDA kernels for TORCH_CUDA_ARCH_LIST={arch} "
                f"({len(files)} files, {n_cu} of them .cu; about 2-6 min with MAX_JOBS={jobs}; "
                f"REVGN_NO_CUDA=1 builds the CPU kernels only)")
    why = ""
    if os.environ.get("REVGN_NO_CUDA", "0") != "1":
        why = " (no GPU visible or no CUDA torch/nvcc; TORCH_CUDA_ARCH_LIST or REVGN_FORCE_CUDA=1 adds the CUDA kernels)"
    return (f"revgn_ext: compiling the C++ CPU kernels ({len(files)} files, about 1-2 min with "
            f"MAX_JOBS={jobs}){why}")


DEFAULT_CUDA_ARCH = "9.0"


def ensure_cuda_arch_list() -> None:
    """With no GPU to detect and no TORCH_CUDA_ARCH_LIST, torch finds no architecture to build for;
    default to Hopper (sm_90), the GPUs this project targets. Set TORCH_CUDA_ARCH_LIST to override."""
    import torch

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH
        print(f"revgn_ext: no GPU visible, building CUDA kernels for TORCH_CUDA_ARCH_LIST={DEFAULT_CUDA_ARCH}")


def sources(with_cuda: bool) -> list[str]:
    """csrc/revgn.cpp (the schemas), each op family's csrc/<op>/<op>_cpu.cpp and, with CUDA, its
    csrc/<op>/cuda/*.cpp and *.cu. File names are unique across folders: the JIT build puts every
    object file in one flat directory."""
    cpp = sorted(glob.glob(str(CSRC / "*.cpp"))) + sorted(glob.glob(str(CSRC / "*" / "*_cpu.cpp")))
    if not with_cuda:
        return cpp
    return (cpp + sorted(glob.glob(str(CSRC / "*" / "cuda" / "*.cpp")))
            + sorted(glob.glob(str(CSRC / "*" / "cuda" / "*.cu"))))


def cuda_include_dirs() -> list[str]:
    """CUDA 13 wheels ship cuBLAS/cuSOLVER headers under site-packages/nvidia/cu13/include."""
    dirs = []
    for base in sys.path:
        cand = Path(base) / "nvidia" / "cu13" / "include"
        if cand.is_dir():
            dirs.append(str(cand))
    return dirs[:1]


def compile_args(with_cuda: bool, debug: bool = False) -> dict:
    opt = "-O0" if debug else "-O3"
    cxx = [opt]
    if with_cuda:
        cxx.append("-DWITH_CUDA")
    args = {"cxx": cxx}
    if with_cuda:
        args["nvcc"] = [opt, "-DWITH_CUDA", "--use_fast_math", "-lineinfo",
                        "--expt-relaxed-constexpr"]
    return args


def jit_load() -> str:
    """Build csrc with torch.utils.cpp_extension.load (ninja) and register the ops; returns the .so."""
    import torch
    from torch.utils import cpp_extension

    with_cuda = want_cuda()
    if with_cuda and cuda_home():
        # cpp_extension resolved its CUDA_HOME when first imported, possibly from a bare nvcc on PATH.
        os.environ.setdefault("CUDA_HOME", cuda_home())
        cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
        ensure_cuda_arch_list()
    build_dir = Path(os.environ.get("REVGN_JIT_DIR", Path.home() / ".cache" / "revgn_ext" /
                                    f"torch{torch.__version__}{'-cuda' if with_cuda else ''}"))
    build_dir.mkdir(parents=True, exist_ok=True)
    args = compile_args(with_cuda)
    cpp_extension.load(
        name="revgn_ext_jit",
        sources=sources(with_cuda),
        extra_cflags=args["cxx"],
        extra_cuda_cflags=args.get("nvcc"),
        extra_include_paths=cuda_include_dirs() if with_cuda else None,
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=os.environ.get("REVGN_VERBOSE_BUILD", "0") == "1",
    )
    return str(build_dir / "revgn_ext_jit.so")


if __name__ == "__main__":
    # `python revgn_ext/ops/_build.py`: print what a build here would compile (the Makefile shows it,
    # since pip hides the build's own output).
    try:
        print(describe(want_cuda()))
    except ImportError:
        print("revgn_ext: torch is not importable, so the build installs the pure-Python package")
