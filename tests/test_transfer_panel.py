"""The transfer panel: scored on the report split for every reported configuration, never fitted on
or chosen by: the pairs and their conditional variant, and BBQ where the data folder holds it."""
import json

from repair.runloop import panel
from repair.suites.base import EvalConfig


def test_the_panel_holds_bbq_only_where_the_data_folder_has_it(shared_data, tmp_path):
    report = EvalConfig(split="report", limit=5, data_dir=shared_data)
    suites = panel(report, 7)
    assert suites["pairs"].limit is None  # every pair
    assert suites["bbq"].limit == 7 and suites["bbq"].split == "report"
    assert set(panel(EvalConfig(split="report", data_dir=tmp_path), 7)) == {"pairs"}
    assert set(panel(EvalConfig(split="report"), 7)) == {"pairs"}


def test_a_run_reports_the_panel_on_the_report_split_only(model_dir, tmp_path_factory, shared_data):
    from conftest import small_run

    out = small_run(model_dir, tmp_path_factory, "panel", "--data-dir", str(shared_data), "--panel-bbq-limit", "2")
    candidates = [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]
    base = candidates[0]
    report = base["report"]["metrics"]
    for key in ("pairs/overall/cond_stereotype_preferred", "bbq/overall/acc_ambig", "bbq/overall/s_dis"):
        assert key in report
    n_categories = len([k for k in report if k.startswith("bbq/") and k.endswith("/acc_ambig")]) - 1
    assert report["bbq/overall/acc_ambig"]["n"] + report["bbq/overall/acc_disambig"]["n"] == 2 * n_categories
    assert not any(k.startswith(("bbq/", "pairs/")) for k in base["select"]["metrics"])  # nothing chooses by them
    assert not any(k.startswith(("bbq/", "pairs/")) for k in base["search"]["metrics"])
    reported = [c for c in candidates if c["report"] is not None and c["key"] != "base"]
    assert reported and all("bbq/overall/s_amb" in c["changes"]["report"]["metrics"] for c in reported)
