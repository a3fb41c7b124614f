"""Finds and loads the compiled ``revgn`` ops.

Three ways to get kernels, tried in this order unless ``REVGN_BACKEND`` forces one:

* ``compiled``: the ``revgn_ext/_C*.so`` that ``pip install`` built;
* ``jit``: build the same ``csrc`` with ``torch.utils.cpp_extension.load`` (ninja) on first use, only
  when ``REVGN_JIT=1`` (or forced);
* ``reference``: no kernels; every op runs its pure-PyTorch reference. Reached silently only when
  forced; as a fallback it warns once.
"""
from __future__ import annotations

import glob
import os
import warnings
from pathlib import Path

import torch

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # revgn_ext/, where pip puts _C*.so
LOAD_PATHS = ("compiled", "jit", "reference")

PURE_MARKER = "_pure_python"  # written by setup.py into a pure-Python build

_state: dict = {"path": None, "library": None, "error": None}


def _compiled_library() -> str | None:
    hits = sorted(glob.glob(str(PACKAGE_DIR / "_C*.so")))
    return hits[0] if hits else None


def _load_compiled() -> str:
    lib = _compiled_library()
    if lib is None:
        raise ImportError("no compiled revgn_ext/_C*.so; install with "
                          "`pip install --no-build-isolation .` or set REVGN_JIT=1")
    torch.ops.load_library(lib)
    return lib


def _load_jit() -> str:
    from . import _build  # only needed for the JIT path

    return _build.jit_load()


def load() -> str:
    """Load the ops once; returns the load path in use: "compiled", "jit" or "reference"."""
    if _state["path"] is not None:
        return _state["path"]
    forced = os.environ.get("REVGN_BACKEND", "auto").strip().lower()
    if forced not in ("auto",) + LOAD_PATHS:
        raise ValueError(f"REVGN_BACKEND must be one of auto, compiled, jit, reference; got {forced!r}")
    if forced == "reference":
        _state["path"] = "reference"
        return "reference"
    if forced in ("compiled", "jit"):
        _state["library"] = _load_compiled() if forced == "compiled" else _load_jit()
        _state["path"] = forced
        return forced
    errors = []
    try:
        _state["library"] = _load_compiled()
        _state["path"] = "compiled"
        return "compiled"
    except (ImportError, OSError, RuntimeError) as exc:
        errors.append(f"compiled: {exc}")
    if os.environ.get("REVGN_JIT", "0") == "1":
        try:
            _state["library"] = _load_jit()
            _state["path"] = "jit"
            return "jit"
        except Exception as exc:  # a failed JIT build falls back like a missing library
            errors.append(f"jit: {exc}")
    _state["path"] = "reference"
    _state["error"] = "; ".join(errors)
    if _compiled_library() is None and (PACKAGE_DIR / PURE_MARKER).exists():
        # Installed without kernels on purpose (REVGN_NO_EXT=1, or no torch at build time): say so in
        # build_info() and stay silent.
        _state["error"] = "installed as the pure-Python package (no compiled kernels were built)"
        return "reference"
    warnings.warn("revgn_ext: compiled kernels unavailable, using the pure-PyTorch reference ops ("
                  + _state["error"] + ")", RuntimeWarning, stacklevel=3)
    return "reference"


def has_kernel(op: str, device_type: str) -> bool:
    """True when the loaded library registered ``revgn::op`` for this device type."""
    if load() == "reference":
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"revgn::{op}", key)
    except RuntimeError:  # a library built from older sources lacks the op altogether
        return False


def info() -> dict:
    path = load()
    return {"load_path": path, "library": _state["library"], "error": _state["error"],
            "cuda_kernels": path != "reference" and has_kernel("gram_factor", "cuda")}
