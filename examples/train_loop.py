"""A plain PyTorch training loop with EGN: mini-batches from a DataLoader, the torch.optim closure,
an LR scheduler, evaluation, and a checkpoint that resumes exactly.

    python examples/train_loop.py

Swapping the optimizer line for ``torch.optim.LBFGS(model.parameters())`` runs the same loop.
"""
import copy

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import revgn_ext as rg


def make_data(n=1024, features=20, classes=3, seed=0):
    """x: (n, features) float32, y: (n,) int64 labels of a smooth rule with a little noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    score = x[:, :features // 2].sum(1) - 0.5 * x[:, features // 2:].sum(1)
    y = torch.bucketize(score + 0.3 * torch.randn(n, generator=g), torch.tensor([-2.0, 2.0]))
    return x, y


def evaluate(model, loss_fn, x, y):
    with torch.no_grad():
        out = model(x)
        return float(loss_fn(out, y)), float((out.argmax(1) == y).float().mean())


def train(epochs=3, seed=0, state=None):
    torch.manual_seed(seed)
    x, y = make_data()
    x_train, y_train, x_test, y_test = x[:768], y[:768], x[768:], y[768:]
    loader = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 3))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    optimizer = rg.EGN(model.parameters(), model=model, loss=loss_fn, lr=1.0, damping=1.0,
                       adaptive_damping=True)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    start = 0
    if state is not None:                  # resume: model, optimizer and scheduler state
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.generator.set_state(state["loader_rng"])
        start = state["epoch"]
    for epoch in range(start, epochs):
        for xb, yb in loader:
            def closure():
                optimizer.zero_grad()
                loss = loss_fn(model(xb), yb)
                loss.backward()
                return loss
            optimizer.step(closure)
        scheduler.step()
        test_loss, test_acc = evaluate(model, loss_fn, x_test, y_test)
        print(f"epoch {epoch + 1}: train loss {optimizer.last_stats['loss']:.4f}  test loss {test_loss:.4f}  "
              f"test acc {test_acc:.3f}  lr {scheduler.get_last_lr()[0]:.3f}  "
              f"damping {optimizer.param_groups[0]['damping']:.3f}")
        state = {"model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(optimizer.state_dict()),
                 "scheduler": scheduler.state_dict(), "epoch": epoch + 1, "loader_rng": loader.generator.get_state()}
    return model, state, test_acc


if __name__ == "__main__":
    model, state, acc = train(epochs=3)
    assert acc > 0.8, acc
    # A checkpoint after 2 epochs, resumed for the third, gives the same weights as 3 epochs in one go.
    _, after_two, _ = train(epochs=2)
    resumed, _, _ = train(epochs=3, state=after_two)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    print("resumed run identical:", same)
    assert same
