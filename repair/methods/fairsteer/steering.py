"""FairSteer's probes and steering vectors, read off the residual stream (each decoder layer's output)
of the search split's association prompts at several positions each (probers.POSITIONS: from the
concept's last token to the prompt's), since the gate decides at every position of a text it steers.

Labels, on search-split prompts only:
- `association` (the default): a concept prompt is *biased* when the model puts more mass on the
  concept's stereotyped groups than it does after the attribute's neutral prompts, by more than
  `margin`; *unbiased* otherwise. Neutral prompts are not labelled.
- `bbq` (the published labelling; needs BBQ data): a BBQ item (cloze prompt, every category, up to
  BBQ_PER_CATEGORY per category) is *biased* when the model picks the stereotyped answer and it is
  wrong, *unbiased* when it picks the correct answer; other picks are not labelled. Concepts are BBQ
  templates.

Per layer:
- a logistic probe, P(biased | activation): standardised, projected on the top principal
  components of all labelled prompts, L2 strength chosen by cross-validation grouped by concept (a
  concept's frames never sit on both sides of a fold), scored on the held-out folds (accuracy
  against always predicting the majority label). Like FairMed's probers it collapses to one affine
  map on the raw activation, `logit = w . x + b`, so the steering hook needs nothing else;
- the steering vector mean(unbiased) - mean(biased) (the published rule), and the layer's mean
  activation norm: a strength `alpha` adds `alpha * mean_norm * v / |v|`, so one alpha means the
  same relative push at every layer (the published code adds the raw difference; its norm relative
  to the activations is recorded as `vector_norm_ratio`).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from repair.errors import UserError
from repair.methods.fairmed.probers import (DIMS, FOLDS, L2_GRID, ProbeData, collect, features, macro_f1, probe_data,
                                            softmax_regression)

# the gate's level, a quantile of the probe's P(biased) on the search prompts at the steered layer (so it
# fires on about 75%, 50%, 25% or 10% of them whatever the probe's calibration); None: always on. Fixed
# probabilities (0.7, 0.9) never fired on a probe whose scores stayed below them.
STEER_GATES = (None, 0.25, 0.5, 0.75, 0.9)
MARGIN = 0.05  # excess mass on the stereotyped groups over the neutral distribution that labels "biased"
BBQ_PER_CATEGORY = 100  # BBQ items per category labelled (search split): ~1,100 prompts, like the association suite's
LABELS = ("association", "bbq")
VECTOR_EXTREMES = None  # None: the vector between the labels (published); a fraction: between the excess extremes
PURPOSE = "FairSteer (residual stream)"


def residual_modules(model) -> list[torch.nn.Module]:
    """Each decoder layer, in order: its output is the residual stream FairSteer reads and steers."""
    from repair import arch

    return arch.decoder_layers(model, PURPOSE)


def labels(data: ProbeData, margin: float = MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """(label, excess) per prompt: label 1 biased, 0 unbiased, -1 unlabelled (neutral prompts, concepts
    without stereotyped groups); excess = p(stereotyped groups) - p_neutral(stereotyped groups)."""
    neutral = {}
    for attr in data.groups:
        rows = [data.distributions[i] for i, a in enumerate(data.attributes) if a == attr and data.neutral[i]]
        n = len(data.groups[attr])
        neutral[attr] = np.mean(rows, 0) if rows else np.full(n, 1.0 / n)
    excess = np.full(len(data.attributes), np.nan)
    for i, attr in enumerate(data.attributes):
        st = data.stereotyped[i] if data.stereotyped else ()
        if data.neutral[i] or not st:
            continue
        idx = [data.groups[attr].index(g) for g in st if g in data.groups[attr]]
        excess[i] = data.distributions[i][idx].sum() - neutral[attr][idx].sum()
    label = np.where(np.isnan(excess), -1, (excess > margin).astype(int))
    return label, excess


@dataclass(frozen=True, eq=False)
class Steering:
    """Every layer's probe (`w` (L, d), `b` (L,)) and unit steering direction (`direction` (L, d)),
    with the layer's mean activation norm (`scale` (L,)): steering at layer l with strength alpha
    adds alpha * scale[l] * direction[l] where sigmoid(w[l] . x + b[l]) exceeds the threshold."""

    w: torch.Tensor
    b: torch.Tensor
    direction: torch.Tensor
    scale: torch.Tensor
    gates: torch.Tensor | None = None  # (L, levels): the probe's P(biased) quantiles on the fitting prompts (space.STEER_GATES)

    def gate_table(self) -> tuple[tuple[float, ...], ...]:
        """Per layer, the P(biased) at each gate level: what a quantile-level key resolves to."""
        if self.gates is None:
            raise UserError("these FairSteer vectors predate quantile gates (refit them: delete the run's fairsteer/ folder)")
        return tuple(tuple(float(x) for x in row) for row in self.gates.tolist())

    @property
    def n_layers(self) -> int:
        return self.w.shape[0]

    @property
    def width(self) -> int:
        return self.w.shape[1]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"steering.w": self.w.contiguous(), "steering.b": self.b.contiguous(),
               "steering.direction": self.direction.contiguous(), "steering.scale": self.scale.contiguous()}
        if self.gates is not None:
            out["steering.gates"] = self.gates.contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict) -> "Steering":
        gates = tensors.get("steering.gates")
        return cls(*(tensors[f"steering.{k}"].float() for k in ("w", "b", "direction", "scale")),
                   None if gates is None else gates.float())

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        return save(self.tensors())

    @classmethod
    def from_bytes(cls, data: bytes) -> "Steering":
        from safetensors.torch import load

        return cls.from_tensors(load(data))


def fit(activations: np.ndarray, label: np.ndarray, concepts, *, dims: int | None = DIMS, l2_grid=L2_GRID,
        folds: int = FOLDS, excess: np.ndarray | None = None, extremes: float | None = None) -> tuple[Steering, list[dict]]:
    """The probes and vectors of every layer from activations (n, L, d), labels (1 biased, 0 unbiased,
    -1 unused) and each prompt's concept (the CV groups); per layer its held-out probe scores. With
    `excess` and `extremes` (a fraction), the vector is taken between the labelled prompts of the
    lowest and the highest `extremes` fraction of excess instead of between the two labels."""
    from sklearn.model_selection import GroupKFold

    use = label >= 0
    X = activations[use]  # (n, L, d)
    y = label[use]
    if len(set(y)) < 2:
        raise UserError(f"every labelled prompt is {'biased' if len(y) and y[0] else 'unbiased'}: FairSteer needs "
                        "both kinds to train its probes (the model shows no stereotype spread on these prompts)")
    concepts = np.array([c for c, u in zip(concepts, use) if u])
    n, L, d = X.shape
    mu, sd, P, F = features(X, dims)
    Y = torch.from_numpy(np.eye(2)[y])
    l2 = torch.tensor(l2_grid, dtype=torch.float64)
    held = np.zeros((len(l2), L, n))
    n_folds = min(folds, len(set(concepts)))
    for train, test in GroupKFold(n_splits=n_folds).split(np.arange(n), groups=concepts):
        W, b = softmax_regression(F[:, train], Y[train], l2)
        held[:, :, test] = _biased_prob(F[:, test], W, b).numpy()
    loss = -(y * np.log(np.clip(held, 1e-9, 1)) + (1 - y) * np.log(np.clip(1 - held, 1e-9, 1))).mean(-1)  # (R, L)
    best = loss.argmin(0)
    W, b = softmax_regression(F, Y, l2)
    Wd = (W[best, torch.arange(L), :, 1] - W[best, torch.arange(L), :, 0]).numpy()  # (L, k)
    bd = (b[best, torch.arange(L), 1] - b[best, torch.arange(L), 0]).numpy()
    w = np.einsum("lk,lkd->ld", Wd, P) / sd  # collapse standardise -> project -> linear
    b_raw = bd - (w * mu).sum(-1)
    if excess is not None and extremes:
        e = excess[use]
        low, high = e <= np.quantile(e, extremes), e >= np.quantile(e, 1 - extremes)
        diff = X[low].mean(0) - X[high].mean(0)  # (L, d): the least skewed prompts minus the most skewed
    else:
        diff = X[y == 0].mean(0) - X[y == 1].mean(0)  # (L, d): mean(unbiased) - mean(biased)
    norms = np.linalg.norm(X, axis=-1).mean(0)  # (L,)
    majority = max(y.mean(), 1 - y.mean())
    majority_f1 = macro_f1(y, np.full_like(y, int(y.mean() > 0.5)))
    scores = []
    for layer in range(L):
        r = best[layer]
        pred = (held[r, layer] > 0.5).astype(int)
        scores.append({"layer": layer, "accuracy": float((pred == y).mean()), "majority": float(majority),
                       "macro_f1": macro_f1(y, pred), "majority_f1": majority_f1,
                       "l2": float(l2[r]), "vector_norm_ratio": float(np.linalg.norm(diff[layer]) / norms[layer]),
                       "n_prompts": int(n), "n_biased": int(y.sum()), "n_concepts": int(len(set(concepts)))})
    direction = diff / np.maximum(np.linalg.norm(diff, axis=-1, keepdims=True), 1e-12)
    # the gate's levels: quantiles of the final probe's P(biased) over the fitting prompts, per layer
    p = 1 / (1 + np.exp(-(np.einsum("nld,ld->ln", X, w) + b_raw[:, None])))
    gates = np.quantile(p, [q for q in STEER_GATES if q is not None], axis=1).T  # (L, levels)
    steering = Steering(torch.from_numpy(w).float(), torch.from_numpy(b_raw).float(),
                        torch.from_numpy(direction).float(), torch.from_numpy(norms).float(), torch.from_numpy(gates).float())
    return steering, scores


def _biased_prob(F: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    logits = torch.einsum("lnk,rlkg->rlng", F, W) + b[:, :, None, :]
    return torch.softmax(logits, -1)[..., 1]


def association_examples(loaded, eval_config, margin: float = MARGIN, progress: bool = True, data=None):
    """(activations, labels, concepts, excess) from the association suite's search-split prompts, one row
    per (prompt, read position), each labelled as its prompt (`data`: their residual-stream ProbeData,
    measured here when not given)."""
    if data is None:
        data = probe_data(loaded, eval_config, progress=progress, modules=residual_modules(loaded.model))
    label, excess = labels(data, margin)
    return data.activations, label, data.concepts, excess


def bbq_examples(loaded, eval_config, progress: bool = True):
    """(activations, labels, concepts) from BBQ's search-split items, the published labelling."""
    from dataclasses import replace

    from tqdm.auto import tqdm

    from repair.evaluator import Evaluator
    from repair.suites.bbq import cloze_request, load_items

    items, _ = load_items(replace(eval_config, limit=BBQ_PER_CATEGORY, categories=None))
    requests = [cloze_request(it) for it in items]
    scores = Evaluator(loaded.model, loaded.tokenizer, progress=progress).score_choices(requests, desc="bbq labels")
    label = np.array([bbq_label(it, s.mean_logprob) for it, s in zip(items, scores)])
    with tqdm(total=len(items), desc="steering activations", unit="prompt", disable=not progress) as bar:
        acts = collect(loaded.model, loaded.tokenizer, [r.prompt for r in requests], progress=bar,
                       modules=residual_modules(loaded.model))
    return acts, label, tuple(it.template for it in items)


def bbq_label(item, scores: np.ndarray) -> int:
    """1: the model picks the stereotyped answer and it is wrong; 0: it picks the correct answer;
    -1: anything else (another wrong answer, or an item whose stereotyped answer is unknown)."""
    pick = int(np.argmax(scores))
    if pick == item.label:
        return 0
    return 1 if item.biased_index is not None and pick == item.biased_index else -1


def prepare(loaded, eval_config, folder: Path, labelling: str = "association", margin: float = MARGIN,
            progress: bool = True, source=None) -> tuple[Steering, list[dict]]:
    """The steering for `loaded`, fitted once and kept in `folder` (steering.safetensors, and
    steering.json with its sha256 and the probe scores): a resumed run reads it back, checked.
    `source`: where the association labelling's probe data comes from (a run's probe pass,
    repair.methods.probe_pass.PassSite, whose sha256 the record names: a fit on a pass since replaced
    is refitted); default: measured here."""
    from repair.io import write_bytes_atomic, write_json_atomic

    folder = Path(folder)
    path, record_path = folder / "steering.safetensors", folder / "steering.json"
    kept = source.recorded() if source is not None and labelling == "association" else None
    if path.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != record.get("sha256"):
            raise UserError(f"{path} does not match the sha256 in {record_path} (delete both to refit)")
        if kept is None or record.get("activations_sha256") == kept:
            return Steering.from_bytes(data), record["scores"]
    if labelling == "bbq":
        acts, label, concepts = bbq_examples(loaded, eval_config, progress)
        excess = None
    else:
        acts, label, concepts, excess = association_examples(loaded, eval_config, margin, progress,
                                                             source.data() if source is not None else None)
    steering, scores = fit(acts, label, concepts, excess=excess, extremes=VECTOR_EXTREMES)
    folder.mkdir(parents=True, exist_ok=True)
    raw = steering.to_bytes()
    write_bytes_atomic(path, raw)
    used = source.sha256() if source is not None and labelling == "association" else None
    write_json_atomic(record_path, {"sha256": hashlib.sha256(raw).hexdigest(), "labels": labelling,
                                    "margin": margin if labelling == "association" else None,
                                    "activations_sha256": used, "scores": scores})
    return steering, scores


def format_scores(scores: list[dict], best: int = 5) -> str:
    """Per-layer probe accuracy against the majority label, the best layers last."""
    lines = [f"{'layer':>5}  {'accuracy':>8}  {'majority':>8}  {'|v|/|x|':>7}"]
    lines += [f"{s['layer']:>5}  {s['accuracy']:>8.3f}  {s['majority']:>8.3f}  {s['vector_norm_ratio']:>7.3f}" for s in scores]
    top = sorted(scores, key=lambda s: -s["accuracy"])[:best]
    lines.append("best layers: " + ", ".join(f"{s['layer']} ({s['accuracy']:.3f})" for s in top))
    return "\n".join(lines)
