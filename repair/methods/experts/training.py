"""The decoding-time experts' text, training and storage.

Text: the stereotype corpus (`repair.methods.experts.corpus`), sentences written for this project that carry a
stereotype, of the search split's concepts only (no select- or report-split stereotype is seen):
- anti-expert: each sentence with its stereotyped group ("... handed their coats to the female
  assistant, figuring they were the secretary.");
- expert: the same sentence with another group of the attribute (counterfactual data augmentation),
  the anti-expert's groups dealt out again so both name each group equally often (`repair.methods.experts.corpus`).
Nothing is trained on the association suite's prompts or towards its reference q: experts fitted
to the yardstick learned to send every prompt to the model's default group, which lowers kl_neutral
while kl_uniform rises, and their effect shrank in wording they never saw. The loss covers each
sentence after its first word.

Training: each expert starts as a copy of the expert base (default: the target itself) and only its
top K decoder layers learn (`--expert-layers`, default 8; AdamW, one pass over the text, seeded): the backward pass
stops there, which makes a step 2.5 times cheaper than full fine-tuning on this CPU
(benchmarks/experts.py --training), and the rest of the model keeps what it knew. The experts are
saved under RUN_DIR/experts/ with their sha256, so a resumed run loads them instead of training
again: when they start from the target itself, as their trained top layers alone (`top.ExpertTop`:
they run over the target's own trunk), else (`--expert-base`) as whole safetensors checkpoints.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from repair.errors import UserError
from repair.methods.experts.options import DEFAULT_LAYERS

ROLES = ("expert", "anti_expert")


@dataclass(frozen=True)
class TrainConfig:
    """How the experts are trained; part of a run's identity through `repair.rundir.RunConfig`."""

    layers: int = DEFAULT_LAYERS  # top decoder layers that learn
    counterfactuals: str = "matched"  # how the expert's groups are chosen (repair.methods.experts.corpus.COUNTERFACTUAL_RULES)
    epochs: int = 1
    lr: float = 1e-4
    batch: int = 32
    seed: int = 0


def training_pairs(sentences: list[str]) -> list[tuple[str, str]]:
    """(first word, the rest) of each sentence: the loss covers the rest."""
    return [(t.split(" ", 1)[0], " " + t.split(" ", 1)[1]) for t in sentences]


def training_text(corpus=None, rule: str = "matched") -> dict[str, list[tuple[str, str]]]:
    """{role: [(prompt, completion)]} from the corpus's search-split sentences (module docstring)."""
    from repair.methods.experts.corpus import Corpus

    text = (corpus or Corpus()).training_text("search", rule)
    return {role: training_pairs(text[role]) for role in ROLES}


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


def train(base, tokenizer, text: dict, config: TrainConfig, target=None) -> tuple[dict, dict]:
    """({role: a copy of `base` trained on text[role]}, what was done: sentences, losses). With
    `target` (the model `base` is), each expert is kept as its trained top layers over the target's trunk."""
    from repair.methods.experts.top import ExpertTop, copy_without_hooks, plain_head

    if target is not None and not plain_head(target):
        target = None  # its logits are more than head(norm(h)) (a soft-cap): whole expert models, as with --expert-base

    models, info = {}, {"config": asdict(config), "sentences": {r: len(t) for r, t in text.items()}, "loss": {}}
    for k, role in enumerate(ROLES):
        torch.manual_seed(config.seed + k)
        model = copy_without_hooks(base)
        losses = fine_tune(model, tokenizer, text[role], config, f"training the {role.replace('_', '-')}")
        info["loss"][role] = {"first": losses[0], "last": sum(losses[-5:]) / len(losses[-5:]), "steps": len(losses)}
        models[role] = model if target is None else ExpertTop.from_model(target, model, config.layers)
        del model
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


def load_models(folder: Path, target) -> dict:
    """{role: the expert in folder/role} for inference beside `target` (on its device, in its dtype): a
    top over its trunk, or a whole checkpoint (a run's experts, a bundle's); ValueError when a top
    does not fit the target."""
    from transformers import AutoModelForCausalLM

    from repair.methods.experts.top import is_top, load_top

    param = next(target.parameters())
    out = {}
    for role in ROLES:
        where = Path(folder) / role
        out[role] = load_top(where, target) if is_top(where) else \
            AutoModelForCausalLM.from_pretrained(where, dtype=param.dtype).to(param.device).eval().requires_grad_(False)
    return out


def load_saved(folder: Path, target, sha256: dict | None = None) -> dict | None:
    """The experts saved in `folder` (None when there are none), checked against their sha256."""
    record_path = folder / "experts.json"
    if not record_path.is_file():
        return None
    want = sha256 or json.loads(record_path.read_text())["sha256"]
    for role in ROLES:
        if not (folder / role).is_dir() or _digest(folder / role) != want.get(role):
            raise UserError(f"{folder / role} is missing or does not match its sha256 in {record_path} "
                            "(delete the folder to train the experts again)")
    return load_models(folder, target)


def prepare(loaded, eval_config, folder: Path, config: TrainConfig, expert_base=None) -> tuple[dict, dict]:
    """The run's experts: read back from `folder` if a previous attempt trained them, else trained
    from `expert_base` (a LoadedModel; default the target) on the corpus and saved there."""
    from repair.methods.experts.corpus import Corpus

    saved = load_saved(folder, loaded.model)
    if saved is not None:
        return saved, json.loads((folder / "experts.json").read_text())
    corpus = Corpus()
    models, info = train((expert_base or loaded).model, loaded.tokenizer, training_text(corpus, config.counterfactuals), config,
                         target=None if expert_base is not None else loaded.model)
    info["corpus_sha256"] = corpus.sha256
    return models, save(models, folder, info)
