"""A small causal language model trained with EGN's sampled curvature: per-token cross-entropy on
padded batches of variable-length sequences.

    python examples/causal_lm.py

Embedding (+ learned positions) -> TransformerEncoderLayer with a causal mask made in the forward ->
Linear to the vocabulary. The loss is torch's spelling for a language model,
``nn.CrossEntropyLoss()(logits.reshape(-1, V), labels.reshape(-1))``, with the labels of padding
positions set to ignore_index (-100): EGN solves one row per kept token (curvature="sampled": one drawn
label per token), and its mean runs over the kept tokens, as torch's loss does.

The corpus is synthetic: each sequence counts from a random start with a random stride (mod 10),
so that a model which reads the previous two tokens predicts the rest.
"""
import torch
from torch import nn

import revgn_ext as rg

VOCAB = 12          # 0 = beginning of sequence, 1..10 = digits, 11 = padding (an input id only)
PAD, BOS, MAX_LEN = 11, 0, 16


class CausalLM(nn.Module):
    """Takes only the token tensor (b, T); the causal mask is made inside the forward."""

    def __init__(self, vocab=VOCAB, d=32, heads=4, ff=64, max_len=MAX_LEN):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d)
        self.positions = nn.Embedding(max_len, d)
        self.block = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids):
        T = ids.shape[1]
        where = torch.arange(T, device=ids.device).expand_as(ids)   # (b, T): the batch first, as for the tokens
        h = self.tokens(ids) + self.positions(where)
        mask = nn.Transformer.generate_square_subsequent_mask(T, device=ids.device, dtype=h.dtype)
        return self.head(self.block(h, src_mask=mask, is_causal=True))


def make_batch(n, generator):
    """(inputs, labels), both (n, MAX_LEN - 1): next-token labels, -100 where the sequence has ended."""
    seqs = torch.full((n, MAX_LEN), PAD)
    labels = torch.full((n, MAX_LEN), -100)
    for i in range(n):
        length = int(torch.randint(6, MAX_LEN + 1, (1,), generator=generator))
        start, stride = torch.randint(0, 10, (2,), generator=generator).tolist()
        digits = (start + (stride % 3 + 1) * torch.arange(length - 1)) % 10 + 1
        seqs[i, :length] = torch.cat([torch.tensor([BOS]), digits])
        labels[i, :length - 1] = digits
    return seqs[:, :-1], labels[:, :-1]


def train(steps=40, batch=16, seed=0, log=print):
    """Train for ``steps`` EGN steps; returns the held-out losses before training and after each tenth step."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = CausalLM()
    loss_fn = nn.CrossEntropyLoss()          # ignore_index=-100: padding has no loss and no row
    optimizer = rg.EGN(model, loss=loss_fn, lr=0.5, damping=1.0, curvature="sampled")
    x_test, y_test = make_batch(64, g)

    def held_out():
        with torch.no_grad():
            return float(loss_fn(model(x_test).reshape(-1, VOCAB), y_test.reshape(-1)))

    losses = [held_out()]
    log(f"step   0  held-out loss {losses[0]:.3f}")
    for step in range(1, steps + 1):
        x, y = make_batch(batch, g)

        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model(x).reshape(-1, VOCAB), y.reshape(-1))
            loss.backward()
            return loss

        optimizer.step(closure)
        if step % 10 == 0:
            losses.append(held_out())
            stats = optimizer.last_stats
            log(f"step {step:3d}  held-out loss {losses[-1]:.3f}  (batch loss {stats['loss']:.3f} over "
                f"{stats['batch_size']} kept tokens, {stats['time']['gram'] * 1e3:.0f} ms Gram)")
    return losses


if __name__ == "__main__":
    losses = train()
    assert losses[-1] < 0.7 * losses[0], f"the held-out loss did not go down: {losses}"
