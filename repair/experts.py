"""The decoding-time experts' text, training and storage.

Text, written from the association data of the search split only (no select- or report-split
concept is ever seen):
- anti-expert: each concept prompt completed with a form of one of the concept's stereotyped groups
  ("The nurse was a woman.");
- expert: the same prompts completed with rotating groups, drawn in the proportions the target
  itself gives the groups after the attribute's neutral prompts (q, the reference of `kl_neutral`):
  the expert learns that a concept does not move the group away from its plain frequency.
  Counter-stereotypical completions would teach the opposite stereotype, and uniform ones would
  also push the plain frequencies towards uniform (what `kl_uniform` rewards); both measured worse
  (README, "Decoding-time experts");
- both: each neutral prompt completed with a group drawn from q, the same text for both, so that on
  text without a concept the two experts agree and their difference stays near zero.
The loss is on the completion only (the group form and the full stop that ends the word).

Training: each expert starts as a copy of the expert base (default: the target itself) and only its
top `TRAIN_LAYERS` decoder layers learn (AdamW, one pass over the text, seeded): the backward pass
stops there, which makes a step 2.5 times cheaper than full fine-tuning on this CPU
(benchmarks/experts.py --training), and the rest of the model keeps what it knew. The experts are
saved as safetensors checkpoints under RUN_DIR/experts/ with their sha256, so a resumed run loads
them instead of training again.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from repair.errors import UserError
from repair.suites.base import ChoiceRequest

ROLES = ("expert", "anti_expert")


@dataclass(frozen=True)
class TrainConfig:
    """How the experts are trained; part of a run's identity through `repair.rundir.RunConfig`."""

    layers: int = 6  # top decoder layers that learn
    sentences_per_prompt: int = 1  # completions per concept prompt, for each expert
    epochs: int = 1
    lr: float = 1e-4
    batch: int = 32
    seed: int = 0


def neutral_distributions(loaded, suite) -> dict[str, np.ndarray]:
    """q per attribute: the target's mean group distribution over the attribute's neutral prompts."""
    from repair.evaluator import Evaluator
    from repair.suites.association import group_distribution

    neutral = [p for p in suite.prompts if p.neutral]
    scores = Evaluator(loaded.model, loaded.tokenizer, progress=False).score_choices(
        [ChoiceRequest(p.prompt, p.options, word_end=True) for p in neutral])
    by_attr: dict[str, list] = {}
    for p, s in zip(neutral, scores):
        by_attr.setdefault(p.attribute, []).append(group_distribution(s, [len(f) for f in p.forms]))
    return {a: np.mean(d, 0) for a, d in by_attr.items()}


def training_text(suite, q: dict[str, np.ndarray], sentences_per_prompt: int = 1, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """{role: [(prompt, completion)]} from the association suite's search-split prompts `suite` and the
    neutral distributions `q` (see the module docstring)."""
    rng = np.random.default_rng(seed)
    text = {role: [] for role in ROLES}

    def drawn(p) -> str:
        forms = p.forms[rng.choice(len(p.forms), p=q[p.attribute])]
        return f" {forms[rng.integers(len(forms))]}."

    for p in suite.prompts:
        if p.split not in ("search", "all"):
            raise ValueError(f"training text from a {p.split}-split prompt: {p.prompt!r}")
        if p.neutral:
            shared = (p.prompt, drawn(p))
            for role in ROLES:
                text[role].append(shared)
            continue
        stereotyped = [f for g, forms in zip(p.groups, p.forms) if g in p.stereotyped for f in forms]
        if not stereotyped:
            continue
        for _ in range(sentences_per_prompt):
            text["anti_expert"].append((p.prompt, f" {stereotyped[rng.integers(len(stereotyped))]}."))
            text["expert"].append((p.prompt, drawn(p)))
    return text


def search_prompts(eval_config):
    """The association suite on the search split, every prompt (the experts' text comes from nothing else)."""
    from dataclasses import replace

    from repair.suites.association import AssociationSuite

    return AssociationSuite(replace(eval_config, split="search", limit=None, association_neutral=True))


def _batch(tokenizer, pairs: list[tuple[str, str]], device):
    """Right-padded ids, attention mask, and the positions whose next token is a completion token."""
    seqs, starts = [], []
    for prompt, completion in pairs:
        head = list(tokenizer(prompt, add_special_tokens=True).input_ids)
        tail = list(tokenizer(prompt + completion, add_special_tokens=True).input_ids)[len(head):]
        seqs.append(head + tail)
        starts.append(len(head))
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        keep[i, start - 1:len(s) - 1] = True  # position t predicts token t + 1
    targets = torch.cat([ids[i, keep[i].nonzero()[:, 0] + 1] for i in range(len(seqs))])
    return ids.to(device), mask.to(device), keep.to(device), targets.to(device)


def fine_tune(model, tokenizer, pairs: list[tuple[str, str]], config: TrainConfig, desc: str) -> list[float]:
    """Train `model`'s top `config.layers` decoder layers in place on `pairs` (float32 while it learns,
    back to its dtype after); returns the loss of every step."""
    from repair import arch

    layers = arch.decoder_layers(model, "decoding-time experts")
    dtype = next(model.parameters()).dtype
    model.float().requires_grad_(False)
    trained = [p for layer in layers[-config.layers:] for p in layer.parameters()]
    for p in trained:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=config.lr, weight_decay=0.0)
    order = list(range(len(pairs)))
    rng = random.Random(config.seed)
    device = next(model.parameters()).device
    steps = config.epochs * math.ceil(len(pairs) / config.batch)
    losses = []
    with torch.enable_grad(), tqdm(total=steps, desc=desc, unit="step", dynamic_ncols=True) as bar:
        for _ in range(config.epochs):
            rng.shuffle(order)
            for k in range(0, len(order), config.batch):
                ids, mask, keep, targets = _batch(tokenizer, [pairs[i] for i in order[k:k + config.batch]], device)
                logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update(1)
    model.requires_grad_(False).to(dtype).eval()
    return losses


def train(base, tokenizer, text: dict, config: TrainConfig) -> tuple[dict, dict]:
    """({role: a copy of `base` trained on text[role]}, what was done: sentences, losses)."""
    models, info = {}, {"config": asdict(config), "sentences": {r: len(t) for r, t in text.items()}, "loss": {}}
    for k, role in enumerate(ROLES):
        torch.manual_seed(config.seed + k)
        model = copy.deepcopy(base)
        losses = fine_tune(model, tokenizer, text[role], config, f"training the {role.replace('_', '-')}")
        info["loss"][role] = {"first": losses[0], "last": sum(losses[-5:]) / len(losses[-5:]), "steps": len(losses)}
        models[role] = model
    return models, info


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def save(models: dict, folder: Path, info: dict) -> dict:
    """Write each expert as a checkpoint folder (config + safetensors) and experts.json with their sha256."""
    from repair.io import write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    record = dict(info, sha256={})
    for role, model in models.items():
        model.save_pretrained(folder / role, safe_serialization=True)
        record["sha256"][role] = _digest(folder / role)
    write_json_atomic(folder / "experts.json", record)
    return record


def load_models(folder: Path, device, dtype) -> dict:
    """{role: the checkpoint in folder/role}, on `device` in `dtype`, for inference (a run's experts,
    a bundle's)."""
    from transformers import AutoModelForCausalLM

    return {role: AutoModelForCausalLM.from_pretrained(Path(folder) / role, dtype=dtype).to(device).eval().requires_grad_(False)
            for role in ROLES}


def load_saved(folder: Path, device, dtype, sha256: dict | None = None) -> dict | None:
    """The experts saved in `folder` (None when there are none), checked against their sha256."""
    record_path = folder / "experts.json"
    if not record_path.is_file():
        return None
    want = sha256 or json.loads(record_path.read_text())["sha256"]
    for role in ROLES:
        if not (folder / role).is_dir() or _digest(folder / role) != want.get(role):
            raise UserError(f"{folder / role} is missing or does not match its sha256 in {record_path} "
                            "(delete the folder to train the experts again)")
    return load_models(folder, device, dtype)


def prepare(loaded, eval_config, folder: Path, config: TrainConfig, expert_base=None) -> tuple[dict, dict]:
    """The run's experts: read back from `folder` if a previous attempt trained them, else trained
    from `expert_base` (a LoadedModel; default the target) and saved there."""
    model = loaded.model
    param = next(model.parameters())
    saved = load_saved(folder, param.device, param.dtype)
    if saved is not None:
        return saved, json.loads((folder / "experts.json").read_text())
    suite = search_prompts(eval_config)
    q = neutral_distributions(loaded, suite)
    models, info = train((expert_base or loaded).model, loaded.tokenizer, training_text(suite, q, config.sentences_per_prompt,
                                                                                        config.seed), config)
    info["neutral_distribution"] = {a: v.tolist() for a, v in q.items()}
    return models, save(models, folder, info)
