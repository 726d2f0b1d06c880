"""FairMed's probers: from a layer's MLP output at a position of a prompt, the model's distribution
over an attribute's social groups after the prompt.

Data: every association prompt of the search split (and the neutral ones), with the MLP output of
every layer at several positions (`POSITIONS`: the concept's last token, the prompt's last token and
the token midway between them) and the model's own group distribution after the prompt (`collect`).
A neutralizer acts at every position of a text, so its probers are fitted on more than the one
position the yardstick reads; each (prompt, position) is a row, labelled with its prompt's
distribution, and cross-validation groups by concept so no prompt straddles a fold.

Prober, per layer: the activations standardised and projected on the first `dims` principal
components of all attributes' prompts pooled (one projection per layer: pooling gives the projection
every prompt, not an attribute's ~100), then one softmax regression per attribute on soft labels (the
model's distribution), its L2 strength chosen per layer and attribute by cross-validation grouped by
concept (a concept's frames never sit on both sides of a fold). Every piece is affine, so a layer's
probers collapse to logits = A x + c over the attributes' groups laid end to end: the neutralizer
needs nothing else, and its gradient is exact and cheap.

Scores, on the held-out folds: macro-F1 of the arg-max group against always predicting the majority
group, and KL(model || prober) against KL(model || training mean). The pilot's probers (an MLP on
36 prompts per attribute) memorised; see benchmarks/probers.py for what each lever does.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from repair import arch
from repair.errors import UserError

L2_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # per-sample penalty on the weights, chosen by grouped CV
DIMS = 64
FOLDS = 5
POSITIONS = ("concept", "middle", "last")  # where in a prompt activations are read (positions_of)
PAD_LOGIT = -1e9  # the logit of a padded slot in Probers.kl_to_target's grid: its probability is exactly 0
GATE_QUANTILES = (0.0, 0.5, 0.75, 0.9)  # the gate levels a search may choose, as quantiles of the prober's KL
PURPOSE = "FairMed (MLP outputs)"


@dataclass(frozen=True, eq=False)
class ProbeData:
    """Search-split association prompts with their activations and the model's group distributions:
    one row per (prompt, read position), every field but `groups` per row."""

    activations: np.ndarray  # (n, layers, d) float32: the modules' output at the row's position
    attributes: tuple[str, ...]
    concepts: tuple[str, ...]  # the prompt's template id (a concept): the CV groups
    neutral: np.ndarray  # (n,) bool
    distributions: tuple[np.ndarray, ...]  # the model's distribution after the prompt, over the attribute's groups
    groups: dict  # attribute -> tuple of group keys, in the order the segments are laid out
    stereotyped: tuple[tuple[str, ...], ...] = ()  # the groups the row's concept is stereotyped towards


def probe_data(loaded, config, progress: bool = True, modules=None) -> ProbeData:
    """The association prompts of `config`'s split (every one: no limit) and the neutral prompts, with
    their activations (at `modules`' outputs, default every MLP) at `positions_of` each prompt and the
    model's group distributions, measured on `loaded` as it is."""
    return probe_data_at(loaded, config, {"": mlp_modules(loaded.model) if modules is None else modules}, progress)[""]


def probe_data_at(loaded, config, sites: dict, progress: bool = True) -> dict[str, ProbeData]:
    """`probe_data` at several sites (name -> modules, e.g. every MLP and every residual stream) from
    one pass: the prompts' group distributions are scored once and every site's activations are read
    in the same forwards (a read changes nothing, so each equals its own pass)."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    from repair.evaluator import Evaluator, _Tokens
    from repair.suites.association import AssociationSuite

    suite = AssociationSuite(replace(config, limit=None, association_neutral=True))
    prompts = suite.prompts
    evaluator = Evaluator(loaded.model, loaded.tokenizer, progress=progress)
    dists = suite.distributions(evaluator.score_choices(suite.requests(), desc="probe targets"))
    tokens = _Tokens(loaded.tokenizer)
    at = [positions_of(tokens, p) for p in prompts]
    modules = [m for found in sites.values() for m in found]
    with tqdm(total=len(prompts), desc="probe activations", unit="prompt", disable=not progress) as bar:
        acts = collect(loaded.model, loaded.tokenizer, [p.prompt for p in prompts], progress=bar, modules=modules,
                       positions=at)
    groups = {}
    for p in prompts:
        groups.setdefault(p.attribute, p.groups)
    rows = [i for i, pos in enumerate(at) for _ in pos]  # collect's row order: each prompt's positions in turn
    out, start = {}, 0
    for name, found in sites.items():
        out[name] = ProbeData(np.ascontiguousarray(acts[:, start:start + len(found)]),
                              tuple(prompts[i].attribute for i in rows), tuple(prompts[i].template_id for i in rows),
                              np.array([prompts[i].neutral for i in rows]), tuple(dists[i] for i in rows), groups,
                              tuple(prompts[i].stereotyped for i in rows))
        start += len(found)
    return out


def positions_of(tokens, prompt) -> list[int]:
    """The token positions of `prompt` (an association Prompt) that probers and probes read, ascending
    and distinct: the concept's last token, the prompt's last token and the one midway (POSITIONS).
    From the concept on, a position's context names the concept; before it, nothing to read."""
    ids = tokens(prompt.prompt, True)
    last = len(ids) - 1
    concept = min(max(len(tokens(prompt.through_concept, True)) - 1, 0), last)
    return sorted({concept, (concept + last) // 2, last})


def mlp_modules(model) -> list[torch.nn.Module]:
    """Each block's MLP, in layer order; UserError naming the class when there is none."""
    return [arch.mlp_output(layer, model, PURPOSE) for layer in arch.decoder_layers(model, PURPOSE)]


@torch.inference_mode()
def collect(model, tokenizer, prompts, batch: int = 64, progress=None, modules=None, positions=None) -> np.ndarray:
    """The outputs of `modules` (default: every layer's MLP) at the last token of each prompt text,
    (n, layers, d) float32; with `positions` (a list of token indices per prompt), at those positions
    instead, one row per (prompt, position) in that order."""
    from repair.evaluator import _input_device, _Tokens

    tokens = _Tokens(tokenizer)
    ids = [tokens(p, True) for p in prompts]
    modules = mlp_modules(model) if modules is None else modules
    positions = [[len(s) - 1] for s in ids] if positions is None else [list(p) for p in positions]
    taken: list[torch.Tensor] = [None] * len(modules)
    rows = cols = None

    def keep(i):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            taken[i] = out[rows, cols].float().cpu()
        return hook

    handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(modules)]
    device = _input_device(model)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # batches of like lengths: little padding
    out: list[np.ndarray] = [None] * len(ids)
    try:
        for start in range(0, len(ids), batch):
            members = order[start:start + batch]
            chunk, at = [ids[i] for i in members], [positions[i] for i in members]
            width = max(map(len, chunk))
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            x = torch.tensor([s + [pad] * (width - len(s)) for s in chunk], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk], device=device)
            if any(not 0 <= t < len(s) for s, pos in zip(chunk, at) for t in pos):
                raise ValueError("a read position lies outside its prompt's tokens")
            rows = torch.tensor([r for r, pos in enumerate(at) for _ in pos], device=device)
            cols = torch.tensor([t for pos in at for t in pos], device=device)
            model(input_ids=x, attention_mask=mask, use_cache=False)
            got = torch.stack(taken, 1).numpy()
            for i, part in zip(members, np.split(got, np.cumsum([len(pos) for pos in at])[:-1])):
                out[i] = part
            if progress is not None:
                progress.update(len(chunk))
    finally:
        for h in handles:
            h.remove()
    return np.concatenate(out).astype(np.float32)


def features(X: np.ndarray, dims: int | None):
    """(mu, sd, P, F) for X (n, L, d), float32 or float64, worked in float64 a layer at a time: each
    layer's mean and scale over every row, its top `dims` principal directions (every one with None),
    P (L, k, d), and the standardised rows projected on them, F (L, n, k) as a tensor.

    The directions are the eigenvectors of the d x d scatter matrix: the right singular vectors an SVD
    of the rows would give (up to sign, which the fits below mirror exactly), in about a third of its
    time on a search split's 13,000 rows."""
    n, L, d = X.shape
    k = min(d if dims is None else dims, n, d)
    mu, sd, P = np.empty((L, d)), np.empty((L, d)), np.empty((L, k, d))
    F = torch.empty(L, n, k, dtype=torch.float64)
    for layer in range(L):
        x = torch.from_numpy(np.ascontiguousarray(X[:, layer], dtype=np.float64))
        m, s = x.mean(0), x.std(0, correction=0) + 1e-6
        z = (x - m) / s
        centred = z - z.mean(0)
        directions = torch.linalg.eigh(centred.T @ centred).eigenvectors.flip(-1)[:, :k].T  # (k, d), largest first
        mu[layer], sd[layer], P[layer] = m.numpy(), s.numpy(), directions.numpy()
        F[layer] = z @ directions.T
    return mu, sd, P, F


def softmax_regression(F: torch.Tensor, Y: torch.Tensor, l2: torch.Tensor, iters: int = 100):
    """Fit, for every layer and L2 strength at once, logits = F W + b to soft labels Y by cross-entropy
    + l2 * |W|^2 (full-batch L-BFGS; the problems are independent, so one optimiser serves them all).
    F: (L, n, k), Y: (n, G), l2: (R,). Returns W (R, L, k, G), b (R, L, G).

    The loss and its gradient are written out (d CE / d logits = softmax - Y, per row's label mass)
    rather than taken by autograd: log_softmax over a handful of groups and its backward were half the
    fit's time. The weights are laid out (L, k, R, G) so every strength shares one matmul per layer."""
    R, (L, n, k), G = len(l2), F.shape, Y.shape[1]
    W = torch.zeros(L, k, R, G, dtype=torch.float64)
    b = torch.zeros(L, R, G, dtype=torch.float64)
    opt = torch.optim.LBFGS([W, b], lr=1, max_iter=iters, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")
    Fc, Ft = F.contiguous(), F.transpose(1, 2)
    labels, mass = Y[None, :, None, :], Y.sum(-1)[None, :, None]  # (1, n, 1, G), (1, n, 1)
    penalty = l2.to(torch.float64)[None, None, :, None]

    def loss():
        logits = torch.baddbmm(b.view(L, 1, R * G), Fc, W.view(L, k, R * G)).view(L, n, R, G)
        top = logits.amax(-1, keepdim=True)
        e = (logits - top).exp_()
        total_e = e.sum(-1, keepdim=True)
        lse = (top + total_e.log()).squeeze(-1)  # (L, n, R)
        ce = (lse * mass - (logits * labels).sum(-1)).mean(1)  # (L, R)
        d_logits = e.div_(total_e).mul_(mass[..., None]).sub_(labels).div_(n)
        W.grad = torch.bmm(Ft, d_logits.view(L, n, R * G)).view(L, k, R, G).add_(penalty * W, alpha=2)
        b.grad = d_logits.sum(1)
        return ce.sum() + (penalty * W * W).sum()

    # torch's own thread count: one thread was once measured faster; on torch 2.13 and this 2-core CPU two
    # threads fit a problem of 30 layers, 64 dims and 200 / 700 / 2,000 rows 3.1x / 2.1x / 2.4x faster
    opt.step(loss)
    return W.permute(2, 0, 1, 3).contiguous(), b.permute(1, 0, 2).contiguous()


def _predict(F: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.softmax(torch.einsum("lnk,rlkg->rlng", F, W) + b[:, :, None, :], -1)


def _kl_rows(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row (the last axis), 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, 1e-12))), 0.0).sum(-1)


def macro_f1(true: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(true, pred, average="macro", labels=np.unique(true), zero_division=0))


def fit(data: ProbeData, *, dims: int | None = DIMS, l2_grid=L2_GRID, folds: int = FOLDS, seed: int = 0,
        pool_projection: bool = True) -> tuple["Probers", list[dict]]:
    """Probers for every layer and attribute, and their cross-validated scores (one dict per layer and
    attribute). Neutral prompts are training rows too (what a prober predicts for them is the target
    "neutral"), but only concept prompts are scored. `dims=None` keeps every principal component;
    `pool_projection=False` standardises and projects each attribute's prompts on their own (a
    benchmark lever: benchmarks/probers.py)."""
    from sklearn.model_selection import GroupKFold

    X = data.activations
    n, L, d = X.shape
    pooled = features(X, dims) if pool_projection else None
    l2 = torch.tensor(l2_grid, dtype=torch.float64)
    A_parts, c_parts, scores = [], [], []
    for attr, groups in data.groups.items():
        idx = np.array([i for i, a in enumerate(data.attributes) if a == attr])
        mu, sd, P, F = pooled if pooled is not None else features(X[idx], dims)
        if pooled is not None:
            F = F[:, idx]  # (L, n_attr, k)
        concepts = np.array([data.concepts[i] for i in idx])
        Y = np.stack([data.distributions[i] for i in idx])
        scored = ~data.neutral[idx]
        n_folds = min(folds, len(set(concepts[scored])))
        if n_folds < 2:
            raise UserError(f"association attribute {attr!r} has too few search-split concepts to cross-validate "
                            f"a prober (found {len(set(concepts[scored]))}, need 2)")
        held = np.zeros((len(l2), L, len(idx), len(groups)))
        base = np.zeros((len(idx), len(groups)))
        for train, test in GroupKFold(n_splits=n_folds).split(idx, groups=concepts):
            Ftr, Fte = F[:, train], F[:, test]
            W, b = softmax_regression(Ftr, torch.from_numpy(Y[train]), l2)
            held[:, :, test] = _predict(Fte, W, b).numpy()
            base[test] = Y[train].mean(0)
        s = scored
        kl_cv = _kl_rows(Y[s], held[:, :, s]).mean(-1)  # (R, L)
        best = kl_cv.argmin(0)  # per layer
        W, b = softmax_regression(F, torch.from_numpy(Y), l2)
        true = Y[s].argmax(1)
        majority = np.full_like(true, np.bincount(true, minlength=len(groups)).argmax())
        kl_base = float(_kl_rows(Y[s], base[s]).mean())
        for layer in range(L):
            r = best[layer]
            pred = held[r, layer, s].argmax(1)
            scores.append({"layer": layer, "attribute": attr, "macro_f1": macro_f1(true, pred),
                           "majority_f1": macro_f1(true, majority), "kl": float(kl_cv[r, layer]),
                           "kl_mean": kl_base, "l2": float(l2[r]), "n_prompts": int(s.sum()),
                           "n_concepts": int(len(set(concepts[s])))})
        Wb = W[best, torch.arange(L)]  # (L, k, G)
        bb = b[best, torch.arange(L)]  # (L, G)
        # collapse standardise -> project -> linear into logits = A x + c
        Wx = np.einsum("lkd,lkg->lgd", P, Wb.numpy()) / sd[:, None, :]  # (L, G, d)
        A_parts.append(Wx)
        c_parts.append(bb.numpy() - np.einsum("lgd,ld->lg", Wx, mu))
    targets_neutral, targets_uniform = [], []
    for attr, groups in data.groups.items():
        neutral = [data.distributions[i] for i, a in enumerate(data.attributes) if a == attr and data.neutral[i]]
        targets_neutral.append(np.mean(neutral, 0) if neutral else np.full(len(groups), 1.0 / len(groups)))
        targets_uniform.append(np.full(len(groups), 1.0 / len(groups)))
    probers = Probers(
        A=torch.from_numpy(np.concatenate(A_parts, 1)).float(), c=torch.from_numpy(np.concatenate(c_parts, 1)).float(),
        sizes=tuple(len(g) for g in data.groups.values()), attributes=tuple(data.groups),
        targets={"neutral": torch.from_numpy(np.concatenate(targets_neutral)).float(),
                 "uniform": torch.from_numpy(np.concatenate(targets_uniform)).float()},
        gate_kl=torch.zeros(2, L, len(GATE_QUANTILES)),
    )
    return probers.calibrated(torch.from_numpy(data.activations)), scores


@dataclass(frozen=True, eq=False)
class Probers:
    """Every layer's probers as one affine map: logits (L, G) = A[l] x + c[l], the attributes' groups laid
    end to end (`sizes`); the two targets in the same layout; and `gate_kl[t, l, j]`, the
    GATE_QUANTILES[j] quantile of the summed KL to target t over the search prompts' read positions at
    layer l (a gate level is a quantile, so it means the same at every layer)."""

    A: torch.Tensor  # (L, G, d) float32
    c: torch.Tensor  # (L, G)
    sizes: tuple[int, ...]
    attributes: tuple[str, ...]
    targets: dict  # "neutral" / "uniform" -> (G,)
    gate_kl: torch.Tensor  # (2, L, len(GATE_QUANTILES)), targets in TARGETS order

    @property
    def n_layers(self) -> int:
        return self.A.shape[0]

    @property
    def width(self) -> int:
        return self.A.shape[2]

    def kl_to_target(self, x: torch.Tensor, layer: int, log_target: torch.Tensor):
        """(KL summed over attributes, its gradient in x) for activations x (..., d) at `layer`; the
        target's log-probabilities broadcast against x's leading dims (..., G).

        The attributes' segments are laid out as one padded grid (attributes x the largest group
        count, `_grid`), so the per-attribute softmaxes and sums are a few whole-tensor operations:
        the neutralizer runs this at every treated layer of every generated token."""
        grid, flat, n_attr, width = self._grid(x.device)
        A, c = self.A[layer].to(x.device), self.c[layer].to(x.device)

        def gridded(v, pad):  # (..., G) -> (..., attributes, width), `pad` in the unused slots
            return torch.cat([v, v.new_full((*v.shape[:-1], 1), pad)], -1)[..., grid].unflatten(-1, (n_attr, width))

        logp = torch.log_softmax(gridded(x @ A.T + c, PAD_LOGIT), -1)  # a padded slot: probability 0
        p = logp.exp()
        gap = logp - gridded(log_target, 0.0)
        kls = (p * gap).sum(-1)  # (..., attributes)
        grad_z = (p * (gap - kls[..., None])).flatten(-2)[..., flat]  # d KL_a / d z within each attribute's segment
        return kls.sum(-1), grad_z @ A

    def _grid(self, device) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(for each slot of the padded grid the flat index it reads, G for padding; for each flat index
        its slot; attributes; the grid's width), on `device`, computed once per device."""
        cache = self.__dict__.setdefault("_grids", {})
        if device not in cache:
            width, total = max(self.sizes), sum(self.sizes)
            grid = torch.full((len(self.sizes), width), total, dtype=torch.long)
            starts = np.cumsum([0, *self.sizes[:-1]])
            for a, (start, n) in enumerate(zip(starts, self.sizes)):
                grid[a, :n] = torch.arange(start, start + n)
            flat = (grid.flatten() < total).nonzero()[:, 0]
            cache[device] = (grid.flatten().to(device), flat.to(device), len(self.sizes), width)
        return cache[device]

    def calibrated(self, activations: torch.Tensor) -> "Probers":
        """These probers with `gate_kl` measured on `activations` (n, L, d)."""
        gate = torch.zeros(len(TARGETS), self.n_layers, len(GATE_QUANTILES))
        q = torch.tensor(GATE_QUANTILES)
        for t, name in enumerate(TARGETS):
            log_t = self.targets[name].log()
            for layer in range(self.n_layers):
                kl, _ = self.kl_to_target(activations[:, layer].float(), layer, log_t)
                gate[t, layer] = torch.quantile(kl, q)
        gate[:, :, q == 0] = -torch.inf  # level 0: no gate, every position is treated
        return Probers(self.A, self.c, self.sizes, self.attributes, self.targets, gate)

    # ---- persistence -------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {"probers.A": self.A.contiguous(), "probers.c": self.c.contiguous(),
                "probers.target_neutral": self.targets["neutral"], "probers.target_uniform": self.targets["uniform"],
                "probers.gate_kl": self.gate_kl.contiguous()}

    def metadata(self) -> dict:
        return {"sizes": list(self.sizes), "attributes": list(self.attributes), "gate_quantiles": list(GATE_QUANTILES)}

    @classmethod
    def from_tensors(cls, tensors: dict, meta: dict) -> "Probers":
        return cls(tensors["probers.A"].float(), tensors["probers.c"].float(), tuple(meta["sizes"]),
                   tuple(meta["attributes"]), {"neutral": tensors["probers.target_neutral"].float(),
                                               "uniform": tensors["probers.target_uniform"].float()},
                   tensors["probers.gate_kl"].float())

    def save(self, path: Path) -> str:
        """Write to a safetensors file; returns its sha256."""
        import json

        from safetensors.torch import save_file

        save_file(self.tensors(), str(path), metadata={"probers": json.dumps(self.metadata())})
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()

    @classmethod
    def load(cls, path: Path) -> "Probers":
        import json

        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = json.loads(f.metadata()["probers"])
        return cls.from_tensors(load_file(str(path)), meta)


TARGETS = ("neutral", "uniform")
