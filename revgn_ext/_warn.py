"""Warnings: the library's own name the user's line, and torch's internal ones stay out of the way.

* :func:`user_stacklevel`: the ``stacklevel`` that attributes a warning to the first frame outside this
  package and torch, i.e. the user's ``opt.step(...)`` or ``EGN(...)``, however deep the warning sits.
* :func:`load_jvp_decompositions`: torch's forward-mode AD (``torch.func.jvp``, ``make_dual``) imports
  ``torch._decomp.decompositions_for_jvp`` on first use, which compiles a few decompositions with
  ``torch.jit.script``; since torch 2.14 that warns "`torch.jit.script` is deprecated" (FutureWarning,
  a DeprecationWarning before). The warning is about torch's own internals, not about anything the
  caller can change, so the library's jvp calls load the module first with exactly that warning
  ignored. A user's own jvp before ours still shows it, as torch intends.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

__all__ = ["user_stacklevel", "load_jvp_decompositions"]

_LIBRARY_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
                 os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the calling function name the user's line:
    the first frame outside this package and torch. Frames of importlib's bootstrap are not counted,
    as ``warnings`` skips them too."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame = frame.f_back
        name = frame.f_code.co_filename
        if not ("importlib" in name and "_bootstrap" in name):
            level += 1
    return level


_JVP_LOADED = False


def load_jvp_decompositions() -> None:
    """Import torch's jvp decompositions once, without torch's deprecation warning about its own use
    of ``torch.jit.script`` (see the module docstring). Call before the library's first jvp."""
    global _JVP_LOADED
    if _JVP_LOADED:
        return
    load = getattr(torch.autograd.forward_ad, "_maybe_load_decompositions", None)
    if load is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                                    category=FutureWarning)
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                                    category=DeprecationWarning)
            load()
    _JVP_LOADED = True
