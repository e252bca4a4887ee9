"""The engine scraper's old home (it read vLLM only); everything now lives in :mod:`tuner.telemetry.engines`."""

from __future__ import annotations

from tuner.telemetry.engines import (
    EngineScraper,
    Histogram,
    MetricsText,
    engine_sample,
    fetch_metrics,
    histogram_delta_quantile,
    parse_metrics,
)

__all__ = [
    "EngineScraper",
    "Histogram",
    "MetricsText",
    "engine_sample",
    "fetch_metrics",
    "histogram_delta_quantile",
    "parse_metrics",
]
