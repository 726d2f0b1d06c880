"""`repair run --method experts` end to end on a tiny random Llama: the experts trained once and kept
with their sha256, the whole grid evaluated in the seed, each rule's sequence, the bundle export,
`repair.load` and `repair generate` applying the experts, a worker scoring the same numbers."""
import html
import json

import pytest
import torch

from conftest import SMALL, rescore_as_a_worker, run_cli, small_run, stored
from repair.methods.experts.space import ExpertSpace
from repair.methods.experts.training import load_saved
from repair.methods.experts.transform import ExpertSetting, ExpertsTransform

EXPERTS = ["--method", "experts"]


@pytest.fixture(scope="module")
def experts_run(model_dir, tmp_path_factory):
    return small_run(model_dir, tmp_path_factory, "experts", *EXPERTS)


def _trials(run):
    return stored(f"sqlite:///{run / 'study.db'}", f"repair-{run.name}")


def test_the_whole_grid_is_the_seed_and_no_surrogate_is_fitted(experts_run):
    trials = _trials(experts_run)
    assert set(trials) == {"base", *ExpertSpace().enumerate()}
    assert {t.user_attrs["phase"] for k, t in trials.items() if k != "base"} == {"grid"}
    assert not (experts_run / "experts" / "surrogates").exists()
    methods = json.loads((experts_run / "methods.json").read_text())
    assert set(methods) == {"experts", "rule:logits", "rule:probs"}
    assert methods["rule:probs"]["evaluations"] == 1 + sum(k.startswith("experts:rule=probs") for k in trials)


def test_experts_are_kept_with_their_sha256_and_a_rerun_does_not_train_again(experts_run, model_dir):
    record = json.loads((experts_run / "experts" / "experts.json").read_text())
    assert set(record["sha256"]) == {"expert", "anti_expert"} and record["sentences"]["expert"] > 0
    from repair.methods.experts.corpus import Corpus

    corpus = Corpus()  # trained on the corpus's search split, nothing else
    assert record["corpus_sha256"] == corpus.sha256 and record["sentences"]["expert"] == len(corpus.of_split("search"))
    files = sorted((experts_run / "experts").rglob("*.safetensors"))
    stamps = [f.stat().st_mtime_ns for f in files]
    result = run_cli("run", "--model", model_dir, "--out", experts_run, *SMALL, *EXPERTS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "training the" not in result.stderr and "resuming" in result.stderr
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_the_bundle_loads_with_the_experts_applied_to_generate(experts_run, model_dir, tmp_path):
    """Export a setting that certainly shifts the logits, reload it as a user does, and generate:
    the same tokens as the run's experts applied in memory, and the plain model's once removed."""
    import repair
    from repair.export import export_hooked
    from repair.models import ModelSpec, load_model

    loaded = load_model(ModelSpec(str(model_dir), device="cpu"))
    experts = load_saved(experts_run / "experts", loaded.model)
    setting = ExpertSetting(30.0, "logits")  # the experts differ only by group words: a large alpha to shift greedy tokens
    transform = ExpertsTransform(loaded.model, experts["expert"], experts["anti_expert"], [setting])
    manifest = json.loads((experts_run / "checkpoint" / "repair_manifest.json").read_text())
    manifest.update(alpha=30.0, rule="logits")
    bundle = export_hooked(loaded, "experts", {}, {"setting": {"alpha": 30.0, "rule": "logits"}}, tmp_path / "bundle",
                           manifest, "# card\n", models=experts, expected=transform.logits)
    assert {"expert/top.safetensors", "anti_expert/top.safetensors"} <= set(manifest_files(bundle))

    inputs = {"input_ids": torch.tensor([[5, 17, 33, 2, 90]])}
    model, _ = repair.load(bundle)
    with torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0)
        transform.attach()
        try:
            want = loaded.model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0)
        finally:
            transform.remove()
        plain = loaded.model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(got, want) and not torch.equal(got, plain)
        model.repair_interventions[0].remove()
        assert torch.equal(model.generate(**inputs, max_new_tokens=10, do_sample=False, pad_token_id=0), plain)

    cli = run_cli("generate", "--model", bundle, "--prompt", "The nurse", "--max-new-tokens", "4", "--alpha", "0")
    assert cli.returncode == 0, cli.stderr


def manifest_files(folder):
    return json.loads((folder / "repair_manifest.json").read_text())["files_sha256"]


def test_the_run_exports_a_bundle_with_its_manifest_and_card(experts_run):
    ckpt = experts_run / "checkpoint"
    manifest = json.loads((ckpt / "repair_manifest.json").read_text())
    assert manifest["method"] == "experts" and {"alpha", "rule"} <= set(manifest)
    assert {"interventions.safetensors", "model.safetensors", "expert/top.safetensors",
            "anti_expert/top.safetensors"} == set(manifest["files_sha256"])  # the experts' trained layers alone
    assert "kl_neutral" in (ckpt / "README.md").read_text() and "kl_uniform" in (ckpt / "README.md").read_text()


def test_the_report_split_shows_the_pairs_suite_for_the_unrepaired_and_the_chosen_model(experts_run):
    """Every configuration measured on the report split carries the pairs suite (never an objective),
    and the chosen one its paired change."""
    rows = [json.loads(line) for line in (experts_run / "candidates.jsonl").read_text().splitlines()]
    reported = [c for c in rows if c["report"] is not None]
    assert reported[0]["key"] == "base" and any(c["chosen"] for c in reported)
    for c in reported:
        assert {"pairs/overall/stereotype_preferred", "pairs/overall/mean_gap"} <= set(c["report"]["metrics"])
        assert not any(k.startswith("pairs/") for k in c["select"]["metrics"])
    chosen = next(c for c in rows if c["chosen"])
    if chosen["key"] != "base":
        assert "pairs/overall/stereotype_preferred" in chosen["changes"]["report"]["metrics"]
    assert "stereotype_preferred" in (experts_run / "report" / "index.html").read_text()


def test_a_worker_scores_what_the_run_stored(experts_run):
    trials, rows = rescore_as_a_worker(experts_run, "experts", n=4)
    assert len(rows) == 4
    for t, row in zip(trials, rows):
        assert row["fairness"] == pytest.approx(t.values[0], abs=1e-9)
        assert row["utility"] == pytest.approx(t.user_attrs["utility"], rel=1e-9)


def test_compare_shows_both_models_side_by_side_and_the_report_links_it(experts_run, model_dir, tmp_path):
    """`repair compare` on the run's bundle: the greedy continuations are those of the plain model and
    of the bundle loaded by repair.load, for the default prompts and a user's own."""
    import repair
    from repair.compare import DEFAULT_PROMPTS
    from repair.models import ModelSpec, load_model

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The surgeon said\n\nMy neighbor\n")
    result = run_cli("compare", "--model", model_dir, "--repaired", experts_run / "checkpoint", "--prompts", prompts,
                     "--max-new-tokens", "6", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    page = (experts_run / "compare.html").read_text()
    assert all(html.escape(p) in page for p in (*DEFAULT_PROMPTS, "The surgeon said", "My neighbor"))
    assert 'href="../compare.html"' in (experts_run / "report" / "index.html").read_text()
    assert "unrepaired" in result.stdout and "| repaired" in result.stdout

    def greedy(model, tok, prompt):
        inputs = tok(prompt, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        return tok.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    base = load_model(ModelSpec(str(model_dir), device="cpu"))
    repaired, tok = repair.load(experts_run / "checkpoint")
    for prompt in ("The surgeon said", DEFAULT_PROMPTS[0]):
        row = page.split(f"<td class='prompt'>{html.escape(prompt)}</td><td>greedy</td>")[1].split("</tr>")[0]
        assert f"<td>{html.escape(greedy(base.model, base.tokenizer, prompt))}</td><td>" \
               f"{html.escape(greedy(repaired, tok, prompt))}</td>" in row
