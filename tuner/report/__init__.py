"""The tuning report: one document model rendered as JSON, Markdown, HTML and SVG plots."""

from tuner.report.write import ReportError, ReportFiles, read_report, write_report

__all__ = ["ReportError", "ReportFiles", "read_report", "write_report"]
