"""How well do the fairness surrogates of a finished prune run rank masks, with and without the
gradient prior? The run reports the Spearman rho on one held-out fifth of the records (about 20
masks), a noisy number; this refits on the same records for several held-out fifths and prints
each, plus the rho of the gradient's own linear prediction over all records (no fitting at all).

    .venv/bin/python benchmarks/surrogate_fit.py runs/default
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]

import numpy as np  # noqa: E402
import optuna  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from repair.methods.prune import masks as M  # noqa: E402
from surrogate import fit_surrogate  # noqa: E402

SAMPLED = ("base", "gradient", "sample")  # what round 1 trains on


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seeds", type=int, default=6, help="held-out fifths to try")
    args = parser.parse_args()
    config = json.loads((args.run_dir / "config.json").read_text())
    study = optuna.load_study(study_name=config["study"], storage=f"sqlite:///{(args.run_dir / 'study.db').resolve()}")
    done = {t.user_attrs["key"]: t for t in study.get_trials(deepcopy=False)
            if t.state.name == "COMPLETE" and t.user_attrs["phase"] in SAMPLED}
    grad = np.array(json.loads((args.run_dir / "surrogates" / "head-gradient.json").read_text())["gradient"])
    keys = sorted(done)
    X = np.stack([M.from_key(k, grad.shape).ravel() for k in keys]).astype(np.float64)
    f = np.array([done[k].values[0] for k in keys])
    print(f"{len(keys)} records; rho of the gradient's linear prediction over all of them: "
          f"{spearmanr(X @ grad.ravel(), f)[0]:.3f}")
    print(f"{'held-out fifth (seed)':>22} {'with prior':>11} {'without':>8}")
    rows = []
    for seed in range(1, args.seeds + 1):
        with_prior = fit_surrogate(X, f, seed=seed, select_by="spearman", group_size=grad.shape[1],
                                   base_params={"prior": grad.ravel()})[1].spearman
        plain = fit_surrogate(X, f, seed=seed, select_by="spearman", group_size=grad.shape[1])[1].spearman
        rows.append((with_prior, plain))
        print(f"{seed:>22} {with_prior:11.3f} {plain:8.3f}", flush=True)
    mean = np.mean(rows, axis=0)
    print(f"{'mean':>22} {mean[0]:11.3f} {mean[1]:8.3f}")


if __name__ == "__main__":
    main()
