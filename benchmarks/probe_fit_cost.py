"""What FairMed's probers and FairSteer's probes cost to fit on the search split, and how well they
score held out: probe data (rows = prompts x read positions), fit seconds, the best layers, the gate
levels of one layer, peak memory. Run with nothing else heavy on the machine.

    .venv/bin/python benchmarks/probe_fit_cost.py
"""
import resource
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent.resolve()]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from repair.methods.fairmed import probers as P  # noqa: E402
from repair.methods.fairsteer import steering as S  # noqa: E402
from repair.models import ModelSpec, load_model  # noqa: E402
from repair.suites.base import EvalConfig  # noqa: E402

loaded = load_model(ModelSpec("smollm2-135m", "cpu", "float32"))
config = EvalConfig(split="search", seed=0)
t = time.perf_counter()
data = P.probe_data(loaded, config, progress=False)
print("probe_data (MLP)", data.activations.shape, f"{time.perf_counter()-t:.0f} s", flush=True)
t = time.perf_counter()
probers, scores = P.fit(data)
print(f"probers fit {time.perf_counter()-t:.0f} s", flush=True)
best = {}
for s in scores:
    best.setdefault(s["layer"], []).append(s["macro_f1"] - s["majority_f1"])
top = sorted(best, key=lambda l: -np.mean(best[l]))[:5]
print("fairmed best layers", [(l, round(float(np.mean(best[l])), 3)) for l in top])
del data
t = time.perf_counter()
acts, label, concepts, excess = S.association_examples(loaded, config, progress=False)
print("steering acts", acts.shape, f"{time.perf_counter()-t:.0f} s", "biased", (label == 1).sum(), "unbiased", (label == 0).sum(), flush=True)
t = time.perf_counter()
st, sc = S.fit(acts, label, concepts, excess=excess)
print(f"steering fit {time.perf_counter()-t:.0f} s")
print("fairsteer best", sorted(((s['layer'], round(s['macro_f1'], 3)) for s in sc), key=lambda x: -x[1])[:5], "majority_f1", round(sc[0]["majority_f1"], 3))
print("gates layer 14", st.gate_table()[14])
print("peak RSS GiB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
