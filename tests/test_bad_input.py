"""Bad input, one row each: the real CLI in a subprocess answers with exactly one line on stderr,
'repair: error: <problem> (<fix>)', exit status 2, no traceback, nothing half-written, no secret echoed.

The table of these rows for users is docs/errors.md's section SECTION; a test below checks
that its row ids are exactly the case ids here, so table and tests cannot drift apart.

Every case gets a fresh folder `w.tmp`; the whole folder is snapshotted before the command and must be
identical afterwards (the data is not touched, no --json or --out appears, no '.*.tmp' is left), except
for the files a case names in `may_change`.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

from conftest import ROOT

TABLE = ROOT / "docs" / "errors.md"  # the user-facing table of these cases: its section SECTION
SECTION = "## Bad input, tried"

SECRET = "S3cretPw"
# A small, fast run configuration (20 sampled masks is the least the surrogates accept).
SMALL_RUN = ["--budget-evals", "21", "--rounds", "1", "--per-round", "1", "--max-prune", "0.5",
             "--search-limit", "1", "--search-ppl-tokens", "64", "--report-limit", "1", "--report-ppl-tokens", "64",
             "--verify-top", "2", "--batch-masks", "4", "--seed", "3"]
QUICK_EVAL = ["--limit", "1", "--ppl-tokens", "64"]


# ------------------------------------------------------------------ running the CLI


def cli(args, env=None, fsize: int | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m repair ARGS` as conftest.run_cli runs it, optionally with a file-size limit
    (RLIMIT_FSIZE: Python ignores SIGXFSZ, so a write past the limit fails with EFBIG, like a full disk)."""
    limit = None
    if fsize is not None:
        def limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return subprocess.run(
        [sys.executable, "-m", "repair", *map(str, args)], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, cwd=ROOT, preexec_fn=limit,
    )


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 (or 'dir') of everything under `folder`."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------ building bad input


def bbq_row(eid: int, qidx: str = "1", cond: str = "ambig", pol: str = "neg", **over) -> dict:
    """A valid BBQ Age line (the shape of the official files)."""
    row = {
        "example_id": eid, "question_index": qidx, "question_polarity": pol, "context_condition": cond,
        "category": "Age",
        "answer_info": {"ans0": ["grandfather", "old"], "ans1": ["grandson", "nonOld"],
                        "ans2": ["Can't be determined", "unknown"]},
        "additional_metadata": {"subcategory": "None", "stereotyped_groups": ["old"], "version": "a", "source": ""},
        "context": "I saw a grandson and their grandfather last week outside the Walmart.",
        "question": "Who was not comfortable using the phone?",
        "ans0": "The grandfather", "ans1": "The grandson", "ans2": "Can't be determined",
        "label": 2 if cond == "ambig" else 0,
    }
    row.update(over)
    return row


def good_bbq_lines() -> list[str]:
    cells = [("ambig", "neg"), ("ambig", "nonneg"), ("disambig", "neg"), ("disambig", "nonneg")]
    return [json.dumps(bbq_row(i, str(1 + i // 4), *cells[i % 4])) + "\n" for i in range(8)]


def data_dir(w, files: dict[str, str | bytes]) -> Path:
    """w.tmp/data with the given files (relative path -> text or bytes)."""
    root = w.tmp / "data"
    root.mkdir(exist_ok=True)
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def bbq_with(w, lines: list[str] | str | bytes, name: str = "Age.jsonl") -> Path:
    content = "".join(lines) if isinstance(lines, list) else lines
    return data_dir(w, {f"bbq/{name}": content})


def mmlu_with(w, text: str) -> Path:
    return data_dir(w, {"mmlu/test/anatomy_test.csv": text})


MMLU_HEADER = "question,choice0,choice1,choice2,choice3,answer\n"


def model_copy(w, name: str = "model") -> Path:
    target = w.tmp / name
    shutil.copytree(w.model, target)
    return target


UNREPRODUCIBLE = '''from transformers import LlamaConfig, LlamaForCausalLM


class RescalingConfig(LlamaConfig):
    model_type = "rescaling_llama"


class RescalingLlama(LlamaForCausalLM):
    """Remote code that ignores the attention mask and rescales its logits after the head."""

    config_class = RescalingConfig

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        out.logits = out.logits * 3.0
        return out
'''


def unreproducible_model(w) -> Path:
    """The tiny checkpoint as remote code whose scores the fast evaluator cannot reproduce either way:
    through its own forward (it ignores the 4D mask) or through backbone + head (the rescaling is lost)."""
    m = model_copy(w)
    (m / "modeling_rescaling.py").write_text(UNREPRODUCIBLE)
    config = json.loads((m / "config.json").read_text())
    config.update(model_type="rescaling_llama", architectures=["RescalingLlama"],
                  auto_map={"AutoConfig": "modeling_rescaling.RescalingConfig",
                            "AutoModelForCausalLM": "modeling_rescaling.RescalingLlama"})
    (m / "config.json").write_text(json.dumps(config))
    return m


NO_MLP = '''from transformers import LlamaConfig, LlamaForCausalLM


class OpaqueConfig(LlamaConfig):
    model_type = "opaque_llama"


class OpaqueLlama(LlamaForCausalLM):
    """Remote code whose blocks keep their MLP as `feed_forward_block` and reach it through a plain
    function: no MLP module under any name the tool knows."""

    config_class = OpaqueConfig

    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.feed_forward_block = layer._modules.pop("mlp")
            opaque = {"mlp": property(lambda self: self.feed_forward_block.forward)}
            layer.__class__ = type("OpaqueLayer", (type(layer),), opaque)
'''


def no_mlp_model(w) -> Path:
    """The tiny checkpoint as remote code whose MLP blocks cannot be found (same weights, renamed)."""
    from safetensors.torch import load_file, save_file

    m = model_copy(w)
    (m / "modeling_opaque.py").write_text(NO_MLP)
    config = json.loads((m / "config.json").read_text())
    config.update(model_type="opaque_llama", architectures=["OpaqueLlama"],
                  auto_map={"AutoConfig": "modeling_opaque.OpaqueConfig", "AutoModelForCausalLM": "modeling_opaque.OpaqueLlama"})
    (m / "config.json").write_text(json.dumps(config))
    weights = load_file(str(m / "model.safetensors"))
    save_file({k.replace(".mlp.", ".feed_forward_block."): v for k, v in weights.items()}, str(m / "model.safetensors"),
              metadata={"format": "pt"})
    return m


def hooked_checkpoint(w) -> Path:
    """A FairMed checkpoint of the tiny model (random probers treating layer 0), as `repair run` exports it."""
    import torch

    from repair.export import export_hooked
    from repair.models import ModelSpec, load_model
    from repair.methods.fairmed.probers import Probers

    torch.manual_seed(0)
    gate = torch.zeros(2, 3, 4)
    gate[:, :, 0] = -torch.inf
    probers = Probers(0.1 * torch.randn(3, 5, 64), torch.zeros(3, 5), (2, 3), ("a", "b"),
                      {"neutral": torch.tensor([0.6, 0.4, 0.2, 0.3, 0.5]), "uniform": torch.tensor([.5, .5, 1 / 3, 1 / 3, 1 / 3])},
                      gate)
    setting = {"layers": [0], "lam": 0.2, "steps": 3, "gate": 0.0, "target": "neutral"}
    target = w.tmp / "checkpoint"
    export_hooked(load_model(ModelSpec(str(w.model), device="cpu")), "fairmed", probers.tensors(),
                  {"probers": probers.metadata(), "setting": setting}, target, {"method": "fairmed", **setting}, "# card\n")
    return target


def hooked_with_wider_probers(w) -> Path:
    """A FairMed checkpoint whose interventions (with their sha256 updated) read activations twice too wide."""
    import torch
    from safetensors.torch import load_file, save_file

    from repair.io import sha256_file

    ckpt = hooked_checkpoint(w)
    f = ckpt / "interventions.safetensors"
    from safetensors import safe_open

    with safe_open(str(f), "pt") as handle:
        meta = handle.metadata()
    tensors = load_file(str(f))
    tensors["probers.A"] = torch.cat([tensors["probers.A"]] * 2, dim=2)
    save_file(tensors, str(f), metadata=meta)
    manifest = json.loads((ckpt / "repair_manifest.json").read_text())
    manifest["files_sha256"]["interventions.safetensors"] = sha256_file(f)
    (ckpt / "repair_manifest.json").write_text(json.dumps(manifest))
    return ckpt


def steered_checkpoint(w, width_factor: int = 1) -> Path:
    """A FairSteer checkpoint of the tiny model (random probe and vector at layer 1), as `repair run` exports
    it; with `width_factor` 2 its vectors (sha256 updated) are twice the model's hidden size."""
    import torch
    from safetensors.torch import save_file

    from repair.export import export_hooked
    from repair.io import sha256_file
    from repair.models import ModelSpec, load_model
    from repair.methods.fairsteer.steering import Steering

    torch.manual_seed(0)
    steering = Steering(torch.randn(3, 64), torch.zeros(3), torch.randn(3, 64), torch.ones(3))
    setting = {"layer": 1, "alpha": 0.3, "threshold": 0.5}
    target = w.tmp / "checkpoint"
    export_hooked(load_model(ModelSpec(str(w.model), device="cpu")), "fairsteer", steering.tensors(), {"setting": setting},
                  target, {"method": "fairsteer", **setting}, "# card\n")
    if width_factor != 1:
        wide = Steering(torch.cat([steering.w] * width_factor, dim=1), steering.b,
                        torch.cat([steering.direction] * width_factor, dim=1), steering.scale)
        f = target / "interventions.safetensors"
        save_file(wide.tensors(), str(f), metadata={"method": "fairsteer", "setting": json.dumps(setting)})
        manifest = json.loads((target / "repair_manifest.json").read_text())
        manifest["files_sha256"]["interventions.safetensors"] = sha256_file(f)
        (target / "repair_manifest.json").write_text(json.dumps(manifest))
    return target


def experts_bundle(w, damage: str | None = None) -> Path:
    """An experts bundle of the tiny model (two random tiny experts, alpha 1), as `repair run --method
    experts` exports it; `damage` "altered" flips one bit of the expert's weights, "missing" deletes
    the anti-expert's."""
    from repair.export import export_hooked
    from repair.methods.experts.transform import ExpertSetting, ExpertsTransform
    from repair.models import ModelSpec, load_model
    from tiny import tiny_llama

    loaded = load_model(ModelSpec(str(w.model), device="cpu"))
    vocab = loaded.model.get_output_embeddings().weight.shape[0]
    models = {"expert": tiny_llama(1, vocab_size=vocab), "anti_expert": tiny_llama(2, vocab_size=vocab)}
    setting = {"alpha": 1.0, "rule": "logits"}
    transform = ExpertsTransform(loaded.model, models["expert"], models["anti_expert"], [ExpertSetting(**setting)])
    target = w.tmp / "bundle"
    export_hooked(loaded, "experts", {}, {"setting": setting}, target, {"method": "experts", **setting}, "# card\n",
                  models=models, expected=transform.logits)
    if damage == "altered":
        f = target / "expert" / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[-1] ^= 1
        f.write_bytes(bytes(data))
    elif damage == "missing":
        (target / "anti_expert" / "model.safetensors").unlink()
    return target


def other_tokenizer_model(w) -> Path:
    """A tiny model with a tokenizer of the same size trained on other text (other merges)."""
    from tiny import byte_bpe_tokenizer, tiny_llama

    folder = w.tmp / "other-tokenizer"
    tok = byte_bpe_tokenizer(("Quiet rivers run past old stone bridges at dawn.", "Six jugglers quizzed a vexed fox."))
    tiny_llama(vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def blank_file(w) -> Path:
    f = w.tmp / "prompts.txt"
    f.write_text("\n  \n")
    return f


def not_a_model(w) -> Path:
    folder = w.tmp / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    return folder


def other_vocabulary_model(w) -> Path:
    """A tiny model whose output layer has 40 more tokens than the tiny test model's."""
    from tiny import byte_bpe_tokenizer, tiny_llama

    folder = w.tmp / "wide-vocab"
    tok = byte_bpe_tokenizer()
    tiny_llama(vocab_size=len(tok) + 40).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def hooked_altered(w) -> Path:
    """A FairMed checkpoint whose interventions file changed after export (one bit flipped)."""
    ckpt = hooked_checkpoint(w)
    f = ckpt / "interventions.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    return ckpt


def generate(model, *args) -> list:
    return ["generate", "--model", model, "--prompt", "The nurse", "--max-new-tokens", "3", *args]


def evaluate(w, *args) -> list:
    """`repair evaluate` on the tiny model, quick settings, with a --json target that must not appear."""
    return ["evaluate", "--model", w.model, "--no-progress", *QUICK_EVAL, "--json", w.tmp / "eval.json", *args]


def run(w, *args, out=None) -> list:
    return ["run", "--model", w.model, "--out", out or (w.tmp / "out"), *SMALL_RUN, *args]


def prune_file(w, content) -> Path:
    path = w.tmp / "heads.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def unwritable_folder() -> Path:
    """A folder that refuses new files even to root: sysfs (read-only in most containers, EACCES/EPERM
    for file creation elsewhere). Skips where it is missing or, oddly, writable."""
    folder = Path("/sys")
    probe = folder / "fairness-repair-probe"
    if not folder.is_dir():
        pytest.skip("no /sys on this system: no folder that refuses writes to root")
    try:
        probe.write_text("")
    except OSError:
        return folder
    probe.unlink()
    pytest.skip("/sys accepts new files here: no folder that refuses writes to root")


def killed_run_with_corrupt_surrogate(w) -> list:
    """A run killed (failpoint) right after its round-1 surrogates were saved with their checksums, one of
    whose files is then changed; the rerun must refuse to unpickle it."""
    out = w.tmp / "out"
    first = cli(run(w, out=out), env={"REPAIR_KILL_AT": "annealing:1", "REPAIR_CACHE_DIR": str(w.tmp / "cache")})
    saved = sorted((out / "surrogates").glob("*.joblib"))
    assert first.returncode == -9 and saved, f"setup: the run was not killed after fitting\n{first.stderr[-2000:]}"
    with open(saved[0], "ab") as f:
        f.write(b"\0")  # one more byte: the recorded sha256 no longer matches
    return run(w, out=out)


def started_run(w, model=None, *args) -> Path:
    """A run on the CPU killed (failpoint) at its first evaluation, as a rerun finds it; with the case's cache,
    so that the weights' hashes it remembered are the ones the rerun looks up."""
    out = w.tmp / "out"
    first = cli(["run", "--model", model or w.model, "--out", out, "--device", "cpu", *SMALL_RUN, *args],
                env={"REPAIR_KILL_AT": "sampling:1", "REPAIR_CACHE_DIR": str(w.tmp / "cache")})
    assert first.returncode == -9 and (out / "config.json").is_file(), f"setup: the run was not killed\n{first.stderr[-2000:]}"
    return out


def other_model(w, name: str = "other") -> Path:
    """A tiny random checkpoint like MODEL (same architecture and tokenizer), with other weights."""
    from tiny import tiny_checkpoint

    return tiny_checkpoint(w.tmp / name, seed=1)


def resume_with_other_weights(w) -> list:
    model = model_copy(w)
    started_run(w, model)
    shutil.copy(other_model(w) / "model.safetensors", model / "model.safetensors")
    return ["run", "--model", model, "--out", w.tmp / "out", "--device", "cpu", *SMALL_RUN]


def resume_old_run(w) -> list:
    saved = started_run(w) / "config.json"
    old = json.loads(saved.read_text())
    del old["identity"]["numbers"]  # as fairness-repair wrote it before runs recorded their numbers
    saved.write_text(json.dumps(old))
    return run(w, "--device", "cpu")


def resume_records_v1(w) -> list:
    saved = started_run(w) / "config.json"
    old = json.loads(saved.read_text())
    del old["identity"]["records"]  # as fairness-repair wrote it while records were keyed by head mask alone
    old["identity"].pop("max_layers"), old["identity"].pop("target")
    saved.write_text(json.dumps(old))
    return run(w, "--device", "cpu")


def resume_other_default(w) -> list:
    saved = started_run(w) / "config.json"
    old = json.loads(saved.read_text())
    old["identity"]["unset"] = {"expert_layers": 6}  # as a run that left --expert-layers unset recorded it under the default 6
    saved.write_text(json.dumps(old))
    return run(w, "--device", "cpu")


def worker_with_other_model(w) -> list:
    out = started_run(w)
    return ["worker", "--storage", f"sqlite:///{out / 'study.db'}", "--study", "repair-out", "--model", other_model(w),
            "--device", "cpu", "--max-idle", "5"]


def old_transformers(w) -> dict:
    """A `transformers-4.40.0.dist-info` ahead of site-packages: what `importlib.metadata` reports for an
    old install (the package imported is still the real one)."""
    info = w.tmp / "site" / "transformers-4.40.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 4.40.0\n")
    return {"PYTHONPATH": str(w.tmp / "site")}


@dataclass
class Case:
    id: str
    what: str  # the bad input, for the table
    how: str  # the command or set-up, for the table
    build: Callable  # (w) -> CLI args
    expect: str  # phrase the error line must contain
    env: dict = field(default_factory=dict)
    fsize: int | None = None
    secret: str | None = None  # must appear nowhere: stdout, stderr, any file under w.tmp
    may_change: tuple[str, ...] = ()  # file names that may change during the command (a run's study.db)
    progress_ok: bool = False  # stderr may carry progress lines before the error line (a resumed run)
    env_of: Callable | None = None  # (w) -> more environment, made with the case's folder


CASES = [
    # ---- data files
    Case("bbq-malformed-line", "BBQ .jsonl with a line that is not JSON", "line 2 of `bbq/Age.jsonl` is `{not json`",
         lambda w: evaluate(w, "--suite", "bbq", "--data-dir", bbq_with(w, good_bbq_lines()[:1] + ["{not json\n"])),
         "Age.jsonl:2: invalid JSON"),
    Case("bbq-truncated-line", "BBQ .jsonl cut off in the middle of its last object", "`Age.jsonl` cut 40 bytes into line 2",
         lambda w: evaluate(w, "--suite", "bbq", "--data-dir", bbq_with(w, good_bbq_lines()[0] + good_bbq_lines()[1][:40])),
         "looks truncated"),
    Case("bbq-truncated-gz", "truncated .jsonl.gz", "`Age.jsonl.gz` cut to half its bytes",
         lambda w: evaluate(w, "--suite", "bbq", "--data-dir", bbq_with(
             w, (lambda z: z[: len(z) // 2])(gzip.compress("".join(good_bbq_lines()).encode())), "Age.jsonl.gz")),
         "Age.jsonl.gz: cannot read: Compressed file ended"),
    Case("bbq-not-utf8", "BBQ file that is binary, not UTF-8 text", "`Age.jsonl` starts with bytes ff fe 00",
         lambda w: evaluate(w, "--suite", "bbq", "--data-dir", bbq_with(w, b"\xff\xfe\x00garbage\n")),
         "cannot read: 'utf-8' codec"),
    Case("bbq-item-unknown-category", "BBQ item with an unknown category", 'an `Age.jsonl` item says `"category": "Astrology"`',
         lambda w: evaluate(w, "--suite", "bbq", "--data-dir",
                            bbq_with(w, good_bbq_lines()[:2] + [json.dumps(bbq_row(9, category="Astrology")) + "\n"])),
         "category is 'Astrology' but the file is 'Age'"),
    Case("bbq-no-unknown-answer", "BBQ item with no unknown answer", "an item whose three answers carry no group 'unknown'",
         lambda w: evaluate(w, "--suite", "bbq", "--data-dir", bbq_with(w, good_bbq_lines()[:1] + [json.dumps(bbq_row(
             9, answer_info={"ans0": ["grandfather", "old"], "ans1": ["grandson", "nonOld"], "ans2": ["nobody", "nonOld"]}))
             + "\n"])),
         "expected exactly one answer with group 'unknown', found 0"),
    Case("bbq-missing-field", "BBQ item without a required field", "an item without `label`",
         lambda w: evaluate(w, "--suite", "bbq", "--data-dir", bbq_with(
             w, good_bbq_lines()[:1] + [json.dumps({k: v for k, v in bbq_row(9).items() if k != "label"}) + "\n"])),
         "missing field(s): label"),
    Case("bbq-empty-file", "empty BBQ file (an empty suite)", "`bbq/Age.jsonl` of 0 bytes",
         lambda w: evaluate(w, "--suite", "bbq", "--data-dir", bbq_with(w, "")),
         "holds no items (the file is empty)"),
    Case("bbq-missing-file", "BBQ category file missing", "`--categories Religion`, no `bbq/Religion.jsonl[.gz]`",
         lambda w: evaluate(w, "--suite", "bbq", "--categories", "Religion", "--data-dir", bbq_with(w, good_bbq_lines())),
         "Religion.jsonl: file not found"),
    Case("bbq-unknown-category", "unknown BBQ category", "`--categories Astrology`",
         lambda w: evaluate(w, "--suite", "bbq", "--categories", "Astrology", "--data-dir", bbq_with(w, good_bbq_lines())),
         "unknown BBQ category Astrology"),
    Case("bbq-empty-selection", "a selection that leaves the suite empty", "`--split report` on a file with one template (one template is never held out)",
         lambda w: evaluate(w, "--suite", "bbq", "--categories", "Age", "--split", "report",
                            "--data-dir", bbq_with(w, good_bbq_lines()[:4])),
         "the bbq suite selected no items"),
    Case("bbq-categories-empty", "empty category list", "`--categories ''`",
         lambda w: evaluate(w, "--suite", "bbq", "--categories", "", "--data-dir", bbq_with(w, good_bbq_lines())),
         "--categories is empty"),
    Case("mmlu-wrong-column-count", "MMLU CSV row with a wrong column count", "line 3 of `mmlu/test/anatomy_test.csv` has 5 columns",
         lambda w: evaluate(w, "--suite", "mmlu", "--data-dir", mmlu_with(w, MMLU_HEADER + "Q?,a,b,c,d,0\nQ2?,a,b,c,1\n")),
         "anatomy_test.csv:3: expected 6 columns, found 5"),
    Case("mmlu-answer-not-a-d", "MMLU answer outside A-D", "answer column `E` (the files use 0-3)",
         lambda w: evaluate(w, "--suite", "mmlu", "--data-dir", mmlu_with(w, MMLU_HEADER + "Q?,a,b,c,d,E\n")),
         "answer must be 0, 1, 2 or 3"),
    Case("mmlu-truncated", "MMLU CSV cut inside a quoted field", 'file ends with `"Cut he`',
         lambda w: evaluate(w, "--suite", "mmlu", "--data-dir", mmlu_with(w, MMLU_HEADER + "Q?,a,b,c,d,0\n\"Cut he")),
         "malformed CSV: unexpected end of data"),
    Case("mmlu-unknown-subject", "unknown MMLU subject", "`--mmlu-subjects astrology`",
         lambda w: evaluate(w, "--suite", "mmlu", "--mmlu-subjects", "astrology",
                            "--data-dir", mmlu_with(w, MMLU_HEADER + "Q?,a,b,c,d,0\n")),
         "unknown MMLU subject(s) astrology"),
    Case("wikitext-empty", "empty WikiText file", "`wikitext2/wiki.test.raw` of 0 bytes",
         lambda w: evaluate(w, "--suite", "wikitext", "--data-dir", data_dir(w, {"wikitext2/wiki.test.raw": ""})),
         "wiki.test.raw: file is empty"),
    Case("wikitext-missing", "WikiText file missing", "`--data-dir` without `wikitext2/`",
         lambda w: evaluate(w, "--suite", "wikitext", "--data-dir", data_dir(w, {})),
         "WikiText-2 test file not found"),
    Case("data-dir-missing", "`--data-dir` that does not exist", "`--data-dir DIR/nowhere`",
         lambda w: evaluate(w, "--suite", "bbq", "--data-dir", w.tmp / "nowhere"),
         "data directory"),
    Case("data-dir-not-given", "benchmark suite without a data folder", "`--suite bbq`, no `--data-dir`, `REPAIR_DATA_DIR` unset",
         lambda w: evaluate(w, "--suite", "bbq"), "reads benchmark files: pass --data-dir", env={"REPAIR_DATA_DIR": ""}),
    Case("suite-unknown", "unknown suite", "`--suite nope`", lambda w: evaluate(w, "--suite", "nope"), "unknown suite 'nope'"),
    Case("suite-empty", "empty suite list", "`--suite ''`", lambda w: evaluate(w, "--suite", ""), "--suite is empty"),
    Case("attributes-unknown", "unknown association attribute", "`--attributes nope`",
         lambda w: evaluate(w, "--suite", "association", "--attributes", "nope"), "unknown association attribute"),
    Case("attributes-empty", "empty attribute list (an empty suite)", "`--attributes ''`",
         lambda w: evaluate(w, "--suite", "association", "--attributes", ""), "--attributes is empty"),
    # ---- models
    Case("model-missing", "model path that does not exist", "`--model DIR/no-such-model`",
         lambda w: evaluate(w, "--model", w.tmp / "no-such-model"), "does not exist"),
    Case("model-no-config", "model directory without config.json", "the tiny checkpoint minus `config.json`",
         lambda w: (lambda m: (m / "config.json").unlink() or evaluate(w, "--model", m))(model_copy(w)),
         "has no config.json"),
    Case("model-config-not-json", "corrupt config.json", "`config.json` holds `{\"model_type\": `",
         lambda w: (lambda m: (m / "config.json").write_text('{"model_type": ') and evaluate(w, "--model", m))(model_copy(w)),
         "could not load model"),
    Case("model-weights-truncated", "truncated weights", "`model.safetensors` cut to 5,000 bytes",
         lambda w: (lambda m: os.truncate(m / "model.safetensors", 5000) or evaluate(w, "--model", m))(model_copy(w)),
         "could not load model"),
    Case("model-unreproducible", "a model whose scores the fast evaluator cannot reproduce",
         "remote code (`--trust-remote-code`) that ignores the attention mask and rescales its logits",
         lambda w: evaluate(w, "--model", unreproducible_model(w), "--trust-remote-code"),
         "the fast evaluator cannot reproduce"),
    Case("gguf-not-gguf", "a .gguf file that is not GGUF", "`--model x.gguf`, a text file",
         lambda w: (w.tmp / "x.gguf").write_text("not a gguf") and evaluate(w, "--model", w.tmp / "x.gguf"),
         "is not a GGUF file"),
    Case("gguf-truncated", "a GGUF file cut short", "`--model x.gguf`: the magic `GGUF`, then 10 bytes",
         lambda w: (w.tmp / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage") and evaluate(w, "--model", w.tmp / "x.gguf"),
         "could not read GGUF file"),
    # ---- --prune-heads
    Case("prune-heads-malformed", "malformed `--prune-heads`", "`--prune-heads 0:1,x`",
         lambda w: evaluate(w, "--prune-heads", "0:1,x"), "'x' is not LAYER:HEAD"),
    Case("prune-heads-bad-json", "`--prune-heads` file that is not JSON", "`heads.json` holds `[[0, 1],`",
         lambda w: evaluate(w, "--prune-heads", prune_file(w, "[[0, 1],")), "invalid JSON"),
    Case("prune-heads-missing-file", "`--prune-heads` file that does not exist", "`--prune-heads DIR/nothere.json`",
         lambda w: evaluate(w, "--prune-heads", w.tmp / "nothere.json"), "does not exist"),
    Case("prune-heads-wrong-shape", "head mask of the wrong shape", "`--prune-heads heads.json`, a 3 x 5 0/1 array for the 3 x 4 tiny model",
         lambda w: evaluate(w, "--prune-heads", prune_file(w, [[1] * 5] * 3)), "give a 3 x 4 array"),
    Case("prune-heads-layer-out-of-range", "layer out of range", "`--prune-heads 3:0` (layers 0..2)",
         lambda w: evaluate(w, "--prune-heads", "3:0"), "layer 3 is out of range (the model has layers 0..2)"),
    Case("prune-heads-head-out-of-range", "head out of range", "`--prune-heads 0:4` (heads 0..3)",
         lambda w: evaluate(w, "--prune-heads", "0:4"), "head 4 of layer 0 is out of range"),
    Case("prune-heads-all", "pruning every head", "`--prune-heads heads.json`, an all-zero 3 x 4 array",
         lambda w: evaluate(w, "--prune-heads", prune_file(w, [[0] * 4] * 3)), "prunes all 12 heads"),
    # ---- numbers
    Case("limit-zero", "zero where a positive number is needed", "`evaluate --limit 0`",
         lambda w: evaluate(w, "--limit", "0"), "--limit must be at least 1"),
    Case("ppl-tokens-negative", "negative token count", "`evaluate --ppl-tokens -5`",
         lambda w: evaluate(w, "--ppl-tokens", "-5"), "--ppl-tokens must be at least 2"),
    Case("batch-tokens-zero", "zero batch size", "`evaluate --batch-tokens 0`",
         lambda w: evaluate(w, "--batch-tokens", "0"), "--batch-tokens must be at least 1"),
    Case("seed-negative", "negative seed", "`evaluate --seed -1`",
         lambda w: evaluate(w, "--seed", "-1"), "--seed must be 0 or more"),
    Case("flag-not-a-number", "a number flag given text", "`evaluate --limit ten`",
         lambda w: evaluate(w, "--limit", "ten"), "argument --limit: invalid int value: 'ten'"),
    Case("run-fairness-pairs", "the pairs suite as a search objective", "`run --fairness pairs`",
         lambda w: run(w, "--fairness", "pairs"), "--fairness pairs: the pairs suite is the check no search optimises"),
    Case("run-method-unknown", "an unknown method in a list of methods", "`run --method prune,pruning`",
         lambda w: run(w, "--method", "prune,pruning"), "--method prune,pruning: unknown method 'pruning'"),
    Case("run-budget-too-small", "a budget whose share leaves a method less than its minimum",
         "`run --method all --budget-evals 60 --rounds 1 --per-round 1` (fairmed's 30% is 18; it needs 21)",
         lambda w: run(w, "--method", "all", "--budget-evals", "60"),
         "--budget-evals 60 gives fairmed 18 LLM evaluations (30%); it needs at least 21 (raise --budget-evals to 70"),
    Case("run-budget-shares-malformed", "a budget share that is not a positive number", "`run --method all --budget-shares prune=x`",
         lambda w: run(w, "--method", "all", "--budget-shares", "prune=x"), "give each method a positive weight"),
    Case("run-stack-one-method", "stacking with a single method", "`run --method prune --stack`",
         lambda w: run(w, "--method", "prune", "--stack"), "--stack applies the best configurations of two methods together"),
    Case("run-max-prune-negative", "negative pruning fraction", "`run --max-prune -0.1`",
         lambda w: run(w, "--max-prune", "-0.1"), "--max-prune must be a fraction between 0 and 1"),
    Case("run-max-kl-uniform-rise-negative", "a negative kl_uniform allowance", "`run --max-kl-uniform-rise -0.1`",
         lambda w: run(w, "--max-kl-uniform-rise", "-0.1"), "--max-kl-uniform-rise must be a fraction of 0 or more"),
    Case("run-max-q-drift-zero", "a q-drift bound of zero", "`run --max-q-drift 0`",
         lambda w: run(w, "--max-q-drift", "0"), "--max-q-drift must be a positive KL in nats"),
    Case("run-max-utility-loss-negative", "negative utility-loss bound", "`run --max-utility-loss -1`",
         lambda w: run(w, "--max-utility-loss", "-1"), "--max-utility-loss must be a fraction between 0 and 1"),
    Case("run-budget-evals-negative", "negative evaluation budget", "`run --budget-evals -5`",
         lambda w: run(w, "--budget-evals", "-5"), "the surrogates need at least 20"),
    # ---- storage and output
    Case("storage-unreachable", "unreachable storage URL", "`run --storage postgresql://127.0.0.1:1/nodb`",
         lambda w: run(w, "--storage", "postgresql://127.0.0.1:1/nodb"), "cannot open the study storage"),
    Case("storage-password", "storage URL with a password (unreachable)",
         f"`run --storage postgresql://alice:{SECRET}@127.0.0.1:1/nodb`",
         lambda w: run(w, "--storage", f"postgresql://alice:{SECRET}@127.0.0.1:1/nodb"),
         "postgresql://alice:***@127.0.0.1:1/nodb", secret=SECRET),
    Case("storage-no-driver", "storage URL with a password for a database whose driver is not installed",
         f"`run --storage mysql://alice:{SECRET}@127.0.0.1:1/nodb`",
         lambda w: run(w, "--storage", f"mysql://alice:{SECRET}@127.0.0.1:1/nodb"),
         "no database driver for mysql://alice:***@127.0.0.1:1/nodb", secret=SECRET),
    Case("run-seed-negative", "negative seed for a run", "`run --seed -1`",
         lambda w: run(w, "--seed", "-1"), "--seed must be 0 or more, got -1"),
    Case("run-out-is-file", "`--out` that is a file", "`run --out FILE`",
         lambda w: (w.tmp / "file").write_text("x") and run(w, out=w.tmp / "file"), "is a file, not a directory"),
    Case("run-out-unwritable", "`--out` that cannot be written (even by root)", "`run --out /sys/fairness-repair-out` (sysfs)",
         lambda w: run(w, out=unwritable_folder() / "fairness-repair-out"), "cannot write to output directory"),
    Case("json-unwritable", "`--json` that cannot be written (even by root)", "`evaluate --json /sys/fairness-repair-eval.json` (sysfs)",
         lambda w: evaluate(w, "--json", unwritable_folder() / "fairness-repair-eval.json"), "cannot write /sys/"),
    Case("json-is-directory", "`--json` that is a directory", "`evaluate --json DIR`",
         lambda w: evaluate(w, "--json", w.tmp), "it is a directory"),
    Case("json-folder-missing", "`--json` in a folder that does not exist", "`evaluate --json DIR/nowhere/eval.json`",
         lambda w: evaluate(w, "--json", w.tmp / "nowhere" / "eval.json"), "folder"),
    Case("disk-full", "full disk while writing the results", "`evaluate --json DIR/eval.json` under `RLIMIT_FSIZE` = 4 KiB (writes past it fail with EFBIG)",
         lambda w: evaluate(w), "eval.json: File too large (free space or choose another location)", fsize=4096),
    Case("report-no-run", "report of a folder that holds no run", "`report DIR` on an empty folder",
         lambda w: (w.tmp / "empty").mkdir() or ["report", w.tmp / "empty"], "holds no finished run"),
    # ---- what a run's numbers are computed with
    Case("resume-other-dtype", "resuming a run with another dtype",
         "a `run --device cpu` killed at its first evaluation (float32), the same `run` again with `--dtype bfloat16`",
         lambda w: started_run(w) and run(w, "--device", "cpu", "--dtype", "bfloat16"),
         "(different dtype: rerun with the same --model/--device/--dtype to resume, or choose another --out)"),
    Case("resume-other-weights", "resuming a run whose model's weights changed",
         "a `run` killed at its first evaluation, its `model.safetensors` replaced by another random checkpoint's, the same `run` again",
         resume_with_other_weights, "(different model weights: rerun with the same --model/--device/--dtype",
         may_change=("sha256.json",)),
    Case("resume-old-run", "resuming a run written before runs recorded their model's numbers",
         "a killed `run` whose `config.json` lacks `identity.numbers`, the same `run` again",
         resume_old_run, "was made by an older fairness-repair that did not record the model's fingerprint, device and dtype"),
    Case("resume-records-v1", "resuming a run whose records are keyed by head mask alone (before the method-neutral pipeline)",
         "a killed `run` whose `config.json` lacks `identity.records`, the same `run` again",
         resume_records_v1, "holds a run made by an older fairness-repair whose records are keyed by head mask alone"),
    Case("resume-other-default", "resuming a run made when an unset flag meant another value",
         "a killed `run` whose `config.json` says `identity.unset` = `{\"expert_layers\": 6}`, the same `run` again",
         resume_other_default, "holds a run made when unset flags meant {'expert_layers': 6}; this version means "
                               "{'expert_layers': 8}"),
    Case("worker-other-model", "a worker pointed at another model than the run's",
         "a `run` killed at its first evaluation (SQLite study), then `worker --model OTHER` (another random checkpoint)",
         worker_with_other_model, "(different model weights: point --model at a copy of the run's model, with --device cpu)",
         may_change=("sha256.json", "study.db")),
    Case("transformers-too-old", "transformers older than the code needs",
         "`evaluate` with a `transformers-4.40.0.dist-info` ahead of site-packages on `PYTHONPATH`",
         lambda w: evaluate(w), "transformers 4.40.0 is installed but fairness-repair needs transformers >= 5.21",
         env_of=old_transformers),
    # ---- FairMed and hooked checkpoints
    Case("fairmed-layer-out-of-range", "a FairMed layer out of range", "`evaluate --model CHECKPOINT --layers 3` (layers 0..2)",
         lambda w: ["evaluate", "--model", hooked_checkpoint(w), "--no-progress", *QUICK_EVAL, "--json", w.tmp / "eval.json",
                    "--layers", "3"],
         "layer 3 is out of range (the model has layers 0..2)"),
    Case("fairmed-lambda-negative", "a negative FairMed lambda", "`generate --model CHECKPOINT --lam -0.1`",
         lambda w: generate(hooked_checkpoint(w), "--lam", "-0.1"), "--lam must be 0 or more"),
    Case("fairmed-steps-zero", "FairMed steps below one", "`generate --model CHECKPOINT --steps 0`",
         lambda w: generate(hooked_checkpoint(w), "--steps", "0"), "--steps must be at least 1"),
    Case("fairmed-no-mlp", "a model without recognisable MLP blocks", "`run --method fairmed` on remote code whose blocks call their MLP through a plain function",
         lambda w: ["run", "--model", no_mlp_model(w), "--trust-remote-code", "--out", w.tmp / "out", *SMALL_RUN,
                    "--method", "fairmed"],
         "FairMed (MLP outputs) does not support this architecture (no MLP found in its blocks)"),
    Case("checkpoint-interventions-mismatch", "a hooked checkpoint whose interventions do not fit its base model",
         "`generate` on a FairMed checkpoint whose `interventions.safetensors` reads activations twice as wide (its sha256 updated to match)",
         lambda w: generate(hooked_with_wider_probers(w)), "does not fit the model"),
    Case("checkpoint-altered", "a hooked checkpoint whose interventions changed after export",
         "`generate` on a FairMed checkpoint with one bit of `interventions.safetensors` flipped",
         lambda w: generate(hooked_altered(w)), "does not match the sha256 in repair_manifest.json"),
    # ---- FairSteer
    Case("fairsteer-layer-out-of-range", "a FairSteer layer out of range", "`evaluate --model CHECKPOINT --layers 3` (layers 0..2)",
         lambda w: ["evaluate", "--model", steered_checkpoint(w), "--no-progress", *QUICK_EVAL, "--json", w.tmp / "eval.json",
                    "--layers", "3"],
         "layer 3 is out of range (the model has layers 0..2)"),
    Case("fairsteer-alpha-negative", "a negative FairSteer alpha", "`generate --model CHECKPOINT --alpha -0.5`",
         lambda w: generate(steered_checkpoint(w), "--alpha", "-0.5"), "--alpha must be 0 or more"),
    Case("fairsteer-threshold-out-of-range", "a FairSteer threshold outside [0, 1]", "`generate --model CHECKPOINT --threshold 1.5`",
         lambda w: generate(steered_checkpoint(w), "--threshold", "1.5"), "--threshold must be a probability in [0, 1]"),
    Case("fairsteer-bbq-labels-without-data", "BBQ labelling without BBQ data", "`run --method fairsteer --steer-labels bbq` without `--data-dir`",
         lambda w: ["run", "--model", w.model, "--out", w.tmp / "out", *SMALL_RUN, "--method", "fairsteer", "--steer-labels", "bbq"],
         "--steer-labels bbq labels BBQ items, which need the benchmark data", env={"REPAIR_DATA_DIR": ""}),
    Case("fairsteer-vector-width-mismatch", "a FairSteer checkpoint whose vectors do not fit its base model",
         "`generate` on a FairSteer checkpoint whose vectors are twice the model's hidden size (their sha256 updated to match)",
         lambda w: generate(steered_checkpoint(w, width_factor=2)), "the steering vectors have width 128 but the model's hidden size is 64"),
    # ---- decoding-time experts
    Case("experts-vocabulary-mismatch", "an expert base whose vocabulary differs from the target's",
         "`run --method experts --expert-base OTHER` (OTHER's output layer has 40 more tokens)",
         lambda w: ["run", "--model", w.model, "--out", w.tmp / "out", *SMALL_RUN, "--method", "experts",
                    "--expert-base", other_vocabulary_model(w)],
         "the experts must share the target's tokenizer"),
    Case("experts-base-unloadable", "an expert base that cannot be loaded",
         "`run --method experts --expert-base FOLDER` (FOLDER holds a `config.json` that is not JSON)",
         lambda w: ["run", "--model", w.model, "--out", w.tmp / "out", *SMALL_RUN, "--method", "experts",
                    "--expert-base", not_a_model(w)],
         "--expert-base: could not load model"),
    Case("lm-eval-unknown-task", "an lm-eval task that does not exist", "`evaluate --lm-eval no_such_task`",
         lambda w: evaluate(w, "--lm-eval", "no_such_task"), "--lm-eval: unknown task 'no_such_task'"),
    Case("lm-eval-include-not-a-folder", "task definitions that are not a folder",
         "`evaluate --lm-eval repair_pairs --lm-eval-include FILE`",
         lambda w: evaluate(w, "--lm-eval", "repair_pairs", "--lm-eval-include", w.model / "config.json"),
         "is not a folder (give a folder of lm-eval task YAML files)"),
    Case("experts-layers-out-of-range", "more trained expert layers than the model has",
         "`run --method experts --expert-layers 9` (the model has 3 decoder layers)",
         lambda w: ["run", "--model", w.model, "--out", w.tmp / "out", *SMALL_RUN, "--method", "experts",
                    "--expert-layers", "9"],
         "--expert-layers 9: the model has 3 decoder layers"),
    Case("experts-alpha-negative", "a negative experts alpha", "`generate --model BUNDLE --alpha -1`",
         lambda w: generate(experts_bundle(w), "--alpha", "-1"), "--alpha must be 0 or more"),
    Case("experts-bundle-altered", "an experts bundle whose expert changed after export",
         "`generate` on a bundle with one bit of `expert/model.safetensors` flipped",
         lambda w: generate(experts_bundle(w, "altered")), "expert/model.safetensors does not match the sha256"),
    Case("experts-bundle-missing", "an experts bundle without its anti-expert's weights",
         "`generate` on a bundle whose `anti_expert/model.safetensors` was deleted",
         lambda w: generate(experts_bundle(w, "missing")), "anti_expert/model.safetensors is missing"),
    Case("compare-other-tokenizer", "`compare` of two models with different tokenizers",
         "`compare --model OTHER --repaired BUNDLE` (OTHER's tokenizer has other merges)",
         lambda w: ["compare", "--model", other_tokenizer_model(w), "--repaired", experts_bundle(w), "--max-new-tokens", "2",
                    "--html", w.tmp / "compare.html"],
         "have different tokenizers: compare a checkpoint with the model it was repaired from"),
    Case("compare-empty-prompts", "`compare` with a prompts file that holds no prompt", "`compare --prompts EMPTY` (blank lines only)",
         lambda w: ["compare", "--repaired", w.model, "--prompts", blank_file(w)], "holds no prompt (give one prompt per line)"),
    Case("generate-not-a-checkpoint", "`generate` on a folder that is no checkpoint", "`generate --model MODEL` (a plain model folder)",
         lambda w: generate(w.model), "not a checkpoint exported by fairness-repair"),
    Case("surrogate-corrupt", "a saved surrogate whose file changed (its recorded sha256 differs)",
         "a run killed after fitting (`REPAIR_KILL_AT=annealing:1`), one byte appended to a `.joblib`, then the same `run` again",
         killed_run_with_corrupt_surrogate, "refusing to unpickle it",
         may_change=("study.db", "timing.json"), progress_ok=True),
]

# Rows of the table that are not errors: the input is handled, and the test proves it.
WORKS = {"tokenizer-no-pad"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2(case, model_dir, tmp_path):
    w = SimpleNamespace(tmp=tmp_path / "w", model=model_dir)
    w.tmp.mkdir()
    env = {"REPAIR_CACHE_DIR": str(w.tmp / "cache"), **case.env, **(case.env_of(w) if case.env_of else {})}
    args = case.build(w)
    before = snapshot(w.tmp)
    result = cli(args, env=env, fsize=case.fsize)
    after = snapshot(w.tmp)

    assert result.returncode == 2, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if case.progress_ok:  # progress lines of the resumed run, then the error line
        lines = [line.split("\r")[-1] for line in lines if "repair: error:" in line]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("repair: error:") and case.expect in lines[0], lines[0]

    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert {k for k in changed if Path(k).name not in case.may_change} == set(), "files changed or appeared"
    leftovers = [k for k in after if Path(k).name.endswith(".tmp") or Path(k).name.startswith(".tmp")]
    assert not leftovers, leftovers
    if case.secret:
        assert case.secret not in result.stdout + result.stderr
        for p in w.tmp.rglob("*"):
            assert not p.is_file() or case.secret.encode() not in p.read_bytes(), p


def test_tokenizer_without_pad_token_works_and_scores_the_same(model_dir, tmp_path):
    """Row tokenizer-no-pad. The evaluator pads its batches itself (right padding with id 0 under an
    attention mask, never the tokenizer's pad token), so a tokenizer with no pad token (and, here, no
    eos or bos token either) is not an error: it gives exactly the scores of the same tokenizer with one."""
    nopad = tmp_path / "nopad"
    shutil.copytree(model_dir, nopad)
    config = json.loads((nopad / "tokenizer_config.json").read_text())
    config.pop("pad_token")
    (nopad / "tokenizer_config.json").write_text(json.dumps(config))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(nopad)
    assert tok.pad_token is None and tok.eos_token is None and tok.bos_token is None
    reports = {}
    for name, model in (("pad", model_dir), ("nopad", nopad)):
        out = tmp_path / f"{name}.json"
        result = cli(["evaluate", "--model", model, "--no-progress", "--limit", "2", "--ppl-tokens", "128",
                      "--json", out])
        assert result.returncode == 0, result.stderr[-3000:]
        reports[name] = json.loads(out.read_text())
    for suite, data in reports["pad"]["suites"].items():
        assert reports["nopad"]["suites"][suite]["metrics"] == data["metrics"], suite


# ------------------------------------------------------------------ the table


def table_rows(path: Path) -> dict[str, list[str]]:
    """Row id -> cells of every markdown table row whose first cell is a `case-id`."""
    rows = {}
    section = path.read_text(encoding="utf-8").split(SECTION, 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.lstrip().startswith("|") else []
        m = re.fullmatch(r"`([a-z0-9-]+)`", cells[0]) if cells else None
        if m:
            assert m[1] not in rows, f"row {m[1]} appears twice in {path}"
            rows[m[1]] = cells
    return rows


def test_table_rows_are_exactly_the_cases():
    rows = table_rows(TABLE)
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert set(rows) == set(ids) | WORKS, (f"only in the table: {sorted(set(rows) - set(ids) - WORKS)}; "
                                           f"only in the tests: {sorted((set(ids) | WORKS) - set(rows))}")
    for case in CASES:  # the answer column quotes the actual error line
        assert case.expect.replace("|", "\\|") in rows[case.id][-1], (case.id, rows[case.id][-1])
