"""The repair report: a static HTML page with its figures, `report.json`, `summary.txt` and `flagged.csv`."""

from .files import FLAGGED_CSV, REPORT_HTML, REPORT_JSON, SUMMARY_TXT
from .summary import before_after_table
from .writer import write_report

__all__ = ["FLAGGED_CSV", "REPORT_HTML", "REPORT_JSON", "SUMMARY_TXT", "before_after_table", "write_report"]
