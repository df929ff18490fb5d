"""Report: the run summary, and what the run page shows (artifacts: tables, progress, markdown with charts)."""
