"""The `repair` command line. Every flag maps one to one onto a frozen configuration dataclass."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from repair.errors import UserError
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
    g.add_argument("--split", choices=["search", "report", "all"], default="all",
                   help="templates searched on, held-out templates for the report, or both")
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
    from repair.evaluate import build_suites, evaluate, format_table
    from repair.io import write_json_atomic
    from repair.models import load_model

    names = list(args.suite)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise UserError(f"unknown suite {unknown[0]!r} (choose from {', '.join(REGISTRY)})")
    config = eval_config(args)
    if args.json is not None and not args.json.parent.is_dir():
        raise UserError(f"cannot write {args.json}: folder {args.json.parent} does not exist")
    build_suites(names, config, tokenizer=None)  # validate the data before spending time on the model
    loaded = load_model(model_spec(args))
    report = evaluate(loaded, names, config, batch_tokens=args.batch_tokens, progress=not args.no_progress)
    print(format_table(report))
    if args.json is not None:
        write_json_atomic(args.json, report)
        print(f"\nwrote {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="repair", description="Measure and repair social bias in causal language models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ev = sub.add_parser("evaluate", help="measure bias and utility of a model on the suites",
                        description="Score a model on fairness and utility suites; print a table and write per-item JSON.")
    add_model_flags(ev)
    ev.add_argument("--suite", type=_csv, default=("association", "text"),
                    help=f"comma-separated suites from {', '.join(REGISTRY)} (default: association,text, which ship with the tool)")
    add_suite_flags(ev)
    ev.add_argument("--json", type=Path, default=None, help="write metrics, data hashes and per-item records here")
    ev.add_argument("--batch-tokens", type=int, default=4096, help="tokens per forward batch of the evaluator")
    ev.add_argument("--no-progress", action="store_true", help="hide progress bars")
    ev.set_defaults(func=cmd_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"repair: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("repair: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
