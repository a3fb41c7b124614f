"""Dataset readers: generated IDX and CIFAR-10 fixtures, good and malformed."""
import gzip
import os
import pickle
import struct
import tracemalloc

import numpy as np
import pytest
import torch

from revgn_ext.experiments.common import data


def idx_bytes(array: np.ndarray, type_byte: int = 0x08) -> bytes:
    head = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return head + array.astype(">u1" if type_byte == 0x08 else array.dtype.newbyteorder(">")).tobytes()


def write(path, payload: bytes, compress: bool = True):
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(payload)
    return str(path)


def write_idx_dataset(folder, n_train=6, n_test=4, side=4, compress=True, seed=0):
    rng = np.random.default_rng(seed)
    ext = ".gz" if compress else ""
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, side, side), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        write(folder / f"{prefix}-images-idx3-ubyte{ext}", idx_bytes(images), compress)
        write(folder / f"{prefix}-labels-idx1-ubyte{ext}", idx_bytes(labels), compress)
        arrays[prefix] = (images, labels)
    return arrays


# ---------------------------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, compress):
    images = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = write(tmp_path / "x.idx", idx_bytes(images), compress)
    out = data.read_idx(path)
    assert out.shape == (2, 3, 5) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, images)


def test_read_idx_big_endian_floats(tmp_path):
    values = np.array([[1.5, -2.0], [3.25, 1e6]], dtype=np.float32)
    path = write(tmp_path / "f.idx", idx_bytes(values, type_byte=0x0D))
    np.testing.assert_array_equal(data.read_idx(path), values)


def test_idx_truncated(tmp_path):
    images = np.zeros((3, 4, 4), dtype=np.uint8)
    path = write(tmp_path / "cut.gz", idx_bytes(images)[:-5])
    with pytest.raises(ValueError, match=r"cut\.gz.*truncated.*48 bytes.*43"):
        data.read_idx(path)


def test_idx_truncated_gzip_stream(tmp_path):
    raw = gzip.compress(idx_bytes(np.ones((50, 8, 8), dtype=np.uint8)))
    path = tmp_path / "stream.gz"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="stream.gz"):
        data.read_idx(str(path))


def test_idx_bad_magic(tmp_path):
    payload = bytearray(idx_bytes(np.zeros((2, 2), dtype=np.uint8)))
    payload[0] = 0x1F
    path = write(tmp_path / "magic.gz", bytes(payload))
    with pytest.raises(ValueError, match=r"magic\.gz.*bad magic number 1f00"):
        data.read_idx(path)
    path = write(tmp_path / "type.gz", b"\x00\x00\x42\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match=r"type\.gz.*not an IDX file"):
        data.read_idx(path)


def test_idx_huge_header_dims_refused_before_reading(tmp_path):
    head = b"\x00\x00\x08\x03" + struct.pack(">3I", 2 ** 31, 2 ** 31, 2 ** 31)
    path = write(tmp_path / "huge.gz", head + b"\x00" * 16)
    with pytest.raises(ValueError, match=r"huge\.gz.*claims dimensions .*limit"):
        data.read_idx(path)


def test_idx_large_claim_allocates_only_what_is_present(tmp_path):
    # 1 GB claimed (under the hard limit), 100 bytes present: the reader must fail on truncation
    # without ever holding a buffer of the claimed size.
    head = b"\x00\x00\x08\x03" + struct.pack(">3I", 1000, 1000, 1000)
    path = write(tmp_path / "claim.gz", head + b"\x07" * 100)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"claim\.gz.*truncated.*1000000000 bytes.*only 100"):
            data.read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2 ** 20, peak


def test_idx_trailing_bytes(tmp_path):
    path = write(tmp_path / "long.gz", idx_bytes(np.zeros((2, 2), dtype=np.uint8)) + b"\x01")
    with pytest.raises(ValueError, match=r"long\.gz.*trailing bytes"):
        data.read_idx(path)


def test_load_idx_dataset(tmp_path):
    arrays = write_idx_dataset(tmp_path)
    x_tr, y_tr, x_te, y_te = data.load_dataset("fashion-mnist", data_dir=str(tmp_path))
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert x_tr.shape == (6, 16) and x_te.shape == (4, 16)
    np.testing.assert_array_equal(y_tr.numpy(), arrays["train"][1])
    np.testing.assert_array_equal(y_te.numpy(), arrays["t10k"][1])
    # standardised with the training split's scalar mean and std
    raw = arrays["train"][0].reshape(6, -1) / 255.0
    expect = (raw - raw.mean()) / (raw.std() + 1e-8)
    np.testing.assert_allclose(x_tr.numpy(), expect, rtol=1e-5, atol=1e-5)


def test_load_idx_uncompressed_mnist(tmp_path):
    write_idx_dataset(tmp_path, compress=False)
    x_tr, y_tr, x_te, y_te = data.load_dataset("mnist", data_dir=str(tmp_path))
    assert x_tr.shape == (6, 16) and y_te.shape == (4,)


def test_idx_count_mismatch_names_both_files(tmp_path):
    write_idx_dataset(tmp_path)
    write(tmp_path / "train-labels-idx1-ubyte.gz", idx_bytes(np.zeros(5, dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz holds 6 images but .*"
                                         r"train-labels-idx1-ubyte\.gz holds 5 labels"):
        data.load_dataset("mnist", data_dir=str(tmp_path))


def test_idx_labels_out_of_range(tmp_path):
    write_idx_dataset(tmp_path)
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.array([0, 1, 12, 3], dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz.*0\.\.9"):
        data.load_dataset("mnist", data_dir=str(tmp_path))


def test_idx_wrong_rank(tmp_path):
    write_idx_dataset(tmp_path)
    write(tmp_path / "train-images-idx3-ubyte.gz", idx_bytes(np.zeros((6, 16), dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*expected 3 dimensions"):
        data.load_dataset("mnist", data_dir=str(tmp_path))


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        data.load_dataset("fashion-mnist", data_dir=str(tmp_path))


# ---------------------------------------------------------------------------------------------- CIFAR

def cifar_batch(n, seed, protocol=2, bytes_keys=True):
    rng = np.random.default_rng(seed)
    batch = {"batch_label": b"testing batch", "labels": [int(v) for v in rng.integers(0, 10, n)],
             "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
             "filenames": [f"img_{i}.png".encode() for i in range(n)]}
    if bytes_keys:
        batch = {k.encode(): v for k, v in batch.items()}
    return batch, pickle.dumps(batch, protocol=protocol)


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("bytes_keys", [True, False])
def test_read_cifar_batch(tmp_path, protocol, bytes_keys):
    batch, raw = cifar_batch(5, 0, protocol, bytes_keys)
    path = tmp_path / "data_batch_1"
    path.write_bytes(raw)
    images, labels = data.read_cifar_batch(str(path))
    key = b"data" if bytes_keys else "data"
    np.testing.assert_array_equal(images, batch[key])
    np.testing.assert_array_equal(labels, batch[b"labels" if bytes_keys else "labels"])


def test_load_cifar10_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        (folder / name).write_bytes(cifar_batch(3, i)[1])
    x_tr, y_tr, x_te, y_te = data.load_dataset("cifar10", data_dir=str(tmp_path))
    assert x_tr.shape == (15, 3072) and x_te.shape == (3, 3072) and y_tr.dtype == torch.int64
    # per-channel standardisation: each channel of the training set has mean 0 and std 1
    channels = x_tr.double().reshape(15, 3, 1024)
    torch.testing.assert_close(channels.mean(dim=(0, 2)), torch.zeros(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(channels.std(dim=(0, 2), unbiased=False), torch.ones(3, dtype=torch.float64),
                               atol=1e-5, rtol=0)


class _RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evaluates:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_cifar_malicious_pickle_rejected_without_running(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _RunsCommand(f"touch {marker}"), b"labels": []}, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_1.*refusing to unpickle (posix|os|nt)\.system"):
        data.read_cifar_batch(str(path))
    assert not marker.exists()
    path.write_bytes(pickle.dumps(_Evaluates(), protocol=4))
    with pytest.raises(ValueError, match=r"refusing to unpickle builtins\.eval"):
        data.read_cifar_batch(str(path))


def test_cifar_forged_length_is_not_allocated(tmp_path):
    # BINBYTES8 claiming 2**40 bytes followed by 4 bytes of data
    path = tmp_path / "forged"
    path.write_bytes(b"\x80\x04\x8e" + struct.pack("<Q", 2 ** 40) + b"abcd.")
    with pytest.raises(ValueError, match="forged.*not a valid pickle"):
        data.read_cifar_batch(str(path))


def test_cifar_truncated_and_wrong_contents(tmp_path):
    raw = cifar_batch(4, 0)[1]
    path = tmp_path / "cut"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cut.*not a valid pickle"):
        data.read_cifar_batch(str(path))
    path = tmp_path / "shape"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"shape.*uint8 array of shape \(N, 3072\)"):
        data.read_cifar_batch(str(path))
    path = tmp_path / "labels"
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}))
    with pytest.raises(ValueError, match="labels.*list of 2 ints"):
        data.read_cifar_batch(str(path))
    path.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a dict"):
        data.read_cifar_batch(str(path))


# ---------------------------------------------------------------------------------------------- others

def test_digits_split_is_deterministic_and_standardised():
    a = data.load_dataset("digits")
    b = data.load_dataset()
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    x_tr, y_tr, x_te, y_te = a
    assert x_tr.shape == (1438, 64) and x_te.shape == (359, 64)
    assert abs(float(x_tr.mean())) < 1e-5 and abs(float(x_tr.std()) - 1) < 1e-3
    assert set(y_tr.tolist()) == set(range(10)) and set(y_te.tolist()) == set(range(10))


def test_synthetic_and_bad_name():
    x_tr, y_tr, x_te, y_te = data.load_dataset("synthetic")
    assert x_tr.shape == (512, 16) and x_te.shape == (256, 16) and int(y_tr.max()) == 3
    with pytest.raises(ValueError, match="name must be one of"):
        data.load_dataset("imagenet")
    with pytest.raises(ValueError, match="features"):
        data.synthetic(features=0)


# ---------------------------------------------------------------------------------------------- fuzz cases
# Each of these was accepted silently, crashed with a raw exception, read without bound or allocated
# uninitialised memory before the readers checked it.

def test_idx_nan_or_inf_pixel_is_refused(tmp_path):
    for bad in (np.nan, np.inf, -np.inf):
        images = np.ones((6, 4, 4), dtype=np.float32)
        images[2, 1, 3] = bad
        folder = tmp_path / f"f{bad}"
        folder.mkdir()
        write_idx_dataset(folder)
        write(folder / "train-images-idx3-ubyte.gz", idx_bytes(images, 0x0D))
        with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: 1 of 96 values are NaN or Inf"):
            data.load_dataset("mnist", data_dir=str(folder))


def test_idx_nan_or_fractional_float_labels_are_refused(tmp_path):
    for bad, msg in ((np.nan, "NaN or Inf"), (2.5, "whole numbers")):
        labels = np.array([1, 2, 3, 4, 5, bad])
        folder = tmp_path / f"l{bad}"
        folder.mkdir()
        write_idx_dataset(folder)
        write(folder / "train-labels-idx1-ubyte.gz", idx_bytes(labels, 0x0E))
        with pytest.raises(ValueError, match=rf"train-labels-idx1-ubyte\.gz.*{msg}"):
            data.load_dataset("mnist", data_dir=str(folder))
    labels = np.array([1.0, 2, 3, 4, 5, 6])  # whole-number float labels are fine
    folder = tmp_path / "whole"
    folder.mkdir()
    write_idx_dataset(folder)
    write(folder / "train-labels-idx1-ubyte.gz", idx_bytes(labels, 0x0E))
    assert data.load_dataset("mnist", data_dir=str(folder))[1].tolist() == [1, 2, 3, 4, 5, 6]


def test_idx_empty_training_set_is_refused(tmp_path):
    write_idx_dataset(tmp_path, n_train=0)
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz holds no images"):
        data.load_dataset("mnist", data_dir=str(tmp_path))
    write(tmp_path / "train-images-idx3-ubyte.gz", idx_bytes(np.zeros((6, 0, 4), np.uint8)))
    write(tmp_path / "train-labels-idx1-ubyte.gz", idx_bytes(np.zeros(6, np.uint8)))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.gz holds no images \(shape \(6, 0, 4\)\)"):
        data.load_dataset("mnist", data_dir=str(tmp_path))


def test_corrupt_gzip_body_directory_and_device_name_the_file(tmp_path):
    raw = bytearray(gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8).reshape(2, 10, 10))))
    raw[30:40] = b"\xff" * 10  # damage the deflate stream, keep the gzip header
    path = tmp_path / "body.gz"
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"body\.gz: cannot read"):
        data.read_idx(str(path))
    folder = tmp_path / "a-directory"
    folder.mkdir()
    for reader in (data.read_idx, data.read_cifar_batch):
        with pytest.raises(ValueError, match="a-directory: a directory"):
            reader(str(folder))
        with pytest.raises(ValueError, match="/dev/zero: not a regular file"):
            reader("/dev/zero")


def _pickled(obj):
    return pickle.dumps(obj, protocol=2)


class _Reduce:
    def __init__(self, *spec):
        self.spec = spec

    def __reduce__(self):
        return self.spec


def test_cifar_ndarray_reduce_and_forged_array_states_are_refused(tmp_path):
    """numpy.ndarray reached through REDUCE allocated an uninitialised array of any claimed shape (132
    bytes gave heap bytes, 1,140 bytes of files a 4.5 GB peak); the stand-ins build arrays only from
    bytes present in the file, after checking shape, dtype and size."""
    from numpy._core.multiarray import _reconstruct
    import codecs

    labels = [0, 1]
    cases = {
        "ndarray-reduce": (_Reduce(np.ndarray, ((2, 3072), "u1")), "refusing to call numpy.ndarray"),
        "ndarray-huge": (_Reduce(np.ndarray, ((1 << 20, 3072), "u1")), "refusing to call numpy.ndarray"),
        "state-too-short": (_Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (2, 3072), np.dtype("u1"), False, b"ab")),
                            r"needs 6144 bytes, the pickle holds 2"),
        "state-huge": (_Reduce(_reconstruct, (np.ndarray, (0,), b"b"),
                               (1, (1 << 30, 1 << 20), np.dtype("u1"), False, b"x")), "needs .* bytes, the pickle holds 1"),
        "state-3d": (_Reduce(_reconstruct, (np.ndarray, (0,), b"b"), (1, (1, 2, 3), np.dtype("u1"), False, b"abcdef")),
                     "refusing an array of shape"),
        "reconstruct-args": (_Reduce(_reconstruct, (np.ndarray, (5,), b"b")), "refusing numpy _reconstruct arguments"),
        "float-dtype": (np.zeros((2, 3072)), "refusing numpy dtype 'f8'"),
        "object-dtype": (np.array([1, "a"], dtype=object), "refusing numpy dtype 'O8'|refusing numpy dtype"),
        "codecs-other": (_Reduce(codecs.encode, ("x", "rot13")), r"refusing _codecs.encode"),
        "no-build": (_Reduce(_reconstruct, (np.ndarray, (0,), b"b")), "a numpy array without its data"),
    }
    for name, (value, msg) in cases.items():
        path = tmp_path / name
        path.write_bytes(_pickled({b"data": value, b"labels": labels}))
        tracemalloc.start()
        with pytest.raises(ValueError, match=rf"{name}.*({msg})"):
            data.read_cifar_batch(str(path))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1 << 20, (name, peak)


def test_cifar_labels_must_be_one_int_per_image(tmp_path):
    images = np.zeros((2, 3072), np.uint8)
    cases = {
        "float-list": [0.0, 1.0],
        "float-array": np.array([0.5, 1.0]),
        "nested": [[0], [1]],
        "2d-array": np.array([[0, 1], [1, 0]]),
        "strings": [b"cat", b"dog"],
        "str-array": np.array(["0", "1"]),
        "bools": [True, False],
        "none": None,
    }
    for name, labels in cases.items():
        path = tmp_path / name
        path.write_bytes(_pickled({b"data": images, b"labels": labels}))
        with pytest.raises(ValueError, match=rf"{name}.*(labels|refusing numpy dtype)"):
            data.read_cifar_batch(str(path))
    path = tmp_path / "int-array"  # an integer array is one int per image too
    path.write_bytes(pickle.dumps({b"data": images, b"labels": np.array([3, 4], np.int32)}, protocol=5))
    assert data.read_cifar_batch(str(path))[1].tolist() == [3, 4]


def test_cifar_python2_style_batch(tmp_path):
    """The opcodes a Python 2 cPickle of a real batch uses: STRING data read as bytes, numpy's
    _reconstruct + BUILD, big batches compared bit for bit."""
    images = np.random.default_rng(0).integers(0, 256, size=(3, 3072), dtype=np.uint8)

    def string(b: bytes) -> bytes:  # protocol-1 BINSTRING, what Python 2 writes for str
        return b"T" + struct.pack("<I", len(b)) + b

    body = (b"\x80\x02}q\x00(" + string(b"data")
            + b"cnumpy.core.multiarray\n_reconstruct\nq\x01cnumpy\nndarray\nq\x02K\x00\x85" + string(b"b") + b"\x87R"
            + b"(K\x01K\x03M\x00\x0c\x86cnumpy\ndtype\nq\x03" + string(b"u1") + b"K\x00K\x01\x87R"
            + b"(K\x03" + string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89" + string(images.tobytes())
            + b"tb" + string(b"labels") + b"]q\x04(K\x01K\x02K\x03e" + b"u.")
    path = tmp_path / "data_batch_1"
    path.write_bytes(body)
    got, labels = data.read_cifar_batch(str(path))
    np.testing.assert_array_equal(got, images)
    assert labels.tolist() == [1, 2, 3]
