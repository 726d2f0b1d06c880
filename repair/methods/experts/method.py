"""Decoding-time experts (DExperts; Tong et al.): an expert and an anti-expert, fine-tuned on this
project's association text (`repair.methods.experts.training`), shift the target's next-token logits by their
difference (`repair.methods.experts.transform`). Searched: the strength alpha and the combination rule.

The grid (`repair.methods.experts.space.EXPERT_ALPHAS`) is small and every configuration of it is the same three
forwards combined another way, so the seed evaluates all of it in one shared pass; nothing is left
for the surrogate rounds. Each rule's configurations form their own sequence (`rule:logits`,
`rule:probs`), verified and reported beside the search's, so the report shows which rule is better.
"""
from __future__ import annotations

import sys
from pathlib import Path

from repair.errors import UserError
from repair.methods.base import Method
from repair.methods.experts import training
from repair.methods.experts.space import ExpertSpace
from repair.methods.experts.transform import ExpertSetting, ExpertsTransform, vocab_problem
from repair.space import BASE

ARTIFACT = "experts/models"


class Experts(Method):
    name = "experts"
    seed_phases = ("grid",)
    seed_description = "evaluating every (rule, alpha) on shared forwards"
    budget_share = 0.1  # a 13-point grid on shared forwards: a small share covers it
    explanation = ("At every generated token the logits are shifted by alpha x the difference between an expert "
                   "(`expert/`, tuned on anti-stereotypical text) and an anti-expert (`anti_expert/`, on "
                   "stereotypical text); both are beside the weights.")
    setting_flags = ("alpha",)

    def __init__(self, config, model):
        self.config, self.options, self.target = config, self.options_of(config), model
        self.space = ExpertSpace()
        self.keys_per_batch = len(self.space.enumerate()) + 1  # the whole grid and the unrepaired model at once
        self.models: dict | None = None
        self.record: dict = {}
        self.expert_base = None
        # the top layers that learn: --expert-layers, else TrainConfig's 8 or every layer of a smaller model
        self.trained_layers = self.options.expert_layers or min(training.TrainConfig.layers, _depth(model))

    @classmethod
    def check_config(cls, config, names) -> None:
        if config.baselines and names[0] == "experts":
            raise UserError("--baselines random,knockout are baselines of --method prune (and random of fairsteer); "
                            "experts has its own (it evaluates its whole grid)")
        if cls.options_of(config).expert_layers is not None and cls.options_of(config).expert_layers < 1:
            raise UserError(f"--expert-layers must be at least 1 (the top decoder layers the experts train), got "
                            f"{cls.options_of(config).expert_layers}")
        if cls.options_of(config).expert_base and "experts" not in names:
            raise UserError(f"--expert-base is the starting model of --method experts' experts; --method {config.method} "
                            "trains none (leave the flag out)")

    @classmethod
    def describe(cls, config: dict) -> str:
        return f"experts' shift: alpha {config['alpha']:g}, rule {config['rule']}" if config["alpha"] else "experts off"

    @classmethod
    def short_name(cls, config: dict) -> str:
        return (f"experts alpha {config['alpha']:g}" + (" (probs)" if config["rule"] == "probs" else "")
                if config["alpha"] else "experts off")

    @classmethod
    def merge_setting(cls, saved: dict, setting: dict, n_layers: int) -> dict:
        merged = {**saved, **setting}
        ExpertSetting(**merged).check()
        return merged

    @classmethod
    def reattach(cls, model, tensors: dict, meta: dict, folder: Path) -> ExpertsTransform:
        """Load an exported bundle's experts beside `model` and make its forward apply them
        (repair.load); ValueError when they do not fit the model."""
        models = training.load_models(folder, model)
        return ExpertsTransform(model, models["expert"], models["anti_expert"], [ExpertSetting(**meta["setting"])]).attach()

    def min_budget(self) -> int:
        """The whole grid: every configuration is the same forwards combined another way."""
        return len(self.space.enumerate())

    def check_inputs(self, loaded) -> None:
        """Load `--expert-base` and refuse one whose vocabulary differs from the target's, before the
        run writes anything; refuse more trained layers than the model has."""
        n = _depth(loaded.model)
        if self.trained_layers > n:
            raise UserError(f"--expert-layers {self.options.expert_layers}: the model has {n} decoder layers "
                            f"(give 1 to {n})")
        if not self.options.expert_base:
            return
        from dataclasses import replace

        from repair.errors import ModelError
        from repair.models import load_model, same_vocabulary

        try:
            base = load_model(replace(self.config.model, model=self.options.expert_base, device_map=None))
        except ModelError as exc:
            raise UserError(f"--expert-base: {exc}") from None
        problem = vocab_problem(loaded.model, (base.model,), names=("it",))
        if problem is None and not same_vocabulary(base.tokenizer, loaded.tokenizer):
            problem = "its tokenizer maps text to other token ids"
        if problem:
            raise UserError(f"--expert-base {self.options.expert_base}: {problem}; the experts must share the target's "
                            "tokenizer (give a model of the same family)")
        self.expert_base = base

    # ---- what the method fits before searching --------------------------------------------------
    def prepare(self, loaded, config, search, probes) -> None:
        """The expert and the anti-expert, trained on the search split's text, kept in RUN_DIR/experts/."""
        self.models, self.record = training.prepare(loaded, search, self._folder(config),
                                                   training.TrainConfig(layers=self.trained_layers, seed=config.seed),
                                                   self.expert_base)
        self.expert_base = None  # trained copies made; the base is not needed any more
        loss = self.record["loss"]
        print("experts trained on " + ", ".join(f"{n} sentences ({r.replace('_', '-')}: loss {loss[r]['first']:.2f} -> "
                                                f"{loss[r]['last']:.2f})" for r, n in self.record["sentences"].items()),
              file=sys.stderr)

    @staticmethod
    def _folder(config) -> Path:
        return config.out / "experts"

    def artifacts(self) -> dict:
        """Where the experts are and their sha256: too large for the study, a worker reads them from
        the run's folder (a shared filesystem) and checks them."""
        return {ARTIFACT: {"folder": str(self._folder(self.config).resolve()), "sha256": self.record["sha256"]}}

    def load_artifacts(self, attrs: dict) -> None:

        stored = attrs.get(f"artifact:{ARTIFACT}")
        if not stored:
            raise UserError("the run has not published its experts yet (start the worker after the run's training "
                            "step, or let it wait with a larger --max-idle)")
        folder = Path(stored["folder"])
        if not (folder / "experts.json").is_file():
            raise UserError(f"this worker cannot read the run's experts in {folder}: put the run folder on a "
                            "filesystem both machines share, or copy it to the same path here")
        self.models = training.load_saved(folder, self.target, stored["sha256"])

    def intervention(self, model) -> ExpertsTransform:
        try:
            return ExpertsTransform(model, self.models["expert"], self.models["anti_expert"], [ExpertSetting()])
        except ValueError as exc:
            raise UserError(f"the experts do not fit this model: {exc}") from None

    # ---- what it evaluates ----------------------------------------------------------------------
    def seed(self, search) -> list[tuple[str, str]]:
        return [(BASE, "base")] + [(k, "grid") for k in self.space.enumerate()]

    def every_configuration(self) -> list[str]:
        return self.space.enumerate()  # the grid: all evaluated by the seed

    def surrogate_params(self, search) -> tuple[dict, dict]:
        return {}, {}

    def baselines(self, search) -> dict[str, list[str]]:
        """Each combination rule's configurations, from the search's own records."""
        keys = self.space.enumerate()
        return {f"rule:{rule}": [BASE] + [k for k in keys if self.space.config(k).rule == rule]
                for rule in dict.fromkeys(self.space.config(k).rule for k in keys)}

    # ---- applying and exporting a configuration -------------------------------------------------
    def attach(self, model, key: str) -> ExpertsTransform:
        """The configuration on `model` in memory: its forward applies the experts; removable."""
        return ExpertsTransform(model, self.models["expert"], self.models["anti_expert"], [self.space.config(key)]).attach()

    def bundle(self, key: str) -> tuple[dict, dict, dict | None]:
        """What a hooked checkpoint of `key` stores: no tensors, the setting, the two experts beside the weights."""
        s = self.space.config(key)
        return {}, {"setting": {"alpha": s.alpha, "rule": s.rule}}, self.models

    def extra_tensors(self, key: str) -> list:
        """Both experts' weights (they run beside the target at every generated token)."""
        return [p for m in self.models.values() for p in m.parameters()]

    def export(self, loaded, key: str, target, manifest: dict, card: str):
        from repair.export import export_hooked

        tensors, meta, models = self.bundle(key)
        transform = ExpertsTransform(loaded.model, self.models["expert"], self.models["anti_expert"], [self.space.config(key)])
        return export_hooked(loaded, self.name, tensors, meta, target, manifest, card, models=models,
                             expected=transform.logits)


def _depth(model) -> int:
    from repair import arch

    return len(arch.decoder_layers(model, "decoding-time experts"))
