"""Checkpoints: every damaged or inconsistent file is refused with one line naming it (exit code 2 from
the command line), single-byte flips are caught by the content checksum, a stray checkpoint.pt.tmp
from a killed write is removed with a warning, and a good checkpoint still resumes bit-identically
(test_experiments.py). Before: torch.load checked nothing, so most byte flips resumed with different
weights, NaN weights and epoch = 10**9 resumed silently, and OSError / EOFError / KeyError reached the
user as tracebacks."""
import io
import os
import pickle
import warnings
import zipfile

import pytest
import torch

from revgn_ext.experiments.common import checkpoint as ck
from revgn_ext.experiments.revgn_paper.resume import load as load_run_checkpoint
from revgn_ext.experiments import cli
from revgn_ext.experiments.common.records import CHECKPOINT, load_history
from revgn_ext.experiments.revgn_paper.runner import run
from test_experiments import TINY, tiny_config

ARGS = ["train", *TINY, "--optimizer", "adam", "--epochs", "2"]


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A one-epoch Adam run: (its folder, the checkpoint's bytes)."""
    out = str(tmp_path_factory.mktemp("good"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run(tiny_config(optimizer="adam", epochs=1), out, progress=False)
    with open(os.path.join(out, CHECKPOINT), "rb") as f:
        return out, f.read()


def resume_cli(out, capsys):
    """Resume through the command line; returns (exit code, stderr)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SystemExit) as e:
            cli.main(ARGS + ["--out", out, "--resume"])
    return e.value.code, capsys.readouterr().err


def write(tmp_path, data: bytes, name="run"):
    out = tmp_path / name
    out.mkdir()
    (out / CHECKPOINT).write_bytes(data)
    return str(out)


def payload_of(good):
    return load_run_checkpoint(os.path.join(good[0], CHECKPOINT))


def test_every_single_byte_flip_is_caught_or_harmless(good):
    path, data = good
    want = ck.content_digest(payload_of(good))
    tmp = os.path.join(path, "flipped.pt")
    positions = sorted(set(range(0, len(data), max(1, len(data) // 150))) | set(range(len(data) - 64, len(data))))
    caught = 0
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 0x5A
        with open(tmp, "wb") as f:
            f.write(flipped)
        try:
            got = load_run_checkpoint(tmp)
        except ck.CheckpointError as e:
            assert "flipped.pt" in str(e) and "\n" not in str(e)
            caught += 1
            continue
        # a flip the loader does not see (zip padding, an unused header field) must leave the content intact
        assert ck.content_digest(got) == want, f"byte {pos} changed the resumed state silently"
    assert caught > len(positions) // 2


@pytest.mark.slow
def test_corrupt_files_get_one_line_and_exit_code_2(good, tmp_path, capsys):
    data = good[1]
    blob = torch.load(io.BytesIO(data), weights_only=True)

    def saved(obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getvalue()

    def zipped(name, content):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr(name, content)
        return buf.getvalue()

    no_model = {**blob, "payload": {k: v for k, v in blob["payload"].items() if k != "model"}}
    no_model["sha256"] = ck.content_digest(no_model["payload"])
    cases = {
        "empty": b"",
        "truncated-half": data[:len(data) // 2],
        "truncated-end": data[:-10],
        "random": bytes(range(256)) * 40,
        "text": b"not a checkpoint\n",
        "zip-other": zipped("archive/data.pkl", b"garbage"),
        "zip-empty": zipped("x", b""),
        "pickle-bomb-free": pickle.dumps({"a": 1}),
        "old-format": saved(blob["payload"]),
        "wrong-format": saved({**blob, "format": "other/9"}),
        "bad-checksum": saved({**blob, "sha256": "0" * 64}),
        "missing-key": saved(no_model),
        "a-list": saved([1, 2, 3]),
        "tensor-only": saved(torch.zeros(3)),
        "nul": b"\0" * 4096,
    }
    for name, content in cases.items():
        code, err = resume_cli(write(tmp_path, content, name), capsys)
        assert code == 2, name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, (name, err)
        assert CHECKPOINT in lines[0] and ("unusable" in lines[0] or "no checkpoint" in lines[0]), (name, err)


@pytest.mark.slow
def test_checkpoint_that_is_a_directory(tmp_path, capsys):
    out = tmp_path / "run"
    (out / CHECKPOINT).mkdir(parents=True)
    code, err = resume_cli(str(out), capsys)
    assert code == 2 and "not a regular file" in err


@pytest.mark.slow
def test_non_finite_weights_and_absurd_epoch_are_refused(good, tmp_path, capsys):
    payload = payload_of(good)
    bad_weights = {**payload, "model": {**payload["model"]}}
    name = next(iter(bad_weights["model"]))
    bad_weights["model"][name] = bad_weights["model"][name].clone().fill_(float("nan"))
    bad_moment = {**payload, "optimizer": {**payload["optimizer"], "state": {
        0: {**payload["optimizer"]["state"][0], "exp_avg": payload["optimizer"]["state"][0]["exp_avg"] * float("inf")}}}}
    cases = [(bad_weights, f"model.{name} contains NaN or Inf"),
             (bad_moment, "optimizer.state.0.exp_avg contains NaN or Inf"),
             ({**payload, "epoch": 10 ** 9}, "epoch 1000000000 does not fit"),
             ({**payload, "epoch": 0}, "epoch 0 does not fit"),
             ({**payload, "history": payload["history"][:1]}, "does not fit its history"),
             ({**payload, "config": {**payload["config"], "hidden": "wide"}}, "config is invalid|hidden"),
             ({**payload, "rng": {}}, "RNG state")]
    for i, (bad, msg) in enumerate(cases):
        out = tmp_path / f"r{i}"
        out.mkdir()
        ck.save(str(out / CHECKPOINT), bad)  # a valid checksum over an invalid state
        with pytest.raises(ck.CheckpointError, match=msg):
            load_run_checkpoint(str(out / CHECKPOINT))
        code, err = resume_cli(str(out), capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_state_that_does_not_fit_the_model(good, tmp_path, capsys):
    payload = payload_of(good)
    model = {k: (v[:, :5].clone() if v.dim() == 2 else v) for k, v in payload["model"].items()}
    out = tmp_path / "r"
    out.mkdir()
    ck.save(str(out / CHECKPOINT), {**payload, "model": model})
    code, err = resume_cli(str(out), capsys)
    assert code == 2 and "does not fit this run" in err and len(err.strip().splitlines()) == 1


def test_stray_tmp_from_a_killed_write_is_removed_with_a_warning(good, tmp_path):
    out = write(tmp_path, good[1])
    tmp = os.path.join(out, CHECKPOINT + ".tmp")
    with open(tmp, "wb") as f:
        f.write(good[1][:1000])  # what a write killed halfway leaves
    with pytest.warns(RuntimeWarning, match="partial checkpoint left by an interrupted write"):
        run(tiny_config(optimizer="adam", epochs=2), out, resume=True, progress=False)
    assert not os.path.exists(tmp)
    assert [r["epoch"] for r in load_history(out)] == [0, 1, 2]
    assert load_run_checkpoint(os.path.join(out, CHECKPOINT))["epoch"] == 2


def test_save_is_atomic_and_loadable_by_torch(tmp_path):
    path = str(tmp_path / CHECKPOINT)
    payload = {"config": {}, "epoch": 1, "model": {"w": torch.arange(3.0)}, "optimizer": {}, "rng": {},
               "tracker": {}, "history": []}
    ck.save(path, payload)
    assert not os.path.exists(path + ".tmp")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == ck.FORMAT and raw["sha256"] == ck.content_digest(payload)
    one_ulp = torch.arange(3.0)
    one_ulp[2] = torch.nextafter(one_ulp[2], torch.tensor(3.0))
    assert ck.content_digest({**payload, "model": {"w": one_ulp}}) != raw["sha256"]
