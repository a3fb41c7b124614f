"""Datasets for the experiments, read from local files only (no downloads).

``load_dataset(name, data_dir=None) -> (x_train, y_train, x_test, y_test)`` returns float32 ``(N, d)``
features and int64 ``(N,)`` labels as torch tensors, standardised with statistics of the training
split only.

* ``"digits"``: scikit-learn's bundled 8x8 digits (1797 images, d = 64, 10 classes), split 80 / 20
  by a fixed permutation.
* ``"fashion-mnist"`` / ``"mnist"``: IDX files (``train-images-idx3-ubyte.gz`` ...), by default from
  Debian's ``dataset-fashion-mnist`` folder ``/usr/share/datasets/fashion-mnist``.
* ``"cifar10"``: the python-pickle batches of ``cifar-10-batches-py``, read by a restricted unpickler
  that builds lists, dicts, bytes, str and numbers, and numpy integer arrays only from bytes the file
  holds (the stand-ins for numpy's reconstructors check shape, dtype and size before building one).
* ``"synthetic"``: a Gaussian mixture made from a seed, for tests.

Every reader checks the sizes a file claims against what the file holds before allocating, reads at
most a bounded number of bytes, and a malformed file (not a regular file, a corrupt or cut gzip stream,
NaN or Inf pixels, labels that are not integers in 0..9, no samples) raises ``ValueError`` naming the
file and the problem.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import pickletools
import stat
import struct
import zlib
from math import prod

import numpy as np
import torch

__all__ = ["DATASETS", "DEFAULT_DIRS", "load_dataset", "read_idx", "read_cifar_batch", "synthetic"]

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10", "synthetic")
DEFAULT_DIRS = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",
    "mnist": "/usr/share/datasets/mnist",
    "cifar10": "cifar-10-batches-py",
}

# A file claiming more than this is refused before anything is read (the largest real files here,
# Fashion-MNIST's training images, are 47 MB; a CIFAR-10 batch is 31 MB).
MAX_BYTES = 1 << 30
_CHUNK = 1 << 20


def load_dataset(name: str = "digits", data_dir: str | None = None, standardize: str = "global"):
    """Load ``name`` as ``(x_train, y_train, x_test, y_test)``: float32 ``(N, d)``, int64 ``(N,)``.

    ``standardize``: ``"global"`` (one mean and std per colour channel, the paper's) or ``"per-pixel"``
    (each feature by its own training mean and std; a feature constant on the training set is only
    centred)."""
    if name not in DATASETS:
        raise ValueError(f"name must be one of {', '.join(DATASETS)}; got {name!r}")
    if standardize not in ("global", "per-pixel"):
        raise ValueError(f"standardize must be 'global' or 'per-pixel', got {standardize!r}")
    if name == "digits":
        x_tr, y_tr, x_te, y_te = _digits()
    elif name == "synthetic":
        if standardize != "global":
            raise ValueError("standardize='per-pixel' applies to image datasets; 'synthetic' is drawn already "
                             "standardised, use standardize='global'")
        return synthetic()
    elif name in ("fashion-mnist", "mnist"):
        x_tr, y_tr, x_te, y_te = _idx_dataset(name, data_dir or DEFAULT_DIRS[name])
    else:
        x_tr, y_tr, x_te, y_te = _cifar10(data_dir or DEFAULT_DIRS[name])
    x_tr, x_te = _standardise(x_tr, x_te, scale=16.0 if name == "digits" else 255.0,
                              channels=3 if name == "cifar10" else 1, per_pixel=standardize == "per-pixel")
    return (torch.from_numpy(x_tr), torch.from_numpy(y_tr.astype(np.int64)),
            torch.from_numpy(x_te), torch.from_numpy(y_te.astype(np.int64)))


def _standardise(x_tr: np.ndarray, x_te: np.ndarray, scale: float, channels: int, per_pixel: bool = False):
    """Pixels ``/ scale`` to [0, 1], then ``(x - mean) / std`` per colour channel with training-set statistics.

    Per channel rather than per pixel (the paper's), so that constant border pixels stay finite and the
    image's spatial contrast is kept. ``per_pixel``: each feature by its own training mean and std
    (std 1 for a feature constant on the training set).
    """
    out = []
    tr = x_tr.astype(np.float64).reshape(len(x_tr), channels, -1) / scale
    te = x_te.astype(np.float64).reshape(len(x_te), channels, -1) / scale
    if per_pixel:
        mean = tr.mean(axis=0, keepdims=True)
        std = tr.std(axis=0, keepdims=True)
        std = np.where(std > 1e-8, std, 1.0)
    else:
        mean = tr.mean(axis=(0, 2), keepdims=True)
        std = tr.std(axis=(0, 2), keepdims=True) + 1e-8
    for x in (tr, te):
        out.append(((x - mean) / std).reshape(len(x), -1).astype(np.float32))
    return out


def _digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    n_test = len(order) // 5
    test, train = order[:n_test], order[n_test:]
    x = digits.data.astype(np.float32)
    return x[train], digits.target[train], x[test], digits.target[test]


def synthetic(n_train: int = 512, n_test: int = 256, features: int = 16, classes: int = 4,
              noise: float = 1.0, seed: int = 0):
    """A Gaussian mixture: class means ``N(0, I)`` in ``features`` dims, samples ``mean + noise * N(0, I)``."""
    for arg, value in (("n_train", n_train), ("n_test", n_test), ("features", features), ("classes", classes)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, features, generator=g)

    def draw(n):
        y = torch.randint(classes, (n,), generator=g)
        return means[y] + noise * torch.randn(n, features, generator=g), y

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    return x_tr.float(), y_tr.long(), x_te.float(), y_te.long()


# --------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)
# --------------------------------------------------------------------------------------------------

IDX_MAX_DIMS = 4   # labels have 1 dimension, images 3 (N, rows, columns); numpy itself stops at 64
_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


# What reading a damaged (gzip) file raises.
_READ_ERRORS = (OSError, EOFError, gzip.BadGzipFile, zlib.error)


def _check_regular_file(path: str) -> None:
    """ValueError unless ``path`` is a regular file (a directory, a device such as /dev/zero, a FIFO are not)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise ValueError(f"{path}: {kind}; expected a data file")


def _open(path: str):
    _check_regular_file(path)
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        return gzip.open(path, "rb") if gz else open(path, "rb")
    except OSError as e:
        raise ValueError(f"{path}: cannot open: {e}") from None


def _read_exact(f, n: int, path: str, what: str) -> bytes:
    """Read exactly ``n`` bytes in chunks, so memory grows only with data the file really holds."""
    buf = bytearray()
    try:
        while len(buf) < n:
            chunk = f.read(min(_CHUNK, n - len(buf)))
            if not chunk:
                break
            buf += chunk
    except _READ_ERRORS as e:  # corrupt or cut gzip stream
        raise ValueError(f"{path}: cannot read {what}: {type(e).__name__}: {e}") from None
    if len(buf) < n:
        raise ValueError(f"{path}: truncated: {what} needs {n} bytes but the file holds only {len(buf)}")
    return bytes(buf)


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array of the header's shape.

    Header: two zero bytes, a type byte, the number of dimensions, then each dimension as a big-endian
    uint32; the data follow in C order. The claimed size is checked against ``MAX_BYTES`` and against
    the bytes actually present before anything of that size is allocated.
    """
    path = os.fspath(path)
    with _open(path) as f:
        head = _read_exact(f, 4, path, "the IDX magic number")
        if head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES or head[3] == 0:
            raise ValueError(f"{path}: not an IDX file (bad magic number {head.hex()}; expected 0000TTNN with "
                             f"type TT in {sorted(hex(t) for t in _IDX_TYPES)})")
        dtype, ndim = _IDX_TYPES[head[2]], head[3]
        if ndim > IDX_MAX_DIMS:
            raise ValueError(f"{path}: the header claims {ndim} dimensions; IDX image and label files have 1 to "
                             f"{IDX_MAX_DIMS}, so the file is corrupt")
        dims = struct.unpack(f">{ndim}I", _read_exact(f, 4 * ndim, path, "the IDX dimensions"))
        nbytes = prod(dims) * dtype.itemsize
        if nbytes > MAX_BYTES:
            raise ValueError(f"{path}: header claims dimensions {dims} ({nbytes} bytes), more than the "
                             f"{MAX_BYTES}-byte limit; the file is corrupt")
        data = _read_exact(f, nbytes, path, f"data of shape {dims}")
        try:
            extra = f.read(1)
        except _READ_ERRORS as e:
            raise ValueError(f"{path}: cannot read past the data: {type(e).__name__}: {e}") from None
        if extra:
            raise ValueError(f"{path}: trailing bytes after the {nbytes} data bytes of shape {dims}")
    array = np.frombuffer(data, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise ValueError(f"{path}: {bad} of {array.size} values are NaN or Inf")
    return array


def _find(folder: str, names: tuple[str, ...], dataset: str) -> str:
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    hint = "install Debian's dataset-fashion-mnist or pass --data-dir" if dataset == "fashion-mnist" \
        else "pass --data-dir pointing to the folder with the files"
    raise FileNotFoundError(f"{dataset}: none of {', '.join(names)} found in {folder} ({hint})")


def _idx_dataset(dataset: str, folder: str):
    splits = []
    for prefix in ("train", "t10k"):
        pair = []
        for kind, rank in (("images", 3), ("labels", 1)):
            stems = (f"{prefix}-{kind}-idx{rank}-ubyte", f"{prefix}-{kind}.idx{rank}-ubyte")
            path = _find(folder, tuple(s + ext for s in stems for ext in (".gz", "")), dataset)
            array = read_idx(path)
            if array.ndim != rank:
                raise ValueError(f"{path}: expected {rank} dimensions for {kind}, the header has {array.ndim}")
            pair.append((path, array))
        (ipath, images), (lpath, labels) = pair
        if len(images) != len(labels):
            raise ValueError(f"{ipath} holds {len(images)} images but {lpath} holds {len(labels)} labels")
        if not len(images) or not images[0].size:
            raise ValueError(f"{ipath} holds no images (shape {images.shape})")
        if labels.dtype.kind == "f" and not (labels == np.round(labels)).all():
            raise ValueError(f"{lpath}: labels must be whole numbers, found fractional values")
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise ValueError(f"{lpath}: labels must lie in 0..9, found {labels.min()}..{labels.max()}")
        splits.append((images.reshape(len(images), -1), labels))
    (x_tr, y_tr), (x_te, y_te) = splits
    if x_tr.shape[1] != x_te.shape[1]:
        raise ValueError(f"{dataset} in {folder}: training images have {x_tr.shape[1]} pixels, "
                         f"test images {x_te.shape[1]}")
    return x_tr, y_tr, x_te, y_te


# --------------------------------------------------------------------------------------------------
# CIFAR-10 python-pickle batches
# --------------------------------------------------------------------------------------------------

# A CIFAR-10 batch is 31 MB; a larger pickle is refused before it is read.
MAX_PICKLE_BYTES = 1 << 28
_MEMO_OPS = ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET")
# numpy dtypes a batch's arrays may have: 'data' is uint8, labels (a list in the real files) may be an
# integer array.
_ARRAY_DTYPES = ("u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8")
_ARRAY_MAX_DIMS = 2


class _NdarrayName:
    """Stands for ``numpy.ndarray`` as the class argument of ``_reconstruct``; calling it (REDUCE) would
    allocate an array of any claimed shape with uninitialised memory, so it refuses."""

    def __call__(self, *args, **kwargs):
        raise ValueError("refusing to call numpy.ndarray (it allocates an uninitialised array of any claimed "
                         "shape); a CIFAR-10 batch builds arrays through _reconstruct or _frombuffer")


_NDARRAY = _NdarrayName()


class _DtypeStub:
    """What ``numpy.dtype(name, align, copy)`` unpickles to; its BUILD state gives the byte order."""
    __slots__ = ("name", "dtype")

    def __init__(self, name):
        if isinstance(name, bytes):  # a Python 2 pickle's str, read with encoding="bytes"
            name = name.decode("latin1")
        if not isinstance(name, str) or name not in _ARRAY_DTYPES:
            raise ValueError(f"refusing numpy dtype {name!r}; a CIFAR-10 batch holds integer arrays "
                             f"({', '.join(_ARRAY_DTYPES)})")
        self.name, self.dtype = name, np.dtype(name)

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) > 1 and isinstance(state[1], bytes):
            state = state[:1] + (state[1].decode("latin1"),) + state[2:]
        if (not isinstance(state, tuple) or len(state) not in (8, 9) or state[0] not in (3, 4)
                or state[1] not in ("|", "<", ">", "=") or state[2:5] != (None, None, None)):
            raise ValueError(f"refusing numpy dtype state {state!r} (sub-arrays and fields are not allowed)")
        self.dtype = np.dtype(self.name).newbyteorder(state[1]) if state[1] in "<>" else np.dtype(self.name)


def _dtype(name, align=False, copy=True):
    return _DtypeStub(name)


def _array(raw, dtype, shape, order: str) -> np.ndarray:
    """The array of ``shape`` read from the bytes ``raw``, after checking every claim against them."""
    if not isinstance(dtype, _DtypeStub):
        raise ValueError(f"an array's dtype must be a numpy dtype, got {type(dtype).__name__}")
    if (not isinstance(shape, tuple) or not 1 <= len(shape) <= _ARRAY_MAX_DIMS
            or not all(type(s) is int and 0 <= s < 1 << 40 for s in shape)):
        raise ValueError(f"refusing an array of shape {shape!r}: expected 1 to {_ARRAY_MAX_DIMS} sizes >= 0")
    if isinstance(raw, pickle.PickleBuffer):
        raw = raw.raw()
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ValueError(f"an array's data must be bytes, got {type(raw).__name__}")
    need = prod(shape) * dtype.dtype.itemsize
    if len(raw) != need:
        raise ValueError(f"an array of shape {shape} and dtype {dtype.dtype} needs {need} bytes, the pickle holds "
                         f"{len(raw)}")
    return np.frombuffer(raw, dtype=dtype.dtype).reshape(shape, order=order)


class _ArrayStub:
    """What numpy's ``_reconstruct(ndarray, (0,), b'b')`` unpickles to; BUILD's state
    (version, shape, dtype, is_fortran, data) makes it the array."""
    __slots__ = ("array",)

    def __init__(self):
        self.array = None

    def __setstate__(self, state):
        if self.array is not None or not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
            raise ValueError("refusing a numpy array state that is not (1, shape, dtype, is_fortran, data)")
        _, shape, dtype, fortran, raw = state
        if type(fortran) is not bool:
            raise ValueError("refusing a numpy array state whose is_fortran is not a bool")
        self.array = _array(raw, dtype, shape, "F" if fortran else "C")


def _reconstruct(cls, shape, typecode):
    if cls is not _NDARRAY or shape != (0,) or typecode != b"b":
        raise ValueError("refusing numpy _reconstruct arguments other than (ndarray, (0,), b'b')")
    return _ArrayStub()


def _frombuffer(buf, dtype, shape, order):
    if order not in ("C", "F"):
        raise ValueError(f"refusing array order {order!r}")
    return _array(buf, dtype, shape, order)


def _latin1(text, encoding):
    """``_codecs.encode``, as protocol 2 writes bytes from Python 3: latin-1 only."""
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise ValueError("refusing _codecs.encode other than (str, 'latin1')")
    return text.encode("latin1")


# The globals a CIFAR-10 batch pickle (Python 2 cPickle, or protocols 2 to 5 from numpy 1 or 2) names,
# each mapped to a stand-in that checks its arguments; numpy.ndarray itself cannot be called.
_SAFE_GLOBALS = {
    ("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct, ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer, ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("_codecs", "encode"): _latin1,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise ValueError(f"{self.path}: refusing to unpickle {module}.{name}; a CIFAR-10 batch may only "
                             f"contain numpy integer arrays, lists, dicts, bytes, str and numbers")
        return _SAFE_GLOBALS[(module, name)]

    def persistent_load(self, pid):
        raise ValueError(f"{self.path}: refusing a persistent id in the pickle")


def _finish(value, path: str):
    """Replace the array stand-ins (at the top level, in a dict's values and in lists there) by arrays."""
    if isinstance(value, _ArrayStub):
        if value.array is None:
            raise ValueError(f"{path}: a numpy array without its data")
        return value.array
    if isinstance(value, (_DtypeStub, _NdarrayName)):
        raise ValueError(f"{path}: a bare numpy {type(value).__name__} where data was expected")
    return value


def _unpickle(path: str):
    _check_regular_file(path)
    size = os.path.getsize(path)
    if size > MAX_PICKLE_BYTES:
        raise ValueError(f"{path}: file of {size} bytes is larger than the {MAX_PICKLE_BYTES}-byte limit of a "
                         f"CIFAR-10 batch")
    try:
        with open(path, "rb") as f:
            raw = f.read(size + 1)  # the size it had a moment ago: a file that grows since is refused below
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e}") from None
    if len(raw) > size:
        raise ValueError(f"{path}: the file grew while it was read")
    # Walking the opcodes first checks every length the pickle claims against the bytes present, so a
    # forged length cannot make the unpickler allocate it.
    # The memo indices are bounded too: the unpickler grows its memo to the largest index it is given
    # (a 9-byte pickle storing at index 2**27 would take gigabytes), while a pickler numbers its memo
    # entries 0, 1, 2, ..., so no index can exceed the number of opcodes before it.
    try:
        for count, (opcode, arg, pos) in enumerate(pickletools.genops(io.BytesIO(raw))):
            if opcode.name in _MEMO_OPS and not (isinstance(arg, int) and 0 <= arg <= count):
                raise ValueError(f"memo index {arg} at byte {pos} exceeds the {count} opcodes before it "
                                 "(no pickler writes that)")
    except Exception as e:  # pickletools reports malformed input as ValueError or others
        raise ValueError(f"{path}: not a valid pickle: {e}") from None
    try:
        value = _RestrictedUnpickler(io.BytesIO(raw), path).load()
        if isinstance(value, dict):
            value = {k: [_finish(v, path) for v in x] if isinstance(x, list) else _finish(x, path)
                     for k, x in value.items()}
        return _finish(value, path)
    except Exception as e:
        if isinstance(e, ValueError) and str(e).startswith(path):
            raise
        raise ValueError(f"{path}: cannot unpickle: {type(e).__name__}: {e}") from None


def _get(batch: dict, key: str):
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    return None


def read_cifar_batch(path: str):
    """Read one CIFAR-10 batch: ``(images uint8 (N, 3072), labels int64 (N,))``."""
    path = os.fspath(path)
    batch = _unpickle(path)
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict, the pickle holds a {type(batch).__name__}")
    data, labels = _get(batch, "data"), _get(batch, "labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        n = len(labels) if isinstance(labels, (list, np.ndarray)) else type(labels).__name__
        raise ValueError(f"{path}: 'labels' must be a list of {len(data)} ints, got {n}")
    if isinstance(labels, list) and not all(type(v) is int for v in labels):
        kinds = sorted({type(v).__name__ for v in labels if type(v) is not int})
        raise ValueError(f"{path}: 'labels' must hold ints only, found {', '.join(kinds)}")
    if isinstance(labels, list):
        bad = next((v for v in labels if not 0 <= v <= 9), None)
        if bad is not None:   # checked before the conversion to int64, which a label of 2**64 would overflow
            raise ValueError(f"{path}: labels must lie in 0..9, found {bad}")
    if isinstance(labels, np.ndarray) and (labels.ndim != 1 or labels.dtype.kind not in "iu"):
        raise ValueError(f"{path}: 'labels' must be one int per image, got a {labels.dtype} array of shape "
                         f"{labels.shape}")
    if not len(data):
        raise ValueError(f"{path}: the batch holds no images")
    if isinstance(labels, np.ndarray) and labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: labels must lie in 0..9, found {labels.min()}..{labels.max()}")
    labels = np.asarray(labels, dtype=np.int64)
    return data, labels


def _cifar10(folder: str):
    if os.path.isdir(os.path.join(folder, "cifar-10-batches-py")):
        folder = os.path.join(folder, "cifar-10-batches-py")
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"cifar10: {', '.join(missing)} not found in {folder} (pass --data-dir "
                                f"pointing to cifar-10-batches-py)")
    batches = [read_cifar_batch(os.path.join(folder, n)) for n in names]
    x_tr = np.concatenate([b[0] for b in batches[:5]])
    y_tr = np.concatenate([b[1] for b in batches[:5]])
    return x_tr, y_tr, batches[5][0], batches[5][1]
