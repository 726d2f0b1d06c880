"""Loading untrusted files: exports hold no pickles, and the surrogates the tool pickles itself are
read back only from their own run directory and only with the checksum recorded when they were
written. The tampered files below are real pickles that would create a marker file if unpickled."""
import hashlib
import json
import pickle
import shutil

from conftest import SMALL, run_cli


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):  # unpickling this opens (creates) the marker file
        return (open, (self.marker, "w"))


def _resume_at_fitting(finished_run, tmp_path):
    """A copy of the finished run that, rerun, reads its round-1 surrogates back from disk."""
    run = tmp_path / finished_run.name  # same folder name: same default study name
    shutil.copytree(finished_run, run)
    (run / "surrogates" / "round-1.json").unlink()
    return run


def _rerun(run, model_dir):
    result = run_cli("run", "--model", model_dir, "--out", run, *SMALL, timeout=300)
    lines = [l for l in result.stderr.splitlines() if l.startswith("repair: error:")]
    return result, lines


def test_checkpoint_holds_no_pickles(finished_run):
    files = list((finished_run / "checkpoint").iterdir())
    assert files and {p.suffix for p in files} <= {".safetensors", ".json", ".md"}, files
    for p in files:
        assert not p.read_bytes().startswith(b"\x80"), f"{p.name} looks like a pickle"


def test_tampered_surrogate_is_refused_unread(finished_run, model_dir, tmp_path):
    run = _resume_at_fitting(finished_run, tmp_path)
    marker = tmp_path / "unpickled"
    (run / "surrogates" / "round-1-fairness.joblib").write_bytes(pickle.dumps(_Payload(marker)))
    result, lines = _rerun(run, model_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "round-1-fairness.joblib" in lines[0] and "SHA-256" in lines[0], result.stderr[-2000:]
    assert not marker.exists()
    assert "Traceback" not in result.stderr


def test_surrogate_outside_the_run_directory_is_refused_unread(finished_run, model_dir, tmp_path):
    run = _resume_at_fitting(finished_run, tmp_path)
    marker = tmp_path / "unpickled"
    evil = tmp_path / "evil.joblib"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    fit_path = run / "surrogates" / "fit-1.json"
    fit = json.loads(fit_path.read_text())
    fit["files"]["fairness"] = "../../evil.joblib"  # with the file's true checksum: only the location is wrong
    fit["sha256"]["fairness"] = hashlib.sha256(evil.read_bytes()).hexdigest()
    fit_path.write_text(json.dumps(fit))
    result, lines = _rerun(run, model_dir)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1 and "own run directory" in lines[0], result.stderr[-2000:]
    assert not marker.exists()


def test_untouched_surrogates_are_read_back(finished_run, model_dir, tmp_path):
    """The control: with the files as written, the rerun loads them and ends as the first run did."""
    run = _resume_at_fitting(finished_run, tmp_path)
    result, _ = _rerun(run, model_dir)
    assert result.returncode == 0, result.stderr[-2000:]
    plans = [json.loads((d / "surrogates" / "round-1.json").read_text()) for d in (run, finished_run)]
    assert plans[0]["candidates"] == plans[1]["candidates"]
