"""The `repair` command line. Every flag maps one to one onto a frozen configuration dataclass."""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from pathlib import Path

from repair.errors import UserError
from repair.io import write_text_atomic
from repair.load import SETTING_FLAGS
from repair.methods import METHODS
from repair.methods.base import add_flags
from repair.models import EMBEDDED_ALIAS, ModelSpec
from repair.suites import REGISTRY
from repair.suites.base import EvalConfig


class _Parser(argparse.ArgumentParser):
    """Bad flags end in one line naming the problem, status 2 (argparse's default prints usage too)."""

    def error(self, message):
        self.exit(2, f"repair: error: {message} (see '{self.prog} --help')\n")


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=EMBEDDED_ALIAS,
                   help=f"hub id, local Hugging Face directory, .gguf file, or '{EMBEDDED_ALIAS}' (the embedded default)")
    g.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--device-map", default=None, help="'auto' shards a model larger than one GPU (accelerate)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow code shipped in a model directory to run")


def add_suite_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", type=Path, default=None,
                   help="folder with bbq/, mmlu/, wikitext2/ in their official formats (default: $REPAIR_DATA_DIR)")
    g.add_argument("--categories", type=_csv, default=None, help="BBQ categories, comma-separated (default: all 11)")
    g.add_argument("--attributes", type=_csv, default=None,
                   help="association attributes, comma-separated (gender, religion, race_ethnicity, nationality, age, "
                        "disability, sexual_orientation, ses; default: all)")
    g.add_argument("--limit", type=int, default=None, help="at most N items per BBQ category / association attribute / MMLU subject")
    g.add_argument("--split", choices=["search", "select", "report", "all"], default="all",
                   help="templates a search fits on, held-out templates it chooses on, held-out templates only "
                        "reported, or all of them")
    g.add_argument("--bbq-mode", choices=["cloze", "choice"], default="cloze",
                   help="cloze: length-normalised log-likelihood of each answer; choice: the letter after a multiple-choice prompt")
    g.add_argument("--mmlu-subjects", type=_csv, default=None, help="MMLU subjects, comma-separated (default: all)")
    g.add_argument("--mmlu-shots", type=int, default=0, help="k-shot MMLU, k in 0..5, shots from the dev split")
    g.add_argument("--ppl-tokens", type=int, default=4096, help="tokens scored by the perplexity suites")
    g.add_argument("--ppl-window", type=int, default=512, help="sliding-window length for perplexity")
    g.add_argument("--ppl-stride", type=int, default=256, help="sliding-window stride for perplexity")
    g.add_argument("--seed", type=int, default=0, help="seeds item selection and bootstrap intervals")


def eval_config(args) -> EvalConfig:
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if not 0 <= args.mmlu_shots <= 5:
        raise UserError(f"--mmlu-shots must be between 0 and 5, got {args.mmlu_shots}")
    if args.ppl_tokens < 2:
        raise UserError(f"--ppl-tokens must be at least 2, got {args.ppl_tokens}")
    if not (2 <= args.ppl_window and 1 <= args.ppl_stride <= args.ppl_window):
        raise UserError(f"need --ppl-window >= 2 and 1 <= --ppl-stride <= --ppl-window, got {args.ppl_window}/{args.ppl_stride}")
    if args.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {args.seed}")
    for flag, value in (("--categories", args.categories), ("--attributes", args.attributes),
                        ("--mmlu-subjects", args.mmlu_subjects)):
        if value is not None and not value:  # "--categories ''" would otherwise mean all of them
            raise UserError(f"{flag} is empty; name at least one, or leave the flag out for all of them")
    data_dir = args.data_dir or os.environ.get("REPAIR_DATA_DIR") or None
    return EvalConfig(
        data_dir=Path(data_dir) if data_dir else None, split=args.split, limit=args.limit,
        categories=args.categories, attributes=args.attributes, bbq_mode=args.bbq_mode, mmlu_subjects=args.mmlu_subjects,
        mmlu_shots=args.mmlu_shots, ppl_tokens=args.ppl_tokens, ppl_window=args.ppl_window,
        ppl_stride=args.ppl_stride, seed=args.seed,
    )


def model_spec(args) -> ModelSpec:
    return ModelSpec(args.model, args.device, args.dtype, args.device_map, args.trust_remote_code)


def cmd_evaluate(args) -> int:
    from repair.io import check_writable, write_json_atomic
    from repair.methods.prune.masks import parse_head_spec, pruned_heads
    from repair.suites import build_suite

    if args.lm_eval is not None:
        return _evaluate_with_lm_eval(args)
    # Everything that can be checked without the model is checked first, without importing torch.
    names = list(dict.fromkeys(args.suite))
    if not names:
        raise UserError(f"--suite is empty; choose from {', '.join(REGISTRY)}")
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise UserError(f"unknown suite {unknown[0]!r} (choose from {', '.join(REGISTRY)})")
    config = eval_config(args)
    if args.batch_tokens < 1:
        raise UserError(f"--batch-tokens must be at least 1, got {args.batch_tokens}")
    heads = parse_head_spec(args.prune_heads) if args.prune_heads is not None else None
    if args.json is not None:
        check_writable(args.json, "--json")
    suites = {name: build_suite(name, config, None) for name in names}  # validate the data before the model

    from repair.evaluate import evaluate, format_table
    from repair.models import load_model

    setting = hooked_setting(args)
    loaded = load_model(model_spec(args))
    progress = not args.no_progress
    before = {}
    if args.compare is not None:  # the baseline first, unmasked; the same loaded model when it is the same spec
        same = args.compare == args.model
        baseline = loaded if same else load_model(ModelSpec(args.compare, args.device, args.dtype, args.device_map,
                                                            args.trust_remote_code))
        compared = evaluate(baseline, suites, config, batch_tokens=args.batch_tokens, progress=progress, results_out=before)
    hook = _attach_checkpoint(loaded, args.model, setting)
    masker = keep = None
    if heads is not None:
        from repair.methods.prune.heads import HeadMasker, head_layout

        n_layers, n_heads, _ = head_layout(loaded.model)
        keep = heads.keep_mask(n_layers, n_heads)
        masker = HeadMasker(loaded.model, keep[None])
    after = {}
    try:
        report = evaluate(loaded, suites, config, batch_tokens=args.batch_tokens, progress=progress, results_out=after)
    finally:
        for h in (masker, hook):
            if h is not None:
                h.remove()
    if keep is not None:
        report["pruned_heads"] = pruned_heads(keep)
        print(f"pruned {len(report['pruned_heads'])} of {keep.size} attention heads "
              f"({keep.shape[0]} layers x {keep.shape[1]} heads)\n")
    print(format_table(report))
    if args.compare is not None:
        from repair.evaluate import compare, format_comparison

        report["compare"] = {"baseline": compared["model"], "baseline_suites": compared["suites"],
                             "changes": compare(before, after, seed=config.seed)}
        print(f"\nchange against --compare {args.compare} on the same items (paired bootstrap, 1,000 resamples):")
        print(format_comparison(report["compare"]["changes"], "baseline", "model"))
    if args.json is not None:
        write_json_atomic(args.json, report)
        print(f"\nwrote {args.json}")
    return 0


def cmd_run(args) -> int:
    from repair.run import run
    from repair.rundir import RunConfig

    from repair.methods import BUDGET_EVALS, VERIFY_TOP, defaults_for
    from repair.methods.base import options_from

    data_dir = args.data_dir or os.environ.get("REPAIR_DATA_DIR") or None
    several = defaults_for(args.method)  # one method or several: their defaults differ (refuses an unknown method)
    config = RunConfig(
        out=args.out, model=model_spec(args), method=args.method, data_dir=Path(data_dir) if data_dir else None,
        fairness=args.fairness, utility=args.utility, rounds=args.rounds,
        budget_evals=BUDGET_EVALS[several] if args.budget_evals is None else args.budget_evals,
        budget_shares=args.budget_shares, stack=several == "several" if args.stack is None else args.stack,
        export_all=args.export_all,
        per_round=args.per_round, options={name: options_from(args, METHODS.options(name)) for name in METHODS},
        max_utility_loss=args.max_utility_loss,
        max_kl_uniform_rise=args.max_kl_uniform_rise,
        max_q_drift=args.max_q_drift,
        panel_bbq_limit=args.panel_bbq_limit,
        knockouts=args.knockouts, baselines=args.baselines, search_limit=args.search_limit,
        search_ppl_tokens=args.search_ppl_tokens, report_limit=args.report_limit,
        report_ppl_tokens=args.report_ppl_tokens,
        verify_top=VERIFY_TOP[several] if args.verify_top is None else args.verify_top, bbq_mode=args.bbq_mode,
        batch_masks=args.batch_masks, storage=args.storage, study=args.study, workers_only=args.workers_only,
        heartbeat=args.heartbeat, seed=args.seed,
    )
    return run(config)


def cmd_worker(args) -> int:
    from repair.worker import WorkerConfig, run_worker

    if args.batch_masks < 1 or args.poll <= 0 or args.max_idle <= 0:
        raise UserError("--batch-masks must be >= 1 and --poll, --max-idle > 0")
    return run_worker(WorkerConfig(
        storage=args.storage, study=args.study, model=args.model, data_dir=args.data_dir, device=args.device,
        device_map=args.device_map, batch_masks=args.batch_masks, poll=args.poll, max_idle=args.max_idle,
    ))


def add_setting_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("hooked checkpoint", "replace parts of a FairMed, FairSteer or experts checkpoint's setting")
    g.add_argument("--layers", default=None, help="comma-separated layers to treat, e.g. 20,25 (FairSteer: one layer)")
    g.add_argument("--lam", type=float, default=None, help="FairMed lambda: the largest change, a fraction of the activation's norm")
    g.add_argument("--steps", type=int, default=None, help="FairMed gradient steps per position")
    g.add_argument("--gate", type=float, default=None, help="FairMed: treat only positions above this quantile of the probers' KL")
    g.add_argument("--alpha", type=float, default=None,
                   help="FairSteer: strength, a fraction of the layer's mean activation norm; experts: the shift's strength")
    g.add_argument("--threshold", default=None,
                   help="FairSteer: steer where the probe's P(biased) exceeds this, in [0, 1], or 'always'")


def hooked_setting(args) -> dict:
    from repair.load import parse_setting

    return parse_setting(args.layers, args.lam, args.steps, args.gate, args.alpha, args.threshold)


def _evaluate_with_lm_eval(args) -> int:
    """`repair evaluate --lm-eval TASKS`: lm-evaluation-harness on the model as loaded, its repair attached."""
    import json
    import tempfile

    from repair.harness import run_harness, task_manager
    from repair.io import check_writable, write_json_atomic

    tasks = list(dict.fromkeys(args.lm_eval))
    if not tasks:
        raise UserError("--lm-eval is empty; name lm-eval tasks (e.g. crows_pairs_english,bbq or repair_pairs)")
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if args.lm_eval_batch < 1:
        raise UserError(f"--lm-eval-batch must be at least 1, got {args.lm_eval_batch}")
    if args.lm_eval_include is not None and not args.lm_eval_include.is_dir():
        raise UserError(f"--lm-eval-include {args.lm_eval_include} is not a folder (give a folder of lm-eval task YAML files)")
    if args.json is not None:
        check_writable(args.json, "--json")
    from repair.models import load_model

    with tempfile.TemporaryDirectory(prefix="repair-lm-eval-") as work:
        manager = task_manager(tasks, args.lm_eval_include, Path(work))  # unknown tasks fail before the model loads
        loaded = load_model(model_spec(args))
        hook = _attach_checkpoint(loaded, args.model, hooked_setting(args))
        result = run_harness(loaded.model, loaded.tokenizer, tasks, limit=args.limit, batch_size=args.lm_eval_batch,
                             workdir=Path(work), manager=manager)
    if hook is not None:
        hook.remove()
    from lm_eval.utils import make_table

    print(make_table(result))
    if args.json is not None:
        kept = {k: result[k] for k in ("results", "versions", "n-shot", "config") if k in result}
        write_json_atomic(args.json, json.loads(json.dumps(kept, default=str)))  # lm-eval's config names objects
        print(f"wrote {args.json}")
    return 0


def _attach_checkpoint(loaded, model: str, setting: dict):
    """The intervention of a hooked checkpoint (`repair run --method fairmed`), attached, so that a
    checkpoint is evaluated as it is used; None for other models."""
    folder = Path(model)
    from repair.load import MANIFEST, attach_saved

    if not (folder / MANIFEST).is_file():
        if setting:
            raise UserError(f"{SETTING_FLAGS} change a hooked checkpoint's setting; {model} is not a checkpoint "
                            "exported by fairness-repair (export one with repair run --method fairmed, fairsteer or experts)")
        return None
    hook = attach_saved(loaded.model, folder, setting)
    if hook is not None:
        print(f"with the checkpoint's {hook.describe()}\n")
    return hook


def cmd_generate(args) -> int:
    from repair.load import load, read_manifest

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    setting = hooked_setting(args)
    read_manifest(args.model)  # a folder that is no checkpoint fails here, before any loading
    import torch

    model, tokenizer = load(args.model, device=args.device, setting=setting)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(args.device)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    print(args.prompt + tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return 0


def cmd_compare(args) -> int:
    from repair.compare import CompareConfig, generate_all, page, read_prompts, side_by_side
    from repair.io import check_writable, write_text_atomic
    from repair.load import load, read_manifest

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {args.seed}")
    prompts = read_prompts(args.prompts)
    read_manifest(args.repaired)  # a folder that is no checkpoint fails before any loading
    run_dir = args.repaired.parent if (args.repaired.parent / "candidates.jsonl").is_file() else None
    target = args.html or (run_dir / "compare.html" if run_dir else Path("compare.html"))
    check_writable(target, "--html")
    from repair.models import load_model, same_vocabulary

    base = load_model(model_spec(args))
    model, tokenizer = load(args.repaired, device=str(next(base.model.parameters()).device))
    if not same_vocabulary(base.tokenizer, tokenizer):
        raise UserError(f"--model {args.model} and --repaired {args.repaired} have different tokenizers: compare a "
                        "checkpoint with the model it was repaired from")
    config = CompareConfig(max_new_tokens=args.max_new_tokens, seed=args.seed)
    before = generate_all(base.model, base.tokenizer, prompts, config)
    after = generate_all(model, tokenizer, prompts, config)
    print(side_by_side(prompts, before, after))
    write_text_atomic(target, page(prompts, before, after, args.model, str(args.repaired), config))
    if run_dir is not None and target.resolve() == (run_dir / "compare.html").resolve():
        from repair.run import write_run_report

        write_run_report(run_dir)  # the report now links the page
    print(f"wrote {target}")
    return 0


def cmd_probe(args) -> int:
    # torch and the methods load only for the subcommand that needs them: the parser builds without them
    from repair.methods.fairmed.cache import HEATMAP, PROBERS, SCORES, format_scores, probe
    from repair.models import load_model
    from reports.heatmap import probe_heatmap, standalone

    if args.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {args.seed}")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file; give a folder")
    loaded = load_model(model_spec(args))
    _, scores = probe(loaded, EvalConfig(split="search", seed=args.seed), args.out, seed=args.seed,
                      progress=not args.no_progress)
    print(format_scores(scores))
    heatmap = args.out / HEATMAP
    write_text_atomic(heatmap, standalone(probe_heatmap(scores)))
    print(f"\nwrote {args.out / SCORES}, {args.out / PROBERS} and {heatmap}")
    return 0


def add_probe_parser(sub) -> None:
    """The `probe` subcommand on an argparse subparsers object."""
    p = sub.add_parser("probe", help="fit FairMed's probers and show where the model encodes group associations",
                       description="Fit FairMed's probers (one per layer and association attribute) on the search "
                                   "split, print their held-out scores per layer, and write DIR/probe-scores.json, "
                                   "DIR/probers.safetensors and DIR/heatmap.svg. DIR also caches the activations: "
                                   "a rerun reuses them.")
    add_model_flags(p)
    p.add_argument("--out", type=Path, default=Path("runs/probe"), help="output and cache folder (default: runs/probe)")
    p.add_argument("--seed", type=int, default=0, help="seeds the fit and the suite")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_probe)


def cmd_report(args) -> int:
    from repair.run import write_run_report

    print(write_run_report(args.run_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="repair", description="Measure and repair social bias in causal language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ev = sub.add_parser("evaluate", help="measure bias and utility of a model on the suites",
                        description="Score a model on fairness and utility suites; print a table and write per-item JSON.")
    add_model_flags(ev)
    ev.add_argument("--suite", type=_csv, default=("association", "text"),
                    help=f"comma-separated suites from {', '.join(REGISTRY)} (default: association,text; pairs also ships "
                         "with the tool)")
    add_suite_flags(ev)
    ev.add_argument("--json", type=Path, default=None, help="write metrics, data hashes and per-item records here")
    ev.add_argument("--prune-heads", default=None, metavar="SPEC",
                    help="evaluate with these attention heads masked: LAYER:HEAD pairs ('0:3,5:1'), or a JSON file "
                         "holding a list of [layer, head] pairs (a run's checkpoint/repair_manifest.json will do) "
                         "or a layers x heads 0/1 array (1 = keep)")
    ev.add_argument("--compare", default=None, metavar="MODEL",
                    help="also score MODEL (e.g. the unrepaired model; the same spec as --model reuses it, without "
                         "--prune-heads) on the same items and print every metric's change with a paired 95%% interval")
    add_setting_flags(ev)
    ev.add_argument("--lm-eval", type=_csv, default=None, metavar="TASKS",
                    help="score with lm-evaluation-harness instead of the suites: its task names (crows_pairs_english, "
                         "bbq, ... where their data can be downloaded) or repair_pairs (this tool's pairs as an lm-eval "
                         "task, local); needs pip install 'fairness-repair[lm-eval]'")
    ev.add_argument("--lm-eval-include", type=Path, default=None, metavar="DIR",
                    help="a folder of your own lm-eval task YAML files (lm-eval's include_path)")
    ev.add_argument("--lm-eval-batch", type=int, default=24, help="sequences per lm-eval batch (default 24)")
    ev.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward batch of the evaluator")
    ev.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ev.set_defaults(func=cmd_evaluate)

    rn = sub.add_parser("run", help="search a repair, verify it on held-out data, export a checkpoint and a report",
                        description="Search a fairness repair, verify it on held-out templates, export the repaired "
                                    "checkpoint to OUT/checkpoint and a Pareto report to OUT/report/index.html. "
                                    "Rerunning the same command resumes from the stored evaluations.")
    add_model_flags(rn)
    rn.add_argument("--method", default="prune",
                    help="prune (attention-head pruning), fairmed (probers and a neutralizer on MLP outputs, layers "
                         "searched), fairsteer (a probe-gated steering vector in the residual stream, layer, "
                         "strength and gate searched), experts (decoding-time expert and anti-expert models trained on "
                         "the search split's text shift the logits, strength and rule searched); a comma list of "
                         "them or 'all' searches each with its share of --budget-evals and ranks them on one front")
    rn.add_argument("--out", type=Path, default=Path("runs/default"), help="run directory (default: runs/default)")
    rn.add_argument("--data-dir", type=Path, default=None,
                    help="folder with bbq/, mmlu/, wikitext2/ (default: $REPAIR_DATA_DIR); only needed for those suites")
    rn.add_argument("--fairness", default="association-neutral",
                    help="fairness objective(s), lower is fairer: association-neutral (default: KL to the neutral-context "
                         "distribution, the stereotype part), association (KL to uniform, which flattening group words "
                         "can game), bbq-margin, bbq-samb, bbq-sdis; weighted sums as 'association-neutral:1,bbq-margin:0.5'")
    rn.add_argument("--utility", default="text", help="utility objective: text or wikitext (perplexity), mmlu (accuracy)")
    rn.add_argument("--budget-evals", type=int, default=None,
                    help="LLM evaluations on the search split in all (sampling + rounds; default 120 for one method, "
                         "200 shared by several)")
    rn.add_argument("--budget-shares", default=None,
                    help="several methods: each one's weight in --budget-evals, e.g. prune=2,fairmed=1 (default "
                         "prune 35%%, fairmed 30%%, fairsteer 25%%, experts 10%%, renormalised over the methods run)")
    rn.add_argument("--stack", action=argparse.BooleanOptionalAction, default=None,
                    help="several methods: also verify the best configurations of each pair of methods applied "
                         "together, ranked with the rest (default: on with several methods)")
    rn.add_argument("--export-all", action="store_true",
                    help="several methods: also export each method's best (and the best stack) to OUT/checkpoints/METHOD")
    rn.add_argument("--rounds", type=int, default=2, help="active-learning rounds: refit surrogates, anneal, evaluate")
    rn.add_argument("--per-round", type=int, default=8, help="masks evaluated for real in each round")
    rn.add_argument("--max-utility-loss", type=float, default=0.05,
                    help="allowed utility loss: perplexity at most x(1+L), accuracy at least x(1-L) of the unrepaired model")
    rn.add_argument("--max-kl-uniform-rise", type=float, default=0.02,
                    help="guard: a repair is chosen only if the upper end of kl_uniform's paired 95%% interval (relative "
                         "change on the select split) is at most this (default 0.02: +2%%)")
    rn.add_argument("--max-q-drift", type=float, default=None,
                    help="guard: a repair is chosen only if the neutral reference moves at most this far, KL(q_repaired || "
                         "q_base) in nats (default: the unrepaired model's own spread over its neutral concepts)")
    rn.add_argument("--knockouts", action="store_true", help="also evaluate every single-head knockout")
    rn.add_argument("--baselines", type=_csv, default=(), help="random,knockout: baselines with the same LLM-evaluation budget, verified and reported alike (off by default; prune takes both, fairsteer random)")
    rn.add_argument("--search-limit", type=int, default=24, help="prompts per attribute (items per category) in the search split")
    rn.add_argument("--search-ppl-tokens", type=int, default=512, help="tokens scored for perplexity during the search")
    rn.add_argument("--report-limit", type=int, default=None, help="items per attribute/category on the held-out select and report splits (default: all)")
    rn.add_argument("--report-ppl-tokens", type=int, default=2048, help="tokens scored for perplexity on the select and report splits")
    rn.add_argument("--panel-bbq-limit", type=int, default=60,
                    help="BBQ items per category on the report split's transfer panel, when --data-dir holds bbq/ (never "
                         "fitted on or chosen by)")
    rn.add_argument("--verify-top", type=int, default=None,
                    help="finalists per method verified on the held-out select split (default 6 for one method, whose "
                         "built-in comparisons, e.g. fairmed's top-k rule, get half as many; 2 each for several)")
    rn.add_argument("--bbq-mode", choices=["cloze", "choice"], default="cloze", help="BBQ scoring mode for bbq objectives")
    rn.add_argument("--batch-masks", type=int, default=8, help="masks evaluated together in one batched forward")
    rn.add_argument("--storage", default=None, help="Optuna RDB URL for the records (default: sqlite file in --out)")
    rn.add_argument("--study", default=None, help="study name in the storage (default: derived from --out)")
    rn.add_argument("--workers-only", action="store_true",
                    help="evaluate nothing here: wait for `repair worker` processes to evaluate the configurations")
    rn.add_argument("--heartbeat", type=int, default=10,
                    help="seconds between heartbeats of an evaluation; one silent for 3 beats is redone elsewhere")
    rn.add_argument("--seed", type=int, default=0, help="seeds sampling, surrogates, annealing and bootstrap intervals")
    for name in METHODS:  # each method's own flags, from its registered Options (no method module is imported)
        options = METHODS.options(name)
        if fields(options):
            add_flags(rn.add_argument_group(f"--method {name}"), options)
    rn.set_defaults(func=cmd_run)

    wk = sub.add_parser("worker", help="evaluate configurations for a run whose records are in a shared storage",
                        description="Join the study of a `repair run --storage URL --study NAME` from any machine: load "
                                    "the run's model and suites, evaluate the configurations it waits for, store the "
                                    "records, and leave when the run is finished.")
    wk.add_argument("--storage", required=True, help="the run's Optuna RDB URL, e.g. postgresql://user@host/db")
    wk.add_argument("--study", required=True, help="the run's study name (printed by `repair run`, in RUN_DIR/config.json)")
    wk.add_argument("--model", default=None, help="this machine's copy of the run's model, if its path differs")
    wk.add_argument("--data-dir", type=Path, default=None, help="this machine's copy of the run's data, if its path differs")
    wk.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    wk.add_argument("--device-map", default=None, help="'auto' shards a model larger than one GPU (accelerate)")
    wk.add_argument("--batch-masks", type=int, default=8, help="configurations evaluated together in one batched forward")
    wk.add_argument("--poll", type=float, default=1.0, help="seconds between looks for new work")
    wk.add_argument("--max-idle", type=float, default=600.0, help="leave after this many seconds without work")
    wk.set_defaults(func=cmd_worker)

    gn = sub.add_parser("generate", help="print a generation from a checkpoint `repair run` exported, repaired",
                        description="Load RUN_DIR/checkpoint with its repair attached (repair.load) and print a greedy "
                                    "continuation of --prompt.")
    gn.add_argument("--model", required=True, type=Path, help="a checkpoint folder exported by `repair run`")
    gn.add_argument("--prompt", required=True, help="the text to continue")
    gn.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate (default 40)")
    gn.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    add_setting_flags(gn)
    gn.set_defaults(func=cmd_generate)

    cp = sub.add_parser("compare", help="generations of the unrepaired and the repaired model side by side",
                        description="Generate from --model (the unrepaired model) and --repaired (a checkpoint `repair "
                                    "run` exported, loaded with its repair) for prompts that invite stereotypes, greedy and "
                                    "seeded sampling, and show them side by side here and in an HTML page beside the "
                                    "run's report (RUN_DIR/compare.html, linked from the report).")
    add_model_flags(cp)
    cp.add_argument("--repaired", required=True, type=Path, help="a checkpoint folder exported by `repair run`")
    cp.add_argument("--prompts", type=Path, default=None, help="a UTF-8 file with more prompts, one per line")
    cp.add_argument("--max-new-tokens", type=int, default=40, help="tokens to generate per prompt (default 40)")
    cp.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i uses seed + i, for both models)")
    cp.add_argument("--html", type=Path, default=None,
                    help="where to write the page (default: RUN_DIR/compare.html for RUN_DIR/checkpoint, else ./compare.html)")
    cp.set_defaults(func=cmd_compare)

    add_probe_parser(sub)

    rp = sub.add_parser("report", help="rebuild RUN_DIR/report from the run's records")
    rp.add_argument("run_dir", type=Path)
    rp.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print("repair: error: " + " ".join(str(exc).splitlines()), file=sys.stderr)  # always one line
        return 2
    except BrokenPipeError:  # stdout was closed early (`repair evaluate | head`): stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return 141
    except OSError as exc:  # a write that failed outside repair.io (disk full, read-only folder, ...)
        from repair.errors import os_error_message

        print(f"repair: error: {os_error_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("repair: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not type(exc).__module__.startswith("sqlalchemy"):
            raise
        from repair.errors import one_line  # the study's database failed mid-run (disk full, connection lost)

        print(f"repair: error: the study storage failed: {one_line(exc)[:300]} (free disk space or check the "
              "database, then rerun the same command to resume)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
