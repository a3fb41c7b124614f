"""EGN under Lightning's automatic optimisation (examples/lightning_module.py): the closure path,
an LR scheduler, and checkpoint resume that continues exactly. Skipped without lightning."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

L = pytest.importorskip("lightning")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_module.py"


def load_example():
    spec = importlib.util.spec_from_file_location("lightning_module_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example():
    return load_example()


def fit(example, epochs, root, ckpt_path=None):
    L.seed_everything(0)
    train, val = example.data()
    model = example.Classifier()
    trainer = example.trainer(epochs, root)
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return model, trainer


def test_automatic_optimisation_trains_through_the_closure(example, tmp_path):
    model, trainer = fit(example, 3, tmp_path)
    opt = trainer.optimizers[0]
    assert opt.last_stats is not None and not opt.last_stats["refused"]
    assert opt.state[opt.param_groups[0]["params"][0]]["step"] == 3 * 6      # 6 batches an epoch
    assert opt.param_groups[0]["lr"] == pytest.approx(0.8 ** 3)             # the scheduler ran
    _, val = example.data()
    x, y = val.dataset.tensors
    L.seed_everything(0)
    untrained = example.Classifier()
    with torch.no_grad():
        before = float(torch.nn.functional.cross_entropy(untrained(x), y))
    assert float(trainer.callback_metrics["val_loss"]) < 0.7 * before


def test_checkpoint_resume_continues_exactly(example, tmp_path):
    straight, _ = fit(example, 4, tmp_path / "a")
    _, trainer = fit(example, 2, tmp_path / "b")
    ckpt = tmp_path / "two.ckpt"
    trainer.save_checkpoint(ckpt)
    resumed, trainer = fit(example, 4, tmp_path / "c", ckpt_path=str(ckpt))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.8 ** 4)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
