"""What every suite shares: the scoring requests it sends, the result it returns, its configuration,
and the deterministic search/report split by template."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, Sequence

import numpy as np

from repair.io import sha256_file  # noqa: F401  (suites take it from here)
from repair.stats import Metric

Split = Literal["search", "select", "report", "all"]
SPLITS = ("search", "select", "report")
# Share of each group's templates held out: `report` only for what the user is shown, `select` for
# choosing among a search's finalists; the rest is `search`, for everything a search fits.
FRACTIONS = {"report": 0.3, "select": 0.2}


@dataclass(frozen=True)
class ChoiceRequest:
    """Score each option as a continuation of the prompt.

    `prompt` is the full text before the options (chat template already applied where wanted);
    each option is appended verbatim, so options usually start with a space. Only the option tokens
    are scored. With `word_end`, each option's score also includes log P(a new word or the end of
    the text follows it): " Christian" then excludes " Christians".
    """

    prompt: str
    options: tuple[str, ...]
    word_end: bool = False


@dataclass(frozen=True)
class OptionScores:
    """Summed log-probability of each option's tokens, and how many tokens each option has."""

    logprob: np.ndarray  # float64, shape (n_options,)
    n_tokens: np.ndarray  # int64, shape (n_options,)

    @property
    def mean_logprob(self) -> np.ndarray:
        return self.logprob / self.n_tokens


class Scorer(Protocol):
    """What a suite needs from the model: the fast evaluator and the reference scorer both provide it."""

    tokenizer: object

    def score_choices(self, requests: Sequence[ChoiceRequest], desc: str = "") -> list[OptionScores]: ...

    def token_nll(self, token_ids: np.ndarray, window: int, stride: int, desc: str = "") -> np.ndarray:
        """Negative log-likelihood of every token after the first, predicted with a sliding window
        of at most `window` tokens advancing by `stride` (each token scored exactly once)."""
        ...


@dataclass(frozen=True)
class EvalConfig:
    """Everything the suites read. The CLI maps its flags onto this one to one."""

    data_dir: Path | None = None
    split: Split = "all"
    limit: int | None = None  # at most N items per BBQ category / association attribute
    categories: tuple[str, ...] | None = None  # BBQ categories (None: all 11)
    attributes: tuple[str, ...] | None = None  # association attributes (None: all)
    association_neutral: bool = True  # False skips the neutral reference prompts (and kl_neutral)
    bbq_mode: Literal["cloze", "choice"] = "cloze"
    mmlu_subjects: tuple[str, ...] | None = None
    mmlu_shots: int = 0
    ppl_tokens: int = 4096  # tokens scored by the perplexity suites
    ppl_window: int = 512
    ppl_stride: int = 256
    seed: int = 0


@dataclass(frozen=True)
class SuiteResult:
    suite: str
    metrics: dict[str, Metric]  # flat names, e.g. "overall/s_amb", "Age/acc_ambig"
    records: list[dict] = field(default_factory=list)  # per-item records
    files: dict[str, str] = field(default_factory=dict)  # data file path -> sha256
    info: dict = field(default_factory=dict)  # e.g. {"dropped": 3}

    def as_dict(self) -> dict:
        return {
            "suite": self.suite,
            "metrics": {k: m.as_dict() for k, m in self.metrics.items()},
            "files": self.files,
            "info": self.info,
            "records": self.records,
        }


def _rank(key) -> str:
    return hashlib.sha256(str(key).encode("utf-8")).hexdigest()


def assign_splits(template_keys) -> dict[str, Literal["search", "select", "report"]]:
    """Deterministic three-way split by template, to be called once per group (a BBQ category, an
    MMLU subject, the perplexity chunks).

    Templates are ordered by a hash of their key; the first 30% go to `report`, the next 20% to
    `select`, the rest to `search`. Every group with three or more templates has at least one in each
    split (two templates: one `report`, one `search`), and the same template always lands on the same
    side, whatever else is loaded.
    """
    keys = sorted(set(template_keys), key=_rank)
    n = len(keys)
    n_report = max(1, round(FRACTIONS["report"] * n)) if n >= 2 else 0
    n_select = max(1, round(FRACTIONS["select"] * n)) if n >= 3 else 0
    return {k: ("report" if i < n_report else "select" if i < n_report + n_select else "search") for i, k in enumerate(keys)}


def split_of(key) -> Literal["search", "select", "report"]:
    """The split of one template by its hash alone, independent of which other templates exist: for
    keys shared between groups (the same concept under two association attributes) that must land
    on the same side everywhere. The shares match `assign_splits` in expectation, not exactly."""
    u = int(_rank(key)[:12], 16) / 16 ** 12
    return "report" if u < FRACTIONS["report"] else "select" if u < FRACTIONS["report"] + FRACTIONS["select"] else "search"
