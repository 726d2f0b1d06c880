"""HTML/CSV/JSON reports of a repair run, built from plain records (no model, no search code)."""
from reports.html import build_report, write_report

__all__ = ["build_report", "write_report"]
