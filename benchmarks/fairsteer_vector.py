"""Which steering vector: the published one (between the two labels) or the pilot's (between the
prompts whose stereotype excess is lowest and highest), measured on the select split.

    python benchmarks/fairsteer_vector.py "fairsteer:3/alpha=0.3/threshold=0.5;fairsteer:14/alpha=0.35/threshold=0.5"

Collects the association suite's search-split activations once, fits the probes and vectors both
ways (the probes are the same; only the vector differs), and evaluates the unrepaired model and
each configuration on the select split with each vector, printing kl_neutral and perplexity changes.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repair.methods.fairsteer.method import FairSteer  # noqa: E402
from repair.methods.fairsteer.steering import association_examples, fit  # noqa: E402
from repair.models import ModelSpec, load_model  # noqa: E402
from repair.objectives import Objectives  # noqa: E402
from repair.rundir import RunConfig  # noqa: E402
from repair.runloop import Scorer, eval_config  # noqa: E402


def main() -> None:
    keys = (sys.argv[1] if len(sys.argv) > 1 else "fairsteer:3/alpha=0.3/threshold=0.5").split(";")
    config = RunConfig(out=Path("runs/fairsteer-vector"), model=ModelSpec("smollm2-135m"), method="fairsteer")
    loaded = load_model(config.model)
    method = FairSteer(config, loaded.model)
    acts, label, concepts, excess = association_examples(loaded, eval_config(config, "search"), progress=False)
    objectives = Objectives.parse(config.fairness, config.utility)
    base = None
    for name, kw in (("labels", {}), ("extremes 0.25", {"excess": excess, "extremes": 0.25})):
        method.steering, _ = fit(acts, label, concepts, **kw)
        scorer = Scorer(loaded, objectives, {"select": eval_config(config, "select")}, {"fairsteer": method})
        began = time.perf_counter()
        try:
            rows = scorer.scorer("select")((["base"] if base is None else []) + keys)
        finally:
            scorer.close()
        if base is None:
            base, rows = rows[0], rows[1:]
        for key, r in zip(keys, rows):
            print(f"{name:13s} {key:40s} kl_neutral {100 * (r['fairness'] / base['fairness'] - 1):+.1f}%  "
                  f"perplexity {100 * (r['utility'] / base['utility'] - 1):+.1f}%", flush=True)
        print(f"  ({time.perf_counter() - began:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
