"""Read a vLLM server's Prometheus ``/metrics`` and turn it into :class:`EngineSample` values.

Counters become rates over the interval between two scrapes; histograms (TTFT, inter-token latency) become the
mean and an estimated p95 of the requests observed during that interval, from bucket deltas. Metric names are
those of vLLM 0.2x/0.3x (REFERENCE.md); older names are accepted where they were renamed.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import httpx

from tuner.telemetry.model import EngineSample

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

RUNNING = ("vllm:num_requests_running",)
WAITING = ("vllm:num_requests_waiting",)
KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
GEN_TOKENS = ("vllm:generation_tokens_total",)
PROMPT_TOKENS = ("vllm:prompt_tokens_total",)
PREEMPTIONS = ("vllm:num_preemptions_total",)
SUCCESS = ("vllm:request_success_total",)
TTFT = "vllm:time_to_first_token_seconds"
ITL = ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")


@dataclass
class Histogram:
    """Cumulative buckets (upper bound -> count), summed over label sets."""

    buckets: dict[float, float] = field(default_factory=dict)
    total_sum: float = 0.0
    count: float = 0.0


@dataclass
class MetricsText:
    """One parsed /metrics page: plain values summed over label sets, and histograms."""

    values: dict[str, float]
    histograms: dict[str, Histogram]
    model_name: str | None


def parse_metrics(text: str) -> MetricsText:
    """Parse the Prometheus text format. Several engines or models are summed (gauges too: they are counts)."""
    values: dict[str, float] = defaultdict(float)
    histograms: dict[str, Histogram] = defaultdict(Histogram)
    model_name: str | None = None
    for line in text.splitlines():
        if not line or line[0] == "#" or not line.startswith("vllm:"):
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        name, labels_text, raw = m.group(1), m.group(3) or "", m.group(4)
        try:
            value = float(raw)
        except ValueError:
            continue
        if math.isnan(value):
            continue
        if model_name is None and "model_name" in labels_text:
            labels = dict(_LABEL.findall(labels_text))
            model_name = labels.get("model_name")
        if name.endswith("_bucket"):
            labels = dict(_LABEL.findall(labels_text))
            le = labels.get("le")
            if le is not None:
                hist = histograms[name[: -len("_bucket")]]
                bound = math.inf if le in ("+Inf", "Inf") else float(le)
                hist.buckets[bound] = hist.buckets.get(bound, 0.0) + value
        else:
            values[name] += value
    # `_sum` and `_count` may come before the buckets: attach them once every histogram is known.
    for base, hist in histograms.items():
        hist.total_sum = values.pop(base + "_sum", 0.0)
        hist.count = values.pop(base + "_count", 0.0)
    return MetricsText(dict(values), dict(histograms), model_name)


def _first(values: dict[str, float], names: tuple[str, ...]) -> float | None:
    for name in names:
        if name in values:
            return values[name]
    return None


def _hist(page: MetricsText, names: tuple[str, ...]) -> Histogram | None:
    for name in names:
        if name in page.histograms:
            return page.histograms[name]
    return None


def histogram_delta_quantile(prev: Histogram | None, cur: Histogram, q: float) -> float | None:
    """Estimate quantile ``q`` of the observations made between two scrapes (linear within a bucket)."""
    bounds = sorted(cur.buckets)
    deltas = [cur.buckets[b] - (prev.buckets.get(b, 0.0) if prev else 0.0) for b in bounds]
    total = deltas[-1] if deltas else 0.0
    if total <= 0:
        return None
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, cum in zip(bounds, deltas, strict=True):
        if cum >= rank:
            if math.isinf(bound):
                return lower_bound  # beyond the last finite bucket: the best honest lower bound
            span = cum - lower_count
            frac = (rank - lower_count) / span if span > 0 else 1.0
            return lower_bound + (bound - lower_bound) * frac
        lower_bound, lower_count = bound, cum
    return None


def _delta_mean(prev: Histogram | None, cur: Histogram | None) -> float | None:
    if cur is None:
        return None
    n = cur.count - (prev.count if prev else 0.0)
    if n <= 0:
        return None
    return (cur.total_sum - (prev.total_sum if prev else 0.0)) / n


def _rate(cur: float | None, prev: float | None, dt_s: float) -> float | None:
    if cur is None or prev is None or dt_s <= 0 or cur < prev:  # a restart resets counters
        return None
    return (cur - prev) / dt_s


def fetch_metrics(client: httpx.Client, base_url: str) -> MetricsText:
    """GET and parse ``base_url``/metrics. Raises httpx.HTTPError (unreachable, timeout, non-2xx)."""
    response = client.get(f"{base_url.rstrip('/')}/metrics")
    response.raise_for_status()
    return parse_metrics(response.text)


class EngineScraper:
    """Scrapes one vLLM server. Keeps the previous page to turn counters and histograms into interval values."""

    def __init__(self, base_url: str, *, timeout_s: float = 0.8, client: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = client or httpx.Client(timeout=timeout_s)
        self._prev: MetricsText | None = None
        self._prev_time_s: float | None = None

    def scrape(self, now_s: float) -> EngineSample:
        """One reading. Any failure becomes ``EngineSample.error`` (the server may come and go)."""
        try:
            page = fetch_metrics(self._client, self.base_url)
        except httpx.HTTPError as exc:
            self._prev = None
            return EngineSample(url=self.base_url, time_s=now_s, error=_describe(exc))
        if not page.values and not page.histograms:
            return EngineSample(url=self.base_url, time_s=now_s, error="no vllm: metrics at /metrics")
        sample = engine_sample(self.base_url, now_s, page, self._prev, self._prev_time_s)
        self._prev, self._prev_time_s = page, now_s
        return sample

    def close(self) -> None:
        self._client.close()


def engine_sample(
    url: str, now_s: float, page: MetricsText, prev: MetricsText | None, prev_time_s: float | None
) -> EngineSample:
    """Combine the current page with the previous one into an :class:`EngineSample`."""
    dt_s = now_s - prev_time_s if prev_time_s is not None else 0.0
    v, pv = page.values, prev.values if prev else {}
    kv = _first(v, KV_CACHE)
    gen = _first(v, GEN_TOKENS)
    prompt = _first(v, PROMPT_TOKENS)
    ttft_cur = page.histograms.get(TTFT)
    ttft_prev = prev.histograms.get(TTFT) if prev else None
    itl_cur = _hist(page, ITL)
    itl_prev = _hist(prev, ITL) if prev else None
    return EngineSample(
        url=url,
        time_s=now_s,
        model_name=page.model_name,
        requests_running=_first(v, RUNNING),
        requests_waiting=_first(v, WAITING),
        kv_cache_usage_pct=kv * 100.0 if kv is not None else None,
        generation_tokens_total=gen,
        prompt_tokens_total=prompt,
        preemptions_total=_first(v, PREEMPTIONS),
        requests_success_total=_first(v, SUCCESS),
        generation_tokens_per_s=_rate(gen, _first(pv, GEN_TOKENS), dt_s) if prev else None,
        prompt_tokens_per_s=_rate(prompt, _first(pv, PROMPT_TOKENS), dt_s) if prev else None,
        ttft_mean_s=_delta_mean(ttft_prev, ttft_cur) if prev else None,
        ttft_p95_s=histogram_delta_quantile(ttft_prev, ttft_cur, 0.95) if prev and ttft_cur else None,
        itl_mean_s=_delta_mean(itl_prev, itl_cur) if prev else None,
    )


def _describe(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "not reachable (connection refused)"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code} from /metrics"
    return type(exc).__name__
