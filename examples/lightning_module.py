"""EGN under Lightning's automatic optimisation: Lightning hands its closure (training step and
backward) to ``optimizer.step(closure=...)``, and EGN reads the batch off it. With an LR scheduler
and checkpoint resume.

    python examples/lightning_module.py      # needs `pip install lightning`
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning as L

import revgn_ext as rg


class Classifier(L.LightningModule):
    def __init__(self, features=20, classes=3, hidden=32, lr=1.0, damping=1.0):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        self.log("val_loss", F.cross_entropy(out, y))
        self.log("val_acc", (out.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        # EGN needs the module it differentiates: the network that maps x to the logits.
        optimizer = rg.EGN(self.net.parameters(), model=self.net, loss=nn.CrossEntropyLoss(),
                           lr=self.hparams.lr, damping=self.hparams.damping)
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.8)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


def data(n=512, features=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, :10].sum(1) > 0).long() + (x[:, 10:].sum(1) > 0).long()
    train = DataLoader(TensorDataset(x[:384], y[:384]), batch_size=64, shuffle=False)
    val = DataLoader(TensorDataset(x[384:], y[384:]), batch_size=128)
    return train, val


def trainer(max_epochs, root):
    return L.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
                     enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
                     enable_checkpointing=False, deterministic=True)


if __name__ == "__main__":
    import tempfile

    L.seed_everything(0)
    train, val = data()
    model = Classifier()
    with tempfile.TemporaryDirectory() as root:
        t = trainer(3, root)
        t.fit(model, train, val)
        print({k: float(v) for k, v in t.callback_metrics.items()})
