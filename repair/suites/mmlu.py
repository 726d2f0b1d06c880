"""MMLU: the utility check that a fairness repair has not damaged general knowledge.

Each question is scored as a k-shot completion in the format of Hendrycks et al. (the letter after
"Answer:"), the prediction is the option with the highest summed log-probability.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from repair.errors import DataError, UserError
from repair.stats import mean_metric
from repair.suites.base import ChoiceRequest, EvalConfig, OptionScores, SuiteResult, assign_splits, sha256_file

HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
LETTERS = ("A", "B", "C", "D")
OPTIONS = tuple(" " + letter for letter in LETTERS)
MAX_SHOTS = 5  # the dev split holds five questions per subject


@dataclass(frozen=True)
class Question:
    subject: str
    index: int  # 0-based row index within the subject's test file (header excluded)
    question: str
    choices: tuple[str, str, str, str]
    answer: int  # 0-based


def data_root(config: EvalConfig, name: str) -> Path:
    """The data directory, or a UserError that says how to give one."""
    if config.data_dir is None:
        raise UserError(f"the {name} suite reads benchmark data; pass --data-dir pointing at the shared data folder")
    return Path(config.data_dir)


def read_csv(path: Path, subject: str) -> list[Question]:
    """Parse one MMLU CSV (header `question,choice0..3,answer`, 0-based answer), strictly.

    Line numbers in errors are the physical line where the bad record starts, so the user can open the
    file there even when a quoted field spans several lines. Blank lines are skipped.
    """
    if not path.is_file():
        raise DataError(path, "file not found", fix="check --data-dir")
    out: list[Question] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, strict=True)
            start = 1
            for row in reader:
                line, start = start, reader.line_num + 1
                if line == 1:
                    if row != HEADER:
                        raise DataError(path, f"header must be {','.join(HEADER)}, found {','.join(row)}", line=1)
                    continue
                if not row:
                    continue
                if len(row) != len(HEADER):
                    raise DataError(path, f"expected {len(HEADER)} columns, found {len(row)}", line=line)
                question, *choices, answer = row
                if answer.strip() not in ("0", "1", "2", "3"):
                    raise DataError(path, f"answer must be 0, 1, 2 or 3 (0-based), found {answer!r}", line=line)
                if not question.strip():
                    raise DataError(path, "empty question", line=line)
                out.append(Question(subject, len(out), question, tuple(choices), int(answer)))
    except csv.Error as e:
        cut = "; the file ends inside a quoted field, so it looks truncated" if "end of data" in str(e) else ""
        raise DataError(path, f"malformed CSV: {e}{cut}", line=start, fix="fix its quoting, or re-download the file") from None
    except UnicodeDecodeError as e:
        raise DataError(path, f"not UTF-8: {e}") from None
    if start == 1:
        raise DataError(path, "empty file (no header)")
    return out


def format_question(q: Question, with_answer: bool) -> str:
    text = q.question + "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, q.choices)) + "\nAnswer:"
    if with_answer:
        text += f" {LETTERS[q.answer]}\n\n"
    return text


def format_prompt(subject: str, shots: Sequence[Question], q: Question) -> str:
    """The standard MMLU prompt: header, k solved dev questions, then the open question."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(format_question(s, True) for s in shots) + format_question(q, False)


class MMLUSuite:
    """k-shot MMLU over the selected subjects.

    The prompt is plain text even when the tokenizer has a chat template: the k-shot format is a
    completion task (the answer letter continues "Answer:"), and wrapping it in chat turns would change
    what is measured and make numbers incomparable with published MMLU results and across models.

    Every question is its own template for the search/report split (key "subject:index", split per
    subject). `limit` keeps the first N questions of the selected split per subject, so the same
    questions are used on every run.
    """

    name = "mmlu"

    def __init__(self, config: EvalConfig, tokenizer=None):
        self.config = config
        if not 0 <= config.mmlu_shots <= MAX_SHOTS:
            raise UserError(f"--mmlu-shots must be between 0 and {MAX_SHOTS}, got {config.mmlu_shots}")
        if config.limit is not None and config.limit < 1:
            raise UserError(f"--limit must be at least 1, got {config.limit}")
        root = data_root(config, self.name) / "mmlu"
        test_dir, dev_dir = root / "test", root / "dev"
        if not test_dir.is_dir():
            raise DataError(test_dir, "MMLU test folder not found", fix="pass --data-dir pointing at the shared data folder")
        available = sorted(p.name[: -len("_test.csv")] for p in test_dir.glob("*_test.csv"))
        if not available:
            raise DataError(test_dir, "no <subject>_test.csv files", fix="check --data-dir")
        subjects = available if config.mmlu_subjects is None else list(dict.fromkeys(config.mmlu_subjects))
        unknown = [s for s in subjects if s not in available]
        if unknown:
            raise UserError(
                f"unknown MMLU subject(s) {', '.join(unknown)}; valid subjects include {', '.join(available[:5])}"
                f"{', ...' if len(available) > 5 else ''} ({len(available)} in {test_dir})"
            )

        self.files: dict[str, str] = {}
        self.items: list[tuple[Question, str]] = []  # (question, split side)
        self._prompts: list[str] = []
        for subject in subjects:
            test_path = test_dir / f"{subject}_test.csv"
            questions = read_csv(test_path, subject)
            self.files[str(test_path)] = sha256_file(test_path)
            shots: list[Question] = []
            if config.mmlu_shots:
                dev_path = dev_dir / f"{subject}_dev.csv"
                shots = read_csv(dev_path, subject)[: config.mmlu_shots]
                if len(shots) < config.mmlu_shots:
                    raise DataError(dev_path, f"{config.mmlu_shots}-shot prompts need {config.mmlu_shots} dev questions, found {len(shots)}")
                self.files[str(dev_path)] = sha256_file(dev_path)
            sides = assign_splits(f"{subject}:{q.index}" for q in questions)
            chosen = [q for q in questions if config.split in ("all", sides[f"{subject}:{q.index}"])]
            for q in chosen[: config.limit]:
                self.items.append((q, sides[f"{subject}:{q.index}"]))
                self._prompts.append(format_prompt(subject, shots, q))

    def requests(self) -> list[ChoiceRequest]:
        return [ChoiceRequest(p, OPTIONS) for p in self._prompts]

    def run(self, scorer) -> SuiteResult:
        return self.score(scorer.score_choices(self.requests(), desc=self.name))

    def score(self, outputs: Sequence[OptionScores]) -> SuiteResult:
        """Accuracy per subject and overall (micro-averaged over questions, like lm-eval's MMLU group)."""
        if len(outputs) != len(self.items):
            raise ValueError(f"expected {len(self.items)} scored requests, got {len(outputs)}")
        records, correct_by_subject = [], {}
        for (q, side), out in zip(self.items, outputs):
            pred = int(np.argmax(out.logprob))
            records.append(
                {"subject": q.subject, "index": q.index, "answer": q.answer, "pred_index": pred,
                 "scores": [float(x) for x in out.logprob], "split": side}
            )
            correct_by_subject.setdefault(q.subject, []).append(float(pred == q.answer))
        seed = self.config.seed
        metrics = {f"{s}/accuracy": mean_metric(c, "higher", seed=seed) for s, c in correct_by_subject.items()}
        metrics["overall/accuracy"] = mean_metric([r["pred_index"] == r["answer"] for r in records], "higher", seed=seed)
        info = {"shots": self.config.mmlu_shots, "n_questions": len(records), "subjects": len(correct_by_subject)}
        return SuiteResult(self.name, metrics, records, dict(self.files), info)
