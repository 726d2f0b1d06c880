"""Simulated annealing over configurations (bit vectors), many chains at once, on a surrogate's
predictions. Every method's space maps its configurations to bits (a kept head, an untreated layer).

Why these pieces: a surrogate fitted on ~300 configurations is only trustworthy near them (pilot:
annealing head masks over an unconstrained MLP returned masks with perplexity in the thousands). So the
objective adds, to the predicted fairness, (a) a hinge penalty when predicted utility breaks the
constraint, (b) optionally kappa x the ensemble's spread (pessimism where the members disagree), and (c)
optionally a penalty per bit of Hamming distance beyond a radius around the nearest evaluated
configuration. A configuration counts as feasible only inside the constraint and the radius; each chain
keeps the best feasible configuration it has evaluated.

Convention: configurations are bool (n, n_bits), True = untouched (the unrepaired model is all ones);
fairness and utility are both "lower is better" (e.g. |bias score| and log-perplexity);
`predict(configs)` takes float32 0/1 rows and returns (fairness_mean, fairness_std, utility_mean,
utility_std), each of shape (n,).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

Predict = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True, eq=False)
class TrustRegion:
    """Evaluated configurations (n, n_bits) and how far (Hamming bits) from the nearest one a
    configuration may go. Beyond `max_distance` each extra bit costs `penalty` objective units and the
    configuration is infeasible.
    """

    configs: np.ndarray
    max_distance: int
    penalty: float = 1.0


@dataclass(frozen=True, eq=False)
class ScoredConfigs:
    """Configurations with their predicted values; `feasible`: inside the utility constraint and trust
    region."""

    configs: np.ndarray  # (k, n_bits) bool
    fairness: np.ndarray  # (k,) predicted mean
    fairness_std: np.ndarray
    utility: np.ndarray
    utility_std: np.ndarray
    feasible: np.ndarray  # (k,) bool

    def __len__(self) -> int:
        return len(self.configs)


@dataclass(frozen=True, eq=False)
class AnnealResult:
    """`best`: per chain, the best feasible configuration it evaluated (its final state where it found none,
    with feasible=False); `final`: where each chain ended."""

    best: ScoredConfigs
    best_objective: np.ndarray  # (C,) fairness + kappa * fairness_std at best (inf where none feasible)
    final: ScoredConfigs
    acceptance: float  # fraction of proposals accepted, over all steps and chains
    n_evaluated: int  # configurations sent to `predict` while annealing
    seconds: float

    @property
    def configs_per_second(self) -> float:
        return self.n_evaluated / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True, eq=False)
class _Eval:
    objective: np.ndarray
    score: np.ndarray
    f: np.ndarray
    fs: np.ndarray
    u: np.ndarray
    us: np.ndarray
    feasible: np.ndarray


@dataclass(frozen=True)
class _Objective:
    predict: Predict
    constraint: float
    weight: float
    kappa: float
    trust: TrustRegion | None = None

    def __call__(self, configs: np.ndarray, dist: np.ndarray | None) -> _Eval:
        f, fs, u, us = (np.asarray(a, dtype=np.float64) for a in self.predict(configs.astype(np.float32)))
        score = f + self.kappa * fs
        excess = u + self.kappa * us - self.constraint
        feasible = excess <= 0
        if np.isinf(self.weight):
            penalty = np.where(feasible, 0.0, np.inf)
        else:
            penalty = self.weight * np.maximum(excess, 0.0)
        objective = score + penalty
        if dist is not None:
            beyond = np.maximum(dist - self.trust.max_distance, 0)
            objective = objective + self.trust.penalty * beyond
            feasible = feasible & (beyond == 0)
        return _Eval(objective, score, f, fs, u, us, feasible)


def anneal(
    predict: Predict,
    n_bits: int,
    *,
    n_chains: int = 512,
    n_steps: int = 2000,
    t0: float = 0.1,
    t_end: float = 1e-3,
    flips: int = 3,
    constraint: float = np.inf,
    weight: float = 10.0,
    kappa: float = 1.0,
    start: np.ndarray | None = None,
    max_changed: int | None = None,
    trust: TrustRegion | tuple | None = None,
    seed: int = 0,
) -> AnnealResult:
    """Minimise f + kappa*f_std + weight * max(0, u + kappa*u_std - constraint) (+ trust penalty).

    Each step proposes, for every chain, flipping 1..`flips` distinct random bits; proposals with more
    than `max_changed` bits at 0 are rejected; others are accepted by Metropolis at a temperature that
    falls geometrically from `t0` to `t_end` (objective units). `start`: one configuration or one per
    chain (default: all ones, the unrepaired model). `weight=inf` makes the utility constraint hard.
    `kappa` defaults to 1: on the synthetic benchmark (3 seeds) the best head mask broke the true "+5%
    perplexity" constraint in 3/3 runs with kappa=0 and 1/3 with kappa=1 (+6.1%): re-evaluate
    candidates on the model anyway.
    """
    if n_chains < 1 or n_steps < 0 or not 1 <= flips <= n_bits:
        raise ValueError("need n_chains >= 1, n_steps >= 0 and 1 <= flips <= n_bits")
    if not (t0 > 0 and t_end > 0):
        raise ValueError("temperatures must be positive")
    if trust is not None and not isinstance(trust, TrustRegion):
        trust = TrustRegion(*trust)
    rng = np.random.default_rng(seed)
    cur = _start(start, n_chains, n_bits)
    cap = n_bits if max_changed is None else int(max_changed)
    if (n_bits - cur.sum(1) > cap).any():
        raise ValueError(f"start changes more than max_changed={cap} bits")
    objective = _Objective(predict, float(constraint), float(weight), float(kappa), trust)

    began = time.perf_counter()
    if trust is not None:
        evaluated = np.asarray(trust.configs, dtype=bool).reshape(-1, n_bits)
        if len(evaluated) == 0:
            raise ValueError("trust region holds no evaluated configurations")
        t_cols = np.ascontiguousarray(evaluated.T)  # (n_bits, N)
        dmat = _hamming(cur, evaluated)  # (C, N), updated incrementally below
        c = objective(cur, dmat.min(1))
    else:
        dmat = None
        c = objective(cur, None)
    best = cur.copy()
    best_score = np.where(c.feasible, c.score, np.inf)
    best_vals = [a.copy() for a in (c.f, c.fs, c.u, c.us)]
    cur_obj = c.objective
    n_eval = n_chains
    n_accept = 0
    rows = np.arange(n_chains)[:, None]
    ratio = (t_end / t0) ** (1.0 / max(n_steps - 1, 1))

    for step in range(n_steps):
        temp = t0 * ratio**step
        pos = _distinct_positions(rng, n_chains, n_bits, flips)  # (C, flips)
        active = np.arange(flips)[None, :] < rng.integers(1, flips + 1, n_chains)[:, None]
        new_bits = ~cur[rows, pos]
        prop = cur.copy()
        r, p = np.broadcast_to(rows, pos.shape)[active], pos[active]
        prop[r, p] = ~prop[r, p]
        within_cap = n_bits - prop.sum(1) <= cap
        if dmat is not None:
            differs = (t_cols[pos] != new_bits[..., None]) & active[..., None]  # (C, flips, N)
            dprop = dmat + (2 * differs.sum(1, dtype=np.int16) - active.sum(1, dtype=np.int16)[:, None])
            e = objective(prop, dprop.min(1))
        else:
            e = objective(prop, None)
        n_eval += n_chains
        delta = e.objective - cur_obj
        with np.errstate(over="ignore", invalid="ignore"):
            accept = (delta <= 0) | (rng.random(n_chains) < np.exp(-delta / temp))
        accept &= within_cap
        cur[accept] = prop[accept]
        cur_obj = np.where(accept, e.objective, cur_obj)
        if dmat is not None:
            dmat[accept] = dprop[accept]
        n_accept += int(accept.sum())

        better = e.feasible & within_cap & (e.score < best_score)
        if better.any():
            best[better] = prop[better]
            best_score = np.where(better, e.score, best_score)
            for keep, new in zip(best_vals, (e.f, e.fs, e.u, e.us)):
                keep[better] = new[better]

    seconds = time.perf_counter() - began
    last = objective(cur, None if dmat is None else dmat.min(1))
    final = ScoredConfigs(cur, last.f, last.fs, last.u, last.us, last.feasible)
    found = np.isfinite(best_score)
    best[~found] = cur[~found]  # chains that never saw a feasible configuration report their final state
    for keep, new in zip(best_vals, (last.f, last.fs, last.u, last.us)):
        keep[~found] = new[~found]
    return AnnealResult(
        best=ScoredConfigs(best, *best_vals, found),
        best_objective=best_score,
        final=final,
        acceptance=n_accept / max(n_chains * n_steps, 1),
        n_evaluated=n_eval,
        seconds=seconds,
    )


@dataclass(frozen=True, eq=False)
class Candidates(ScoredConfigs):
    """Deduplicated configurations pooled from a sweep; `weight`: the first trade-off weight that produced each."""

    weight: np.ndarray


def sweep(
    predict: Predict,
    n_bits: int,
    *,
    weights: Sequence[float],
    seed: int = 0,
    include_final: bool = True,
    callback: Callable[[], object] | None = None,
    **anneal_kwargs,
) -> Candidates:
    """Anneal once per trade-off weight and pool the chains' configurations as candidates for a front.

    Large weights keep predicted utility inside the constraint; small ones let chains trade utility for
    fairness, so with `include_final` the chains' final (possibly infeasible) ones are pooled too,
    flagged by `feasible`. Pass the candidates' (fairness, utility) to `search.pareto.pareto_front`.
    """
    seen: set[bytes] = set()
    rows: list[tuple] = []
    for i, w in enumerate(weights):
        res = anneal(predict, n_bits, weight=w, seed=seed + i, **anneal_kwargs)
        if callback is not None:  # after each weight: progress bars, crash tests
            callback()
        for sm in (res.best, res.final) if include_final else (res.best,):
            for j in range(len(sm)):
                key = np.packbits(sm.configs[j]).tobytes()
                if key not in seen:
                    seen.add(key)
                    rows.append((sm.configs[j], sm.fairness[j], sm.fairness_std[j], sm.utility[j],
                                 sm.utility_std[j], bool(sm.feasible[j]), float(w)))
    if not rows:
        e = np.zeros(0)
        return Candidates(np.zeros((0, n_bits), bool), e, e, e, e, np.zeros(0, bool), e)
    cols = list(zip(*rows))
    return Candidates(
        configs=np.stack(cols[0]),
        fairness=np.array(cols[1], float),
        fairness_std=np.array(cols[2], float),
        utility=np.array(cols[3], float),
        utility_std=np.array(cols[4], float),
        feasible=np.array(cols[5], bool),
        weight=np.array(cols[6], float),
    )


def _start(start, n_chains: int, n_bits: int) -> np.ndarray:
    if start is None:
        return np.ones((n_chains, n_bits), dtype=bool)
    s = np.asarray(start)
    if s.ndim == 1:
        s = np.broadcast_to(s, (n_chains, n_bits))
    if s.shape != (n_chains, n_bits):
        raise ValueError(f"start must have shape ({n_bits},) or ({n_chains}, {n_bits}), got {s.shape}")
    return s.astype(bool).copy()


def _distinct_positions(rng: np.random.Generator, n: int, n_bits: int, k: int) -> np.ndarray:
    """(n, k) bit positions, distinct within each row, uniform: the j-th draw indexes the bits not yet
    drawn (shifting past each earlier draw, in ascending order)."""
    out = np.empty((n, k), dtype=np.int64)
    for j in range(k):
        r = rng.integers(0, n_bits - j, n)
        if j:
            for s in np.sort(out[:, :j], axis=1).T:
                r += r >= s
        out[:, j] = r
    return out


def _hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between bool rows of a (n, d) and b (m, d), as int16 (n, m)."""
    a32 = a.astype(np.float32)
    b32 = b.astype(np.float32)
    d = a32.sum(1)[:, None] + b32.sum(1)[None, :] - 2.0 * (a32 @ b32.T)
    return np.rint(d).astype(np.int16)
