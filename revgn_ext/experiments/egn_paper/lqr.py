"""Q-learning on a discrete-time linear-quadratic regulator: the RL task of the EGN paper.

Plant x' = A x + B u, stage cost c(x, u) = x^T Qc x + u^T Rc u, discount gamma. For a linear policy
u = -K x the Q-function is exactly quadratic, Q_K(x, u) = z^T H_K z with z = [x; u] and

    H_K = C + gamma M_K^T H_K M_K,    C = blockdiag(Qc, Rc),    M_K = [A  B; -K A  -K B]

(the Bellman equation of K, since z' = [x'; -K x'] = M_K z). The optimal Q-function H* comes from the
discounted Riccati solution P* = solve_discrete_are(sqrt(gamma) A, sqrt(gamma) B, Qc, Rc) as
H* = C + gamma [A B]^T P* [A B], and its greedy policy K* = H*_uu^{-1} H*_ux satisfies H* = H_{K*}.

The learner is the quadratic model Q_theta(z) = z^T H z with a learned symmetric H, written as a linear
layer on the quadratic features phi(z) (z_i^2 on the diagonal, 2 z_i z_j above it), so theta holds the
upper triangle of H. It is trained by TD regression: every update takes one transition from each of
``b`` parallel episodes (behaviour u = -K x + sigma * noise, episodes of ``episode_length`` steps with
resets to x0 ~ N(0, I)), with targets y = c(x, u) + gamma Q_theta(x', -K x') at the current theta (no
gradient through the target). Every ``improve_every`` updates the policy is improved greedily,
K <- H_uu^{-1} H_ux, if H_uu is positive definite (otherwise K is kept).

The metric is ||H* - H_theta||_F; ||H_K - H_theta||_F (the current policy's own Q-function) is logged
beside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

__all__ = ["Plant", "PLANTS", "LQRSetup", "discretise", "optimal_q", "policy_q", "greedy_policy",
           "bellman_residual", "QuadraticQ", "quadratic_features", "LQRProblem", "lstd_q", "lstd_run"]

DT = 0.1


def _linalg():
    """scipy.linalg, imported on first use so that the command line builds (and checks its
    dependencies) without it."""
    import scipy.linalg

    return scipy.linalg


def discretise(Ac: np.ndarray, Bc: np.ndarray, dt: float = DT):
    """Zero-order-hold discretisation: exp([[Ac, Bc], [0, 0]] dt) = [[A, B], [0, I]]."""
    n, m = Bc.shape
    block = np.zeros((n + m, n + m))
    block[:n, :n], block[:n, n:] = Ac, Bc
    E = _linalg().expm(block * dt)
    return E[:n, :n], E[:n, n:]


@dataclass(frozen=True)
class Plant:
    name: str
    description: str
    Ac: tuple
    Bc: tuple
    Qc: tuple
    Rc: tuple
    K0: tuple | None = None       # initial policy gain; None: zero gain (the plant must be stable)

    def matrices(self):
        A, B = discretise(np.array(self.Ac, float), np.array(self.Bc, float))
        return A, B, np.array(self.Qc, float), np.array(self.Rc, float)


PLANTS = {
    "lqr-stable": Plant(
        "lqr-stable",
        "mass-spring-damper (m = 1, k = 1, c = 0.5), states [position, velocity], force input; "
        "open-loop poles -0.25 +- 0.97i (stable); initial policy K0 = 0",
        Ac=((0.0, 1.0), (-1.0, -0.5)), Bc=((0.0,), (1.0,)), Qc=((1.0, 0.0), (0.0, 1.0)), Rc=((1.0,),)),
    "lqr-unstable": Plant(
        "lqr-unstable",
        "inverted pendulum with a first-order actuator (g/l = 1, friction 0.1, actuator time constant 0.2 s), "
        "states [angle, angular velocity, torque], torque command input; open-loop poles +0.95, -1.05, -5 "
        "(unstable); initial policy K0 = the LQR gain for Qc = 10 I, Rc = 10 (stabilising, not optimal)",
        Ac=((0.0, 1.0, 0.0), (1.0, -0.1, 1.0), (0.0, 0.0, -5.0)), Bc=((0.0,), (0.0,), (5.0,)),
        Qc=((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)), Rc=((1.0,),), K0="lqr"),
}


@dataclass(frozen=True)
class LQRSetup:
    """The learning set-up shared by both plants (written out in the report)."""
    gamma: float = 0.95
    noise: float = 1.0              # exploration noise std on the actions
    episode_length: int = 25        # steps (2.5 s) before a reset to x0 ~ N(0, I)
    improve_every: int = 100        # updates between greedy policy improvements
    reset_norm: float = 50.0        # an episode whose state leaves this ball is reset early

    def describe(self) -> str:
        return (f"dt = {DT}, discount gamma = {self.gamma}, exploration noise N(0, {self.noise}^2) on u, "
                f"episodes of {self.episode_length} steps with resets to x0 ~ N(0, I) (or earlier if "
                f"||x|| > {self.reset_norm}), one transition from each of b parallel episodes per update, "
                f"TD target c + gamma Q(x', -K x') at the current H, greedy policy improvement "
                f"K <- H_uu^-1 H_ux every {self.improve_every} updates (kept if H_uu is not positive definite)")


def initial_gain(plant: Plant, A, B) -> np.ndarray:
    n, m = B.shape
    if plant.K0 is None:
        return np.zeros((m, n))
    P = _linalg().solve_discrete_are(A, B, 10 * np.eye(n), 10 * np.eye(m))
    return np.linalg.solve(10 * np.eye(m) + B.T @ P @ B, B.T @ P @ A)


def cost_matrix(Qc, Rc) -> np.ndarray:
    return _linalg().block_diag(Qc, Rc)


def optimal_q(A, B, Qc, Rc, gamma: float) -> np.ndarray:
    """H* of the discounted problem from the discrete algebraic Riccati equation."""
    s = math.sqrt(gamma)
    P = _linalg().solve_discrete_are(s * A, s * B, Qc, Rc)
    AB = np.hstack([A, B])
    return cost_matrix(Qc, Rc) + gamma * AB.T @ P @ AB


def closed_loop(A, B, K) -> np.ndarray:
    """M_K, the map z -> z' = [x'; -K x'] with x' = A x + B u."""
    AB = np.hstack([A, B])
    return np.vstack([AB, -K @ AB])


def policy_q(A, B, Qc, Rc, K, gamma: float) -> np.ndarray:
    """H_K of the policy u = -K x (Bellman equation as a discrete Lyapunov equation); NaN when
    sqrt(gamma) (A - B K) is not stable, where the Q-function is infinite."""
    if np.max(np.abs(np.linalg.eigvals(math.sqrt(gamma) * (A - B @ K)))) >= 1:
        return np.full((A.shape[0] + B.shape[1],) * 2, np.nan)
    M = closed_loop(A, B, K)
    return _linalg().solve_discrete_lyapunov(math.sqrt(gamma) * M.T, cost_matrix(Qc, Rc))


def greedy_policy(H: np.ndarray, n: int):
    """K = H_uu^-1 H_ux, or None when H_uu is not positive definite (no minimiser over u)."""
    Huu, Hux = H[n:, n:], H[n:, :n]
    if not np.all(np.isfinite(H)) or np.min(np.linalg.eigvalsh(0.5 * (Huu + Huu.T))) <= 0:
        return None
    return np.linalg.solve(Huu, Hux)


def bellman_residual(H, A, B, Qc, Rc, K, gamma: float) -> float:
    """||H - C - gamma M_K^T H M_K||_F."""
    M = closed_loop(A, B, K)
    return float(np.linalg.norm(H - cost_matrix(Qc, Rc) - gamma * M.T @ H @ M))


# ------------------------------------------------------------------------------------------- the learner

def quadratic_features(z: torch.Tensor) -> torch.Tensor:
    """phi(z) with z^T H z = phi(z) . theta(H): z_i^2, then 2 z_i z_j for i < j (row-major upper triangle)."""
    n = z.shape[1]
    i, j = torch.triu_indices(n, n, device=z.device)
    weight = torch.where(i == j, 1.0, 2.0).to(z.dtype)
    return z[:, i] * z[:, j] * weight


class QuadraticQ(nn.Module):
    """Q(z) = z^T H z, a linear layer (no bias) on the precomputed features phi(z)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(n * (n + 1) // 2, 1, bias=False)

    def forward(self, phi: torch.Tensor) -> torch.Tensor:
        return self.linear(phi)

    def matrix(self) -> np.ndarray:
        theta = self.linear.weight.detach().double().cpu().reshape(-1)
        i, j = torch.triu_indices(self.n, self.n)
        H = torch.zeros(self.n, self.n, dtype=torch.float64)
        H[i, j] = theta
        H[j, i] = theta
        return H.numpy()


@dataclass
class LQRProblem:
    """One Q-learning run's environment: parallel episodes, the current policy and its RNG.

    ``next_batch(model)`` returns (phi(z), TD target) for b transitions and advances the episodes;
    ``after_update(model)`` counts updates and improves the policy every ``improve_every``.
    ``state_dict`` / ``load_state_dict`` make a resumed run continue exactly.
    """
    plant: Plant
    batch_size: int
    seed: int
    setup: LQRSetup = field(default_factory=LQRSetup)
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        self.A, self.B, self.Qc, self.Rc = self.plant.matrices()
        self.n, self.m = self.B.shape
        self.H_opt = optimal_q(self.A, self.B, self.Qc, self.Rc, self.setup.gamma)
        self.gen = torch.Generator().manual_seed(10_007 * self.seed + 17)
        self.K = initial_gain(self.plant, self.A, self.B)
        self.x = self._draw((self.batch_size, self.n))
        self.t = np.zeros(self.batch_size, dtype=np.int64)
        self.updates = 0
        self.improvements = 0
        self._H_policy = None

    def _draw(self, shape) -> np.ndarray:
        return torch.randn(*shape, generator=self.gen, dtype=torch.float64).numpy()

    @property
    def dim(self) -> int:
        return self.n + self.m

    def make_model(self, seed: int) -> QuadraticQ:
        torch.manual_seed(seed)
        return QuadraticQ(self.dim).to(device=self.device, dtype=self.dtype)

    def _features(self, z: np.ndarray) -> torch.Tensor:
        return quadratic_features(torch.from_numpy(z).to(self.device, self.dtype))

    def transitions(self):
        """(z = [x; u], cost, x') for one transition of each of the b episodes (behaviour u = -K x + noise),
        and advance the episodes. :meth:`next_batch` and :func:`lstd_run` draw the same transitions."""
        x = self.x
        u = -x @ self.K.T + self.setup.noise * self._draw((self.batch_size, self.m))
        cost = np.einsum("bi,ij,bj->b", x, self.Qc, x) + np.einsum("bi,ij,bj->b", u, self.Rc, u)
        x_next = x @ self.A.T + u @ self.B.T
        self._advance(x_next)
        return np.hstack([x, u]), cost, x_next

    @torch.no_grad()
    def next_batch(self, model: QuadraticQ):
        z, cost, x_next = self.transitions()
        z_next = np.hstack([x_next, -x_next @ self.K.T])
        target = torch.from_numpy(cost).to(self.device, self.dtype)[:, None] + \
            self.setup.gamma * model(self._features(z_next))
        return self._features(z), target

    def _advance(self, x_next: np.ndarray) -> None:
        """Advance the episodes, resetting finished or escaping ones."""
        self.t += 1
        reset = (self.t >= self.setup.episode_length) | ~np.all(np.isfinite(x_next), axis=1) | \
            (np.linalg.norm(np.nan_to_num(x_next, nan=np.inf), axis=1) > self.setup.reset_norm)
        fresh = self._draw((self.batch_size, self.n))
        self.x = np.where(reset[:, None], fresh, x_next)
        self.t[reset] = 0

    def after_update(self, model: QuadraticQ) -> None:
        self.updates += 1
        if self.updates % self.setup.improve_every == 0:
            K = greedy_policy(model.matrix(), self.n)
            if K is not None:
                self.K = K
                self.improvements += 1
                self._H_policy = None

    def evaluate(self, model: QuadraticQ) -> dict:
        H = model.matrix()
        if self._H_policy is None:
            self._H_policy = policy_q(self.A, self.B, self.Qc, self.Rc, self.K, self.setup.gamma)
        return {"metric": float(np.linalg.norm(self.H_opt - H)),
                "policy_error": float(np.linalg.norm(self._H_policy - H)),
                "gain_error": float(np.linalg.norm(self.K - greedy_policy(self.H_opt, self.n))),
                "improvements": self.improvements}

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "K": torch.from_numpy(self.K.copy()),
                "x": torch.from_numpy(self.x.copy()), "t": torch.from_numpy(self.t.copy()),
                "updates": self.updates, "improvements": self.improvements}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.K = state["K"].numpy().copy()
        self.x = state["x"].numpy().copy()
        self.t = state["t"].numpy().copy()
        self.updates, self.improvements = int(state["updates"]), int(state["improvements"])
        self._H_policy = None


# ------------------------------------------------------------------------------------------- LSTD baseline

def lstd_q(z: np.ndarray, cost: np.ndarray, x_next: np.ndarray, K: np.ndarray, gamma: float) -> np.ndarray:
    """H of the least-squares fixed point of Q-evaluation for the policy u = -K x (LSTD-Q) on the
    transitions (z, cost, x'): theta solves sum phi (phi - gamma phi')^T theta = sum phi c with
    phi = phi(z), phi' = phi([x'; -K x']). The Q-model is linear in H, so this is what an exact GN step
    converges to on these transitions; off-policy, so transitions of earlier behaviour policies count.
    On noise-free dynamics with enough distinct transitions it is the policy's own H_K exactly."""
    zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float64))
    zn = torch.from_numpy(np.hstack([x_next, -x_next @ K.T]).astype(np.float64))
    phi, phi_next = quadratic_features(zt).numpy(), quadratic_features(zn).numpy()
    M = phi.T @ (phi - gamma * phi_next)
    theta = np.linalg.lstsq(M, phi.T @ cost, rcond=None)[0]
    d = z.shape[1]
    i, j = np.triu_indices(d)
    H = np.zeros((d, d))
    H[i, j] = theta
    H[j, i] = theta
    return H


def lstd_run(plant: Plant, batch_size: int, seed: int, steps: int, setup: LQRSetup | None = None) -> dict:
    """The LSTD baseline of an LQR task: the same transitions as a run of ``steps`` updates of ``batch_size``
    episodes (:meth:`LQRProblem.transitions`, same seeds), with least-squares policy iteration on the
    same schedule (every ``improve_every`` updates: H <- :func:`lstd_q` on every transition so far for the
    current K, then K <- greedy(H) if H_uu is positive definite). Returns {"metric": ||H* - H||_F,
    "policy_error", "improvements", "cpu_s": process CPU seconds of the solves}."""
    import time

    problem = LQRProblem(plant, batch_size, seed, setup or LQRSetup(), dtype=torch.float64)
    zs, cs, xs = [], [], []
    H = np.zeros((problem.dim, problem.dim))
    cpu = 0.0
    for step in range(1, steps + 1):
        z, c, x_next = problem.transitions()
        zs.append(z), cs.append(c), xs.append(x_next)
        if step % problem.setup.improve_every == 0 or step == steps:
            c0 = time.process_time()
            H = lstd_q(np.concatenate(zs), np.concatenate(cs), np.concatenate(xs), problem.K, problem.setup.gamma)
            cpu += time.process_time() - c0
            if step % problem.setup.improve_every == 0:
                K = greedy_policy(H, problem.n)
                if K is not None:
                    problem.K = K
                    problem.improvements += 1
                    problem._H_policy = None
    H_policy = policy_q(problem.A, problem.B, problem.Qc, problem.Rc, problem.K, problem.setup.gamma)
    return {"metric": float(np.linalg.norm(problem.H_opt - H)), "policy_error": float(np.linalg.norm(H_policy - H)),
            "improvements": problem.improvements, "cpu_s": cpu, "H": H}


def lstd_summary(task: str, batch_size: int, seeds, steps: int) -> dict:
    """LSTD on task ``task`` for each seed (:func:`lstd_run`): {"metric", "policy_error", "cpu_s"} as
    :class:`..common.protocol.Stat` over seeds, plus the settings."""
    from ..common import protocol

    runs = [lstd_run(PLANTS[task], batch_size, seed, steps) for seed in seeds]
    return {k: protocol.aggregate([r[k] for r in runs]) for k in ("metric", "policy_error", "cpu_s", "improvements")} \
        | {"steps": steps, "batch_size": batch_size, "seeds": list(seeds)}
