"""The files of a report directory, named once for the writer, the page, the summary and the command line."""

REPORT_HTML = "index.html"
REPORT_JSON = "report.json"
SUMMARY_TXT = "summary.txt"
FLAGGED_CSV = "flagged.csv"
FIGURES_DIR = "figures"
SAMPLES_DIR = "samples"
