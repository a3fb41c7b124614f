"""EGN's Gram at its cost: one n x n matrix in memory (the Cholesky factor written into K, solved without
a copy), on systems larger than the factorisation's block width; every step against the dense float64
LM solve (python_tests/_dense.py)."""
import pytest
import torch
from torch import nn

from revgn_ext.egn import EGN, loss_factors
from revgn_ext.ops.gram import IN_PLACE_BLOCK

from _dense import dense_direction, flat

pytestmark = pytest.mark.filterwarnings("ignore:.*reference.*:RuntimeWarning")


def mlp(d_in, hidden, c, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, c)).double()


def batch(b, d_in, c, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d_in, generator=g, dtype=torch.float64), torch.randint(0, c, (b,), generator=g)


def step_change(model, opt, x, y):
    before = [p.detach().clone() for p in model.parameters()]
    stats = opt.step(x, y)
    return [p.detach() - w for p, w in zip(model.parameters(), before)], stats


@pytest.mark.parametrize("b", [IN_PLACE_BLOCK // 10 + 3, 3 * IN_PLACE_BLOCK // 10 + 1])
def test_exact_ce_step_across_factor_blocks_equals_dense_solve(b):
    # n = 10 b rows: two and four blocks of the in-place factorisation
    c, lam = 10, 0.2
    model = mlp(6, 9, c)
    x, y = batch(b, 6, c)
    ref = dense_direction(model, x, y, "cross_entropy", lam)
    opt = EGN(model, lr=1.0, damping=lam, loss="cross_entropy")
    d, stats = step_change(model, opt, x, y)
    assert stats["accepted"] and stats["cholesky_retries"] == 0
    err = float((flat(d) - ref).abs().max())
    assert err < 1e-10 * max(1.0, float(ref.abs().max())) and float(ref.abs().max()) > 1e-3


def test_sampled_step_across_factor_blocks_equals_dense_solve():
    # the sampled system (b k rows) through the same in-place factor, against the dense solve of the same draws
    b, c, k, lam = IN_PLACE_BLOCK + 20, 5, 1, 0.3
    model = mlp(4, 6, c)
    x, y = batch(b, 4, c)
    opt = EGN(model, damping=lam, loss="cross_entropy", curvature="sampled", samples=k)
    torch.manual_seed(7)
    d = flat(opt.direction(x, y))
    torch.manual_seed(7)
    S = loss_factors.sampled_factor("cross_entropy", model(x).detach(), y, k).S
    ref = dense_direction(model, x, y, "cross_entropy", lam, S=S)
    assert float((d - ref).abs().max()) < 1e-10 * max(1.0, float(ref.abs().max()))


def test_step_allocates_one_gram_sized_matrix(monkeypatch):
    # K is the only allocation of n x n scale in a step above PLAIN_MAX_ROWS rows: the factor is written
    # into it and the solve reads it uncopied (before: a damped copy, an identity, L, and
    # cholesky_solve's copy of L). Up to PLAIN_MAX_ROWS rows the CPU step factors a copy (a plain LAPACK
    # factor, checked in the step's one host sync); lowered here so that a small system takes the big path.
    import revgn_ext.egn.cholesky as egn_cholesky
    b, c = 80, 10
    n = b * (c - 1)   # the exact cross-entropy factor has c - 1 columns
    monkeypatch.setattr(egn_cholesky, "PLAIN_MAX_ROWS", n - 1)
    model = mlp(6, 9, c)
    x, y = batch(b, 6, c)
    opt = EGN(model, lr=1.0, damping=0.2, loss="cross_entropy", gram_block_rows=n // 8)
    opt.step(x, y)   # the first step verifies the call pattern
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        stats = opt.step(x, y)
    assert stats["accepted"]
    allocating = [e for e in prof.events() if e.cpu_memory_usage > 0]
    leaves = [e for e in allocating if not any(ch.cpu_memory_usage > 0 for ch in e.cpu_children)]
    big = [e.cpu_memory_usage for e in leaves if e.cpu_memory_usage >= n * n * 8 // 2]
    assert big == [n * n * 8], f"allocations of n x n scale: {big}"


# --------------------------------------------------------------------------------------------------
# curvature="sampled": S^T J g from K's factors, the categorical draws, a hidden use caught
# --------------------------------------------------------------------------------------------------

class Mixed(nn.Module):
    """Embedding ids (Kronecker ids), a grouped conv (dense per-sample rows), a conv and linears (Kronecker
    features, weight and bias merged), a parameter no rule covers and an embedding with a use no hook sees
    (both torch.func rows)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.gconv = nn.Conv1d(4, 4, 3, groups=2)
        self.mix = nn.Linear(4, 5)
        self.scale = nn.Parameter(torch.randn(5))
        self.head = nn.Linear(5, 3)
        self.ids = nn.Embedding(60, 3)   # a vocabulary large enough for the Kronecker form

    def forward(self, ids):
        h = self.emb(ids).transpose(1, 2)                      # (b, 4, T)
        h = torch.tanh(self.gconv(torch.tanh(self.conv(h))))    # (b, 4, T - 2)
        h = torch.tanh(self.mix(h.mean(2))) * self.scale        # (b, 5)
        return self.head(h) + h[:, :3] @ self.emb.weight[:3, :3] + self.ids(ids).mean(1)


def test_factor_products_equal_dense_jacobian_products():
    from revgn_ext.distributed import SingleProcess
    from revgn_ext.egn.gram import gram_assembler
    from _dense import jacobian
    torch.manual_seed(3)
    model = Mixed().double()
    ids = torch.randint(0, 5, (6, 7))
    params = [p for p in model.parameters()]
    columns = torch.randn(2, 6, 3, dtype=torch.float64)   # m = 2 columns per sample
    with pytest.warns(RuntimeWarning, match="torch.func"):   # the tied weight's hidden use moves it there
        ranks = SingleProcess()
        assembly = gram_assembler(model, params).assemble(
            ids, lambda fwd: (columns, ranks.agree(lambda: fwd(ids), lambda: 6)), ranks)
    assert assembly.rows and len(assembly.rows) > len(assembly.checked)
    assert any(getattr(fa, "kron", None) is not None and fa.kron.kind == "ids" for fa in assembly.rows)
    v = [torch.randn_like(p) for p in params]
    J = jacobian(model, ids)                                # (b, c, d)
    want = torch.einsum("aic,icd,d->ia", columns, J, flat(v))
    got = assembly.apply(v)
    assert float((got - want).abs().max()) < 1e-12 * max(1.0, float(want.abs().max()))
    K = torch.einsum("aic,icd->iad", columns, J).reshape(12, -1)
    assert float((assembly.gram - K @ K.T).abs().max()) < 1e-12 * float((K @ K.T).abs().max())


def test_inverse_cdf_draws_follow_the_predictive_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.0, 0.3], [0.05, 0.0, 0.9, 0.05]], dtype=torch.float64))
    y = torch.tensor([0, 1])
    k = 40000
    S = loss_factors.sampled_factor("cross_entropy", logits, y, k, torch.Generator().manual_seed(0)).S
    p = torch.softmax(logits, 1)
    drawn = (p[:, :, None] - S * k ** 0.5).round()          # one-hot of the drawn class per column
    freq = drawn.mean(2)
    assert torch.equal(drawn.sum(1), torch.ones(2, k, dtype=torch.float64))
    assert float(freq[0, 2]) == 0.0 and float(freq[1, 1]) == 0.0   # probability 0: never drawn
    assert float(((freq - p).abs() / (p * (1 - p) / k).clamp_min(1e-30).sqrt()).nan_to_num().max()) < 5.0


def test_sampled_hidden_use_appearing_later_is_caught():
    # S^T J g comes from K's factors: a use no hook sees makes it wrong with K, and the per-step check
    # of J^T S u must redo the solve with the parameter on torch.func (same draws replayed)
    class Sometimes(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(3, 3)
            self.out = nn.Linear(3, 4)
            self.hidden = False

        def forward(self, x):
            h = torch.tanh(self.enc(x))
            if self.hidden:
                h = h + nn.functional.linear(h, self.enc.weight.t())
            return self.out(h)

    torch.manual_seed(13)
    model = Sometimes().double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 4, (8,))
    opt = EGN(model, damping=0.4, loss="cross_entropy", curvature="sampled")
    opt.direction(x, y)
    model.hidden = True
    torch.manual_seed(5)
    with pytest.warns(RuntimeWarning, match=r"'enc.weight'.*torch.func"):
        d = flat(opt.direction(x, y))
    assert opt._assembler.fallback_names == ["enc.weight"]
    f = model(x).detach()
    torch.manual_seed(5)
    loss_factors.sampled_factor("cross_entropy", f, y, 1)   # the first solve's draws, discarded with it
    S = loss_factors.sampled_factor("cross_entropy", f, y, 1).S
    ref = dense_direction(model, x, y, "cross_entropy", 0.4, S=S)
    assert float((d - ref).abs().max()) < 1e-10 * max(1.0, float(ref.abs().max()))


def test_large_systems_are_factored_in_place():
    # Above PLAIN_MAX_ROWS rows the step never takes the copying plain factor (one Gram in memory).
    from revgn_ext.egn.cholesky import PLAIN_MAX_ROWS, plain_factor
    assert plain_factor(torch.zeros(PLAIN_MAX_ROWS, PLAIN_MAX_ROWS))
    assert not plain_factor(torch.zeros(PLAIN_MAX_ROWS + 1, PLAIN_MAX_ROWS + 1))
    assert not plain_factor(torch.zeros(4, 4, device="meta"))
