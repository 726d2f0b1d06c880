"""MMLU suite: prompt format, accuracy, strict CSV errors, subject checks, limit and split."""
from __future__ import annotations

from pathlib import Path

import pytest

from repair.errors import DataError, UserError
from repair.suites.base import EvalConfig, assign_splits
from repair.suites.mmlu import MMLUSuite
from fakes import TableScorer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
HEADER = "question,choice0,choice1,choice2,choice3,answer\n"

# answers of the tiny subjects, 0-based
ALGEBRA_ANSWERS = [0, 1, 0, 2, 3, 0, 1, 0, 0, 2]
ART_ANSWERS = [3, 0, 0, 1]


def write_subject(root: Path, subject: str, answers, dev_rows: int = 5):
    (root / "mmlu" / "test").mkdir(parents=True, exist_ok=True)
    (root / "mmlu" / "dev").mkdir(parents=True, exist_ok=True)
    test = "".join(f"{subject} q{i}?,a{i},b{i},c{i},d{i},{a}\n" for i, a in enumerate(answers))
    (root / "mmlu" / "test" / f"{subject}_test.csv").write_text(HEADER + test)
    dev = "".join(f"shot {i}?,x{i},y{i},z{i},w{i},{i % 4}\n" for i in range(dev_rows))
    (root / "mmlu" / "dev" / f"{subject}_dev.csv").write_text(HEADER + dev)


@pytest.fixture
def data_dir(tmp_path):
    write_subject(tmp_path, "abstract_algebra", ALGEBRA_ANSWERS)
    write_subject(tmp_path, "art", ART_ANSWERS)
    return tmp_path


def cfg(data_dir, **kw):
    return EvalConfig(data_dir=data_dir, **kw)


def always(letter):
    return TableScorer(lambda prompt, option: (0.0 if option == " " + letter else -1.0, 1))


def test_zero_shot_prompt(data_dir):
    suite = MMLUSuite(cfg(data_dir, mmlu_subjects=("abstract_algebra",)))
    reqs = suite.requests()
    assert len(reqs) == 10
    assert reqs[1].prompt == (
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "abstract_algebra q1?\nA. a1\nB. b1\nC. c1\nD. d1\nAnswer:"
    )
    assert reqs[1].options == (" A", " B", " C", " D")


def test_two_shot_prompt(data_dir):
    suite = MMLUSuite(cfg(data_dir, mmlu_subjects=("art",), mmlu_shots=2))
    assert suite.requests()[0].prompt == (
        "The following are multiple choice questions (with answers) about art.\n\n"
        "shot 0?\nA. x0\nB. y0\nC. z0\nD. w0\nAnswer: A\n\n"
        "shot 1?\nA. x1\nB. y1\nC. z1\nD. w1\nAnswer: B\n\n"
        "art q0?\nA. a0\nB. b0\nC. c0\nD. d0\nAnswer:"
    )


def test_chat_template_is_ignored(data_dir):
    class ChatTokenizer:
        chat_template = "{{ messages }}"

    plain = MMLUSuite(cfg(data_dir)).requests()
    assert MMLUSuite(cfg(data_dir), tokenizer=ChatTokenizer()).requests() == plain


def test_accuracy_from_preferred_letter(data_dir):
    suite = MMLUSuite(cfg(data_dir))
    scorer = always("A")
    result = suite.run(scorer)
    assert len(scorer.calls) == 14
    # answer A (0): algebra 5 of 10, art 2 of 4
    assert result.metrics["abstract_algebra/accuracy"].value == pytest.approx(0.5)
    assert result.metrics["art/accuracy"].value == pytest.approx(0.5)
    assert result.metrics["overall/accuracy"].value == pytest.approx(7 / 14)
    assert result.metrics["overall/accuracy"].n == 14
    assert result.metrics["overall/accuracy"].better == "higher"
    m = result.metrics["overall/accuracy"]
    assert m.ci_low <= m.value <= m.ci_high

    result = suite.run(always("D"))
    assert result.metrics["art/accuracy"].value == pytest.approx(0.25)
    assert result.metrics["abstract_algebra/accuracy"].value == pytest.approx(0.1)
    rec = result.records[0]
    assert rec == {"subject": "abstract_algebra", "index": 0, "answer": 0, "pred_index": 3,
                   "scores": [-1.0, -1.0, -1.0, 0.0], "split": rec["split"]}
    assert set(result.files) == {str(data_dir / "mmlu" / "test" / f"{s}_test.csv") for s in ("abstract_algebra", "art")}
    assert all(len(h) == 64 for h in result.files.values())


def test_argmax_uses_summed_logprob(data_dir):
    # " B" has the best mean but the worst sum: the prediction follows the sum
    scorer = TableScorer(lambda p, o: {" A": (-2.0, 4), " B": (-2.5, 10)}.get(o, (-3.0, 1)))
    result = MMLUSuite(cfg(data_dir, mmlu_subjects=("art",))).run(scorer)
    assert {r["pred_index"] for r in result.records} == {0}


@pytest.mark.parametrize(
    "body, line, problem",
    [
        ("q,choice0,choice1,choice2,choice3,answer\nq?,a,b,c,d,0\n", 1, "header"),
        (HEADER + "q0?,a,b,c,d,0\nq1?,a,b,c,1\n", 3, "columns"),
        (HEADER + "q0?,a,b,c,d,0\nq1?,a,b,c,d,4\n", 3, "answer"),
        (HEADER + "q0?,a,b,c,d,B\n", 2, "answer"),
        (HEADER + "q0?,a,b,c,d,0\n  ,a,b,c,d,1\n", 3, "empty question"),
        # a quoted field over two lines: the bad record starts on physical line 4
        (HEADER + '"multi\nline?",a,b,c,d,0\nq?,a,b,c,d,0,extra\n', 4, "columns"),
        # the bad record itself spans lines 3-4: reported where it starts
        (HEADER + 'q0?,a,b,c,d,0\n"two\nlines?",a,b,c,d,9\n', 3, "answer"),
    ],
)
def test_malformed_csv(data_dir, body, line, problem):
    path = data_dir / "mmlu" / "test" / "art_test.csv"
    path.write_text(body)
    with pytest.raises(DataError) as e:
        MMLUSuite(cfg(data_dir, mmlu_subjects=("art",)))
    assert f"{path}:{line}:" in str(e.value)
    assert problem in str(e.value)
    assert e.value.line == line


def test_missing_dev_file_only_matters_with_shots(data_dir):
    (data_dir / "mmlu" / "dev" / "art_dev.csv").unlink()
    MMLUSuite(cfg(data_dir, mmlu_subjects=("art",)))
    with pytest.raises(DataError, match="art_dev.csv"):
        MMLUSuite(cfg(data_dir, mmlu_subjects=("art",), mmlu_shots=1))


def test_user_errors(data_dir):
    with pytest.raises(UserError, match="unknown MMLU subject.*astrology.*abstract_algebra"):
        MMLUSuite(cfg(data_dir, mmlu_subjects=("art", "astrology")))
    for shots in (-1, 6):
        with pytest.raises(UserError, match="shots"):
            MMLUSuite(cfg(data_dir, mmlu_shots=shots))
    with pytest.raises(UserError, match="data-dir"):
        MMLUSuite(EvalConfig())
    with pytest.raises(DataError, match="data-dir"):
        MMLUSuite(cfg(data_dir / "nowhere"))


def keys(suite):
    return [(q.subject, q.index) for q, _ in suite.items]


def test_split_disjoint_and_limit_deterministic(data_dir):
    every = keys(MMLUSuite(cfg(data_dir)))
    search = keys(MMLUSuite(cfg(data_dir, split="search")))
    select = keys(MMLUSuite(cfg(data_dir, split="select")))
    report = keys(MMLUSuite(cfg(data_dir, split="report")))
    assert not (set(search) & set(report) or set(search) & set(select) or set(select) & set(report))
    assert sorted(search + select + report) == sorted(every)
    # 30% of each subject held out for report, 20% for select: 3 and 2 of 10, 1 and 1 of 4
    assert sum(s == "abstract_algebra" for s, _ in report) == 3 and sum(s == "abstract_algebra" for s, _ in select) == 2
    assert sum(s == "art" for s, _ in report) == 1 and sum(s == "art" for s, _ in select) == 1
    sides = assign_splits(f"abstract_algebra:{i}" for i in range(10))
    assert {i for s, i in report if s == "abstract_algebra"} == {i for i in range(10) if sides[f"abstract_algebra:{i}"] == "report"}

    limited = keys(MMLUSuite(cfg(data_dir, split="search", limit=2)))
    assert limited == keys(MMLUSuite(cfg(data_dir, split="search", limit=2)))
    first_two = {s: [i for t, i in search if t == s][:2] for s in ("abstract_algebra", "art")}
    assert limited == [(s, i) for s in ("abstract_algebra", "art") for i in first_two[s]]
    # a question's side does not depend on which other subjects are loaded
    assert keys(MMLUSuite(cfg(data_dir, split="report", mmlu_subjects=("art",)))) == [k for k in report if k[0] == "art"]
    with pytest.raises(UserError, match="limit"):
        MMLUSuite(cfg(data_dir, limit=0))


def test_records_carry_split(data_dir):
    result = MMLUSuite(cfg(data_dir)).run(always("A"))
    report = set(keys(MMLUSuite(cfg(data_dir, split="report"))))
    assert {(r["subject"], r["index"]) for r in result.records if r["split"] == "report"} == report


@pytest.mark.skipif(not (SHARED / "mmlu").is_dir(), reason=f"shared data not found at {SHARED}")
def test_real_data_loads():
    suite = MMLUSuite(EvalConfig(data_dir=SHARED, mmlu_shots=5))
    assert len({q.subject for q, _ in suite.items}) == 57
    assert len(suite.items) == 14042
    assert len(suite.files) == 114
    prompt = suite.requests()[0].prompt
    assert prompt.startswith("The following are multiple choice questions (with answers) about abstract algebra.\n\n")
    assert prompt.count("\nAnswer:") == 6
