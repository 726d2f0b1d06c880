"""Attention Pruning: head masks, seeded by the fairness gradient and stratified sampling, exported as
a checkpoint with the pruned heads' weight slices zeroed (plain transformers loads it)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from repair.errors import UserError
from repair.io import write_json_atomic
from repair.methods.base import Method
from repair.methods.prune import masks as M
from repair.methods.prune.heads import HeadMasker, head_layout
from repair.methods.prune.space import HeadMaskSpace
from repair.space import BASE, MIN_SAMPLES

# Masks pruning the k heads whose removal the fairness gradient says helps most, evaluated first.
GRADIENT_COUNTS = (1, 2, 3, 4, 6, 8, 12, 16)


class Prune(Method):
    name = "prune"
    seed_phases = ("gradient", "sample", "knockout")
    seed_description = "sampling masks"
    anneal_size = (256, 1500)  # chains, steps
    budget_share = 0.35
    changes_weights = True
    explanation = ("Their slices of the attention output projection are zero in these weights: plain "
                   "`transformers.AutoModelForCausalLM.from_pretrained` loads it, no custom code.")

    def __init__(self, config, model):
        self.config, self.options = config, self.options_of(config)
        self.space = HeadMaskSpace(head_layout(model)[:2], self.options.max_prune)

    @classmethod
    def check_config(cls, config, names) -> None:
        max_prune = cls.options_of(config).max_prune
        if not 0 < max_prune < 1:
            raise UserError(f"--max-prune must be a fraction between 0 and 1, got {max_prune}")

    @classmethod
    def describe(cls, config: dict) -> str:
        return f"{len(config['pruned_heads'])} pruned heads"

    @classmethod
    def short_name(cls, config: dict) -> str:
        heads = config["pruned_heads"]
        listed = f": {', '.join(f'{layer}:{head}' for layer, head in heads)}" if 0 < len(heads) <= 3 else ""
        return f"prune {len(heads)} head{'' if len(heads) == 1 else 's'}{listed}"

    @classmethod
    def surrogates_folder(cls, out: Path) -> Path:
        return out / "surrogates"  # where runs of one method kept them before there were several

    def min_budget(self) -> int:
        """Sampled masks the surrogates can learn from, and the rounds."""
        return MIN_SAMPLES + self.config.rounds * self.config.per_round

    # ---- what the method fits before searching --------------------------------------------------
    # prepare: nothing before the scorer exists (the gradient needs its evaluator: `head_gradient`)

    def intervention(self, model) -> HeadMasker:
        return HeadMasker(model, np.ones((1, *self.space.layout), dtype=np.float32))

    def head_gradient(self, search) -> np.ndarray | None:
        """d fairness / d head mask on the search split (see ConfigEvaluator.fairness_gradient),
        computed once and kept in the run directory; None for objectives without a gradient."""
        path = search.folder / "head-gradient.json"
        if not path.is_file():
            scorer = search.scorer
            with tqdm(total=1, desc="fairness gradient over head masks", unit="pass") as bar:
                grad = scorer.objectives["search"].fairness_gradient(scorer.evaluator, scorer.hooks[self.name], self.space.layout)
                bar.update(1)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(path, {"gradient": None if grad is None else grad.tolist()})
        grad = json.loads(path.read_text())["gradient"]
        return None if grad is None else np.array(grad)

    # ---- what it evaluates ----------------------------------------------------------------------
    def seed(self, search) -> list[tuple[str, str]]:
        """The unrepaired model, the masks the fairness gradient ranks best (pruning a head changes
        fairness by about -gradient), then stratified random masks, in all the budget left for rounds."""
        cfg, space = self.config, self.space
        grad = self.head_gradient(search)
        ranked = M.ranked_masks(grad, GRADIENT_COUNTS, space.max_changed) if grad is not None else []
        n_sample = cfg.budget_evals - cfg.rounds * cfg.per_round - len(ranked)
        items = [(BASE, "base")] + [(space.key(m), "gradient") for m in ranked]
        items += [(space.key(m), "sample") for m in M.stratified_masks(n_sample, space.layout, self.options.max_prune, cfg.seed)]
        if cfg.knockouts:
            items += [(space.key(m), "knockout") for m in M.knockout_masks(space.layout)]
        return items

    def surrogate_params(self, search) -> tuple[dict, dict]:
        """The fairness surrogate learns a scale of and corrections to the gradient's linear prediction."""
        grad = self.head_gradient(search)
        group = {"group_size": self.space.layout[1]}
        return {**group, "base_params": None if grad is None else {"prior": grad.ravel()}}, group

    def baselines(self, search) -> dict[str, list[str]]:
        out = {}
        if "random" in self.config.baselines:
            out["random"] = self.random_baseline(search)
        if "knockout" in self.config.baselines:
            out["knockout"] = self.knockout_baseline(search)
        return out

    def random_baseline(self, search) -> list[str]:
        """Random search: `budget_evals` masks sampled like the search's own, with another seed."""
        cfg, space = self.config, self.space
        masks = M.stratified_masks(cfg.budget_evals, space.layout, self.options.max_prune, cfg.seed + 7919)
        return search.evaluate([(BASE, "base")] + [(space.key(m), "random") for m in masks], "baseline: random masks")

    def knockout_baseline(self, search, n_levels: int = 8) -> list[str]:
        """FASP-style ranking (REFERENCES.md section 2): knock out heads one at a time, set aside the
        20% whose removal costs the most utility, prune the rest in order of fairness gained, at
        `n_levels` pruning levels. Knockouts take the budget left after the levels, heads in a seeded
        random order when the budget cannot cover all of them."""
        cfg, space = self.config, self.space
        n_bits, layout = space.n_bits, space.layout
        n_levels = max(1, min(n_levels, space.max_changed))
        order = np.random.default_rng(cfg.seed + 104729).permutation(n_bits)[: cfg.budget_evals - n_levels]
        knock = {int(i): space.key(np.arange(n_bits) != i) for i in order}
        keys = search.evaluate([(BASE, "base")] + [(k, "knockout") for k in knock.values()], "baseline: head knockouts")
        done = search.records.completed()
        base = done[BASE].values
        gain = {i: done[k].values[0] - base[0] for i, k in knock.items()}  # negative: fairer without head i
        cost = {i: done[k].values[1] - base[1] for i, k in knock.items()}
        protected = set(sorted(cost, key=cost.get, reverse=True)[: int(np.ceil(0.2 * len(cost)))])
        ranked = [i for i in sorted(gain, key=gain.get) if i not in protected]
        levels = []
        for j in range(1, n_levels + 1):
            bits = np.ones(n_bits, dtype=bool)
            bits[ranked[: max(1, round(space.max_changed * j / n_levels))]] = False
            levels.append((space.key(bits), "knockout-ranked"))
        return keys + search.evaluate(levels, "baseline: ranked pruning levels")

    # ---- applying and exporting a configuration -------------------------------------------------
    def attach(self, model, key: str) -> HeadMasker:
        """The configuration on `model` in memory (every row, any batch size), removable."""
        return HeadMasker(model, self.space.config(key)[None].astype(np.float32))

    def extra_tensors(self, key: str) -> list:
        """What a checkpoint of `key` holds beyond the base weights: nothing (the heads' slices are zeroed)."""
        return []

    def weights(self, model, key: str) -> dict:
        """The state dict of `model` with `key`'s heads zeroed (what a checkpoint or a stack saves)."""
        from repair.methods.prune.checkpoint import pruned_state_dict

        return pruned_state_dict(model, self.space.config(key))[0]

    def export(self, loaded, key: str, target, manifest: dict, card: str):
        from repair.methods.prune.checkpoint import export_pruned

        return export_pruned(loaded, self.space.config(key), target, manifest, card)
