"""Run checkpoints: atomic writes, a content checksum, and validation before anything is resumed.

A checkpoint is an ordinary ``torch.save`` file (``torch.load(path, weights_only=True)`` reads it) holding

    {"format": FORMAT, "sha256": <hex digest of the payload's content>, "payload": {...}}

The payload is a run's state (each paper's runner decides its entries). The digest covers every
tensor's dtype, shape and bytes and every other value, walked in a fixed order, so any change to the
stored content (a flipped byte in a tensor, a number or a key) fails the check; ``torch.load`` alone
checks none of it. Loading then hands the payload to the caller's validator (the expected keys and
types, a consistent history, finite tensors: :func:`validate_keys` and :func:`first_non_finite` are
the pieces).

Every way a checkpoint can be unusable (unreadable, truncated, not a zip, an unpickling or key error,
a checksum mismatch, an inconsistent or non-finite state, a state the model or optimizer refuses)
raises :class:`CheckpointError`, a ``ValueError`` with one line naming the file and the problem.

Writes go to ``checkpoint.pt.tmp`` and are renamed over ``checkpoint.pt``, so a crash mid-write
leaves the previous checkpoint intact; :func:`remove_stale_tmp` removes the ``.tmp`` such a crash
leaves behind, with a warning.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import warnings
import zipfile

import torch

from .records import CHECKPOINT

__all__ = ["CHECKPOINT", "FORMAT", "CheckpointError", "save", "load", "restore", "remove_stale_tmp",
           "content_digest", "unusable", "first_non_finite", "validate_keys", "one_line"]

FORMAT = "revgn_ext.checkpoint/1"

# What torch.load and unpickling raise on damaged files (zipfile's and pickle's errors included).
_LOAD_ERRORS = (OSError, EOFError, KeyError, IndexError, TypeError, AttributeError, ValueError, RuntimeError,
                UnicodeDecodeError, OverflowError, MemoryError, pickle.UnpicklingError, zipfile.BadZipFile,
                AssertionError)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed or written; the message names the file and the problem."""


def unusable(path: str, problem: str) -> CheckpointError:
    """The error for an unusable checkpoint: names the file, the problem and what to do."""
    return CheckpointError(f"checkpoint {path} is unusable: {problem}. Delete it to start the run afresh, "
                           "or restore a good copy")


def content_digest(obj) -> str:
    """SHA-256 over the content of a nested structure of dicts, lists, tuples, tensors and scalars, in a
    fixed order (dict items sorted by key type and key)."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous().reshape(-1)
            h.update(f"T{t.dtype}{tuple(o.shape)}:".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            h.update(f"D{len(o)}:".encode())
            for k in sorted(o, key=lambda k: (type(k).__name__, repr(k))):
                walk(k)
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            h.update(f"{type(o).__name__[0]}{len(o)}:".encode())
            for v in o:
                walk(v)
        elif o is None or isinstance(o, (bool, int, float, str, bytes)):
            h.update(f"{type(o).__name__}:{o!r};".encode())
        elif isinstance(o, (torch.dtype, torch.device, torch.Size)):
            h.update(f"{type(o).__name__}:{o};".encode())
        else:
            raise TypeError(f"cannot checksum a {type(o).__name__}")

    walk(obj)
    return h.hexdigest()


def save(path: str, payload: dict) -> None:
    """Write ``payload`` with its content digest to ``path`` atomically (through ``path.tmp``).

    A write that fails (a full disk, ``path`` a directory, no permission) raises CheckpointError naming
    ``path``; a failed or interrupted (Ctrl-C) write removes its ``.tmp`` and leaves the previous
    checkpoint as it was."""
    tmp = path + ".tmp"
    if os.path.isdir(path):
        raise CheckpointError(f"cannot write checkpoint {path}: it is a directory; remove it or use another --out")
    blob = {"format": FORMAT, "sha256": content_digest(payload), "payload": payload}
    try:
        torch.save(blob, tmp)
        os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, (OSError, RuntimeError)):   # torch.save reports a failed write as RuntimeError
            raise CheckpointError(f"cannot write checkpoint {path} ({one_line(e)}); the previous checkpoint, "
                                  "if any, is unchanged") from None
        raise


def remove_stale_tmp(path: str) -> bool:
    """Remove ``path.tmp`` left by a write that was killed, with a warning; True if there was one."""
    tmp = path + ".tmp"
    if not os.path.lexists(tmp):
        return False
    try:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            raise unusable(tmp, "it is a directory")
        os.remove(tmp)
    except OSError as e:
        raise unusable(tmp, f"cannot remove the partial write ({e})") from None
    warnings.warn(f"removed {tmp}, a partial checkpoint left by an interrupted write; "
                  f"{os.path.basename(path)} (if any) is the last complete one", RuntimeWarning, stacklevel=2)
    return True


def first_non_finite(obj, where: str):
    """Name of the first floating tensor under ``obj`` with a NaN or Inf, or None."""
    if isinstance(obj, torch.Tensor):
        if (obj.is_floating_point() or obj.is_complex()) and not bool(torch.isfinite(obj).all()):
            return where
        return None
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return None
    for k, v in items:
        bad = first_non_finite(v, f"{where}.{k}")
        if bad is not None:
            return bad
    return None


def load(path: str, validator, map_location=None) -> dict:
    """The verified, validated payload of the checkpoint at ``path`` (CheckpointError when unusable;
    FileNotFoundError when there is none). ``validator(path, payload)`` checks the payload's
    structure and returns it (each paper's runner has its own)."""
    if not os.path.lexists(path):
        raise FileNotFoundError(f"cannot resume: no checkpoint at {path}")
    if not os.path.isfile(path):
        raise unusable(path, "it is not a regular file")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except _LOAD_ERRORS as e:
        raise unusable(path, f"it cannot be read ({type(e).__name__}: {one_line(e)})") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT or set(blob) != {"format", "sha256", "payload"}:
        raise unusable(path, f"it is not a {FORMAT} file (written by another version, or damaged)")
    try:
        digest = content_digest(blob["payload"])
    except TypeError as e:
        raise unusable(path, str(e)) from None
    if digest != blob["sha256"]:
        raise unusable(path, "its content does not match its checksum (the file is damaged)")
    return validator(path, blob["payload"])


def validate_keys(path: str, payload, keys: dict, finite: tuple = ()) -> dict:
    """A payload with these entries of these types, and no NaN or Inf under the ``finite`` entries."""
    if not isinstance(payload, dict):
        raise unusable(path, f"the payload is a {type(payload).__name__}, not a dict")
    for key, kind in keys.items():
        if key not in payload:
            raise unusable(path, f"it has no {key!r} entry")
        if not isinstance(payload[key], kind):
            raise unusable(path, f"{key!r} is a {type(payload[key]).__name__}, expected {kind.__name__}")
    for key in finite:
        bad = first_non_finite(payload[key], key)
        if bad is not None:
            raise unusable(path, f"{bad} contains NaN or Inf")
    return payload


def restore(path: str, payload: dict, model, optimizer, set_rng) -> None:
    """Load the model and optimizer state and the RNG state, naming ``path`` if any of them refuses it."""
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        set_rng(payload["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise unusable(path, f"its state does not fit this run ({type(e).__name__}: {one_line(e)})") from None


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, cut to ``limit`` characters."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + "..."
