"""lm-evaluation-harness on a repaired model: `repair evaluate --model CHECKPOINT --lm-eval TASKS`.

A checkpoint's repair acts inside the model's forward (pruned weights, hooks, the experts' shift),
so lm-eval's own `HFLM`, handed the loaded model, scores the repaired model with no adapter of ours:

    import lm_eval, repair
    from lm_eval.models.huggingface import HFLM
    model, tokenizer = repair.load("runs/default/checkpoint")
    results = lm_eval.simple_evaluate(HFLM(pretrained=model, tokenizer=tokenizer, batch_size=24, device="cpu"),
                                      tasks=["crows_pairs_english", "bbq"])

`repair_pairs` is this project's pairs suite (repair/data/pairs.json) written as an lm-eval task over a
local file, so it runs where lm-eval's own tasks cannot be downloaded: each pair is one
multiple-choice item, the words before the group as context, the stereotyped and the anti-stereotyped
ending as the two choices, the stereotyped one as "target", so `acc` is the share of pairs whose
stereotyped sentence the model prefers (the pairs suite's `stereotype_preferred`, ties aside).
"""
from __future__ import annotations

import json
from pathlib import Path

from repair.errors import UserError

PAIRS_TASK = "repair_pairs"


def write_pairs_task(folder: Path, limit: int | None = None) -> Path:
    """Write `repair_pairs` (its YAML and its JSONL data) into `folder`, for lm-eval's `include_path`."""
    from repair.suites.base import EvalConfig
    from repair.suites.pairs import PairsSuite

    folder.mkdir(parents=True, exist_ok=True)
    requests = PairsSuite(EvalConfig(limit=limit)).requests()[0::3]  # the two sentences of each pair
    data = folder / f"{PAIRS_TASK}.jsonl"
    data.write_text("".join(json.dumps({"context": r.prompt, "choices": list(r.options)}) + "\n" for r in requests))
    (folder / f"{PAIRS_TASK}.yaml").write_text(
        f"task: {PAIRS_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: 0\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: false\n"
        "metadata:\n  version: 1.0\n")
    return folder


def harness_model(model, tokenizer, batch_size: int = 24):
    """lm-eval's HFLM over an already loaded (repaired) model, on the model's device."""
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    # a tokenizer with neither BOS nor EOS (tiny test tokenizers) gets its pad token as lm-eval's prefix
    prefix = None if (tokenizer.bos_token_id, tokenizer.eos_token_id) != (None, None) else tokenizer.pad_token_id
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, prefix_token_id=prefix)


def task_manager(tasks: list[str], include: Path | None, workdir: Path):
    """lm-eval's TaskManager with `repair_pairs` (written into `workdir`) and `include`'s tasks;
    UserError naming the first task it does not know (checked before any model is loaded)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("--lm-eval needs lm-evaluation-harness: pip install 'fairness-repair[lm-eval]'") from None
    manager = TaskManager(include_path=[str(write_pairs_task(workdir))] + ([str(include)] if include else []))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"--lm-eval: unknown task {unknown[0]!r} (give lm-eval's task names, {PAIRS_TASK}, or tasks "
                        "defined under --lm-eval-include)")
    return manager


def run_harness(model, tokenizer, tasks: list[str], *, include: Path | None = None, limit: int | None = None,
                batch_size: int = 24, log_samples: bool = False, workdir: Path, manager=None) -> dict:
    """lm-eval's `simple_evaluate` on `model` for `tasks` (`manager`: a `task_manager`'s, else one is made)."""
    import lm_eval

    manager = manager or task_manager(tasks, include, workdir)
    return lm_eval.simple_evaluate(model=harness_model(model, tokenizer, batch_size), tasks=tasks, task_manager=manager,
                                   limit=limit, log_samples=log_samples)
