"""Read an inference server's Prometheus ``/metrics`` (vLLM, SGLang, TGI, llama.cpp) into :class:`EngineSample`.

Each engine names its metrics differently; :data:`ENGINES` holds one table per engine, taken from the engine's own
source (cited on each table). What an engine does not publish stays None (shown n/a). Counters become rates over
the last scrape interval; latency histograms (TTFT, time per output token) become the mean and p50/p95/p99 of the
requests observed over a window (60 s by default), from bucket deltas against the oldest page within it.

The parser is a small line-tolerant one rather than ``prometheus_client``'s: that one renames samples (TGI's
counter ``tgi_request_success`` comes back as ``tgi_request_success_total``) and gives up on the whole page at
the first line it cannot read.

A server's page is foreign data: it is read within a deadline and a size cap (:mod:`tuner.telemetry.fetch`),
a value that is not finite is skipped, a page of endless series keeps only the first :data:`MAX_SERIES`, and
every figure handed on is finite and within its unit's range (:mod:`tuner.telemetry.foreign`) or None.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from tuner.redact import redact_url
from tuner.telemetry.fetch import PageError, PageReader
from tuner.telemetry.foreign import BadValue, checked_number, printable
from tuner.telemetry.model import EngineSample

_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
_WORD = re.compile(r"[A-Za-z0-9_.\-]{1,32}")

DEFAULT_LATENCY_WINDOW_S = 60.0
MAX_SERIES = 4096
"""The most metric names kept from one page (a real server publishes a few hundred): the scraper keeps a
minute of pages, so a page of a million names would otherwise hold gigabytes."""
MAX_BUCKETS = 512
"""The most buckets kept per histogram (vLLM's have under 30)."""
MAX_INFO_LABELS = 64
"""The most labels kept from an info metric's series (vLLM's cache_config_info has about 30)."""
MAX_LABEL_CHARS = 64
"""The longest label value kept from an info metric; longer is cut."""


@dataclass(frozen=True)
class EngineMetricNames:
    """Where one engine publishes what :class:`EngineSample` holds. In each tuple the first name found wins
    (older names follow newer ones); an empty tuple means the engine does not publish it."""

    engine: str  # "vllm", "sglang", "tgi", "llamacpp"
    title: str  # how people write the engine's name
    prefix: str  # every metric of the engine starts with it: how a page is recognised
    running: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    kv_cache_fraction: tuple[str, ...] = ()  # 0-1; averaged over label sets (engines, ranks), not summed
    generation_tokens: tuple[str, ...] = ()  # counter
    prompt_tokens: tuple[str, ...] = ()  # counter
    preemptions: tuple[str, ...] = ()  # counter
    requests_success: tuple[str, ...] = ()  # counter
    ttft: tuple[str, ...] = ()  # histogram, seconds
    tpot: tuple[str, ...] = ()  # histogram, seconds: time per output token / inter-token latency
    generation_seconds: tuple[str, ...] = ()  # counter of generating time: mean TPOT without histogram
    generation_rate: tuple[str, ...] = ()  # gauge in tok/s, used only until two pages give a counter rate
    engine_steps: tuple[str, ...] = ()  # counter of engine steps (forward passes)
    cache_info: tuple[str, ...] = ()  # info gauge (value 1) whose labels describe the KV cache
    enable_metrics: str = ""  # what turns /metrics on, for the error line when it is off


# vllm/v1/metrics/loggers.py (PrometheusStatLogger); kv_cache_usage_perc was gpu_cache_usage_perc before v0.10,
# and time_per_output_token_seconds became inter_token_latency_seconds.
# Engine steps: the histogram iteration_tokens_total gets one observation per engine step that produced output for
# a request (PrometheusStatLogger.record observes it once per IterationStats; AsyncLLM's output handler makes one
# IterationStats per EngineCoreOutputs batch, and EngineCore sends one per executed step and API-server client),
# so its _count's rate is steps/s, summed over data-parallel engines (label `engine`). With --api-server-count
# above 1 each API server observes the steps that carried its requests, so one step may count once per API server
# (vLLM's own TODO at the histogram). Steps that only advance a chunked prefill make no output and no count.
# cache_config_info is an info gauge (value 1) whose labels are CacheConfig.metrics_info(): num_gpu_blocks (summed
# over the server's data-parallel engines, vllm/v1/engine/core_client.py, and the same total on every engine's
# series; each TP rank holds that many blocks of its own KV heads), block_size, cache_dtype...
VLLM = EngineMetricNames(
    engine="vllm",
    title="vLLM",
    prefix="vllm:",
    running=("vllm:num_requests_running",),
    waiting=("vllm:num_requests_waiting",),
    kv_cache_fraction=("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
    generation_tokens=("vllm:generation_tokens_total",),
    prompt_tokens=("vllm:prompt_tokens_total",),
    preemptions=("vllm:num_preemptions_total",),
    requests_success=("vllm:request_success_total",),
    ttft=("vllm:time_to_first_token_seconds",),
    tpot=("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    engine_steps=("vllm:iteration_tokens_total_count",),
    cache_info=("vllm:cache_config_info",),
)

# sgl-project/sglang python/sglang/srt/metrics/collector.py (SchedulerMetricsCollector, TokenizerMetricsCollector).
# token_usage is the share of the KV pool's tokens in use; retracted requests are SGLang's preemptions; older
# releases named the TPOT histogram time_per_output_token_seconds. Only served with --enable-metrics.
SGLANG = EngineMetricNames(
    engine="sglang",
    title="SGLang",
    prefix="sglang:",
    running=("sglang:num_running_reqs",),
    waiting=("sglang:num_queue_reqs",),
    kv_cache_fraction=("sglang:token_usage",),
    generation_tokens=("sglang:generation_tokens_total",),
    prompt_tokens=("sglang:prompt_tokens_total",),
    preemptions=("sglang:num_retracted_requests_total",),
    ttft=("sglang:time_to_first_token_seconds",),
    tpot=("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"),
    generation_rate=("sglang:gen_throughput",),
    enable_metrics="start SGLang with --enable-metrics",
)

# huggingface/text-generation-inference router/src/server.rs (request histograms, success counter),
# backends/v3/src/backend.rs (tgi_batch_current_size) and backends/v3/src/queue.rs (tgi_queue_size).
# TGI publishes no TTFT (tgi_request_queue_duration is queue time only) and no KV-cache usage. Its token counts
# are the sums of per-request histograms, recorded when a request ends; tgi_request_mean_time_per_token_duration
# is each request's inference time over its generated tokens (prefill included).
TGI = EngineMetricNames(
    engine="tgi",
    title="TGI",
    prefix="tgi_",
    running=("tgi_batch_current_size",),
    waiting=("tgi_queue_size",),
    generation_tokens=("tgi_request_generated_tokens_sum",),
    prompt_tokens=("tgi_request_input_length_sum",),
    requests_success=("tgi_request_success",),
    tpot=("tgi_request_mean_time_per_token_duration",),
)

# ggml-org/llama.cpp tools/server/server-context.cpp (the /metrics handler; examples/server/server.cpp before the
# move). No histograms: tokens_predicted_seconds_total (generation time summed over slots) over
# tokens_predicted_total gives the mean time per output token. kv_cache_usage_ratio exists in older builds only.
# llama-server serves /metrics only with --metrics.
LLAMACPP = EngineMetricNames(
    engine="llamacpp",
    title="llama.cpp",
    prefix="llamacpp:",
    running=("llamacpp:requests_processing",),
    waiting=("llamacpp:requests_deferred",),
    kv_cache_fraction=("llamacpp:kv_cache_usage_ratio",),
    generation_tokens=("llamacpp:tokens_predicted_total",),
    prompt_tokens=("llamacpp:prompt_tokens_total",),
    generation_seconds=("llamacpp:tokens_predicted_seconds_total",),
    enable_metrics="start llama-server with --metrics",
)

ENGINES: dict[str, EngineMetricNames] = {e.engine: e for e in (VLLM, SGLANG, TGI, LLAMACPP)}
INFO_METRICS = frozenset(name for e in ENGINES.values() for name in e.cache_info)
"""Info metrics whose labels are kept (the first series of each); every other metric's labels are summed away."""


def engine_title(engine: str | None) -> str:
    """How an engine is written on screen; recordings from before engines were told apart are vLLM's."""
    names = ENGINES.get(engine or "vllm")
    return names.title if names else str(engine)


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
    engine: str | None = None  # the engine whose metrics fill most of the page
    series: dict[str, int] = field(default_factory=dict)  # label sets summed into each value
    # The labels of the first series of each of INFO_METRICS on the page: at most MAX_INFO_LABELS of them,
    # each value printable and at most MAX_LABEL_CHARS long.
    info: dict[str, dict[str, str]] = field(default_factory=dict)


def _engine_of_name(name: str) -> str | None:
    for names in ENGINES.values():
        if name.startswith(names.prefix):
            return names.engine
    return None


def parse_metrics(text: str) -> MetricsText:
    """Parse the Prometheus text format, keeping the metrics of known engines. Label sets are summed (several
    engines or ranks of one server); lines that do not parse, values that are not finite, and series past
    :data:`MAX_SERIES` are skipped. The labels of an info metric (:data:`INFO_METRICS`) are kept, bounded.
    Never raises, whatever the page holds."""
    values: dict[str, float] = defaultdict(float)
    info: dict[str, dict[str, str]] = {}
    series: dict[str, int] = defaultdict(int)
    histograms: dict[str, Histogram] = defaultdict(Histogram)
    per_engine: dict[str, int] = defaultdict(int)
    model_name: str | None = None
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        name, labels_text, raw = m.group(1), m.group(3) or "", m.group(4)
        engine = _engine_of_name(name)
        value = _finite(raw)
        if engine is None or value is None:
            continue
        per_engine[engine] += 1
        labels = dict(_LABEL.findall(labels_text)) if labels_text else {}
        if name in INFO_METRICS and name not in info:
            info[name] = {
                key: printable(text, MAX_LABEL_CHARS) for key, text in list(labels.items())[:MAX_INFO_LABELS]
            }
        if model_name is None:
            # SGLang releases before model_name labelled their metrics with `name`.
            model_name = labels.get("model_name") or (labels.get("name") if engine == "sglang" else None)
        le = labels.get("le") if name.endswith("_bucket") else None
        if le is not None:
            base = name[: -len("_bucket")]
            bound = math.inf if le in ("+Inf", "Inf") else _finite(le)
            if bound is None or not _room(base, histograms, values):
                continue  # a bucket bound that is no number says nothing
            hist = histograms[base]
            if bound in hist.buckets or len(hist.buckets) < MAX_BUCKETS:
                hist.buckets[bound] = hist.buckets.get(bound, 0.0) + value
        elif _room(name, values, histograms):
            values[name] += value
            series[name] += 1
    # `_sum` and `_count` may come before the buckets: attach them once every histogram is known.
    for base, hist in histograms.items():
        hist.total_sum = values.pop(base + "_sum", 0.0)
        hist.count = values.pop(base + "_count", 0.0)
    engine = max(per_engine, key=per_engine.__getitem__) if per_engine else None
    model = printable(model_name) if model_name else None
    return MetricsText(dict(values), dict(histograms), model, engine, dict(series), info)


def _finite(text: str) -> float | None:
    """A sample value or bucket bound as a finite float; None for NaN, infinities and anything else."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _room(name: str, mine: Mapping[str, object], other: Mapping[str, object]) -> bool:
    """Whether ``name`` is known already or the page may still add a series."""
    return name in mine or len(mine) + len(other) < MAX_SERIES


def _first(page: MetricsText | None, names: tuple[str, ...], *, mean: bool = False) -> float | None:
    """The first of ``names`` on the page; ``x_sum``/``x_count`` also name a histogram's sum and count."""
    if page is None:
        return None
    for name in names:
        if name in page.values:
            value = page.values[name]
            return value / max(1, page.series.get(name, 1)) if mean else value
        for suffix in ("_sum", "_count"):
            hist = page.histograms.get(name[: -len(suffix)]) if name.endswith(suffix) else None
            if hist is not None:
                return hist.total_sum if suffix == "_sum" else hist.count
    return None


def _info_label(page: MetricsText, names: tuple[str, ...], label: str) -> str | None:
    for name in names:
        if name in page.info:
            return page.info[name].get(label)
    return None


def _info_count(page: MetricsText, names: tuple[str, ...], label: str, field_name: str) -> int | None:
    """A positive whole number from an info metric's label, within the range of ``field_name``; None for
    anything else (vLLM writes "None" where it has not set a value)."""
    text = _info_label(page, names, label)
    if text is None or not text.isascii() or not text.isdecimal() or len(text) > 15:
        return None
    try:
        count = int(checked_number(int(text), field_name, int))
    except BadValue:
        return None
    return count or None


def _info_word(page: MetricsText, names: tuple[str, ...], label: str) -> str | None:
    """A short identifier ("auto", "fp8_e4m3") from an info metric's label; None for anything else."""
    text = _info_label(page, names, label)
    return text if text is not None and _WORD.fullmatch(text) else None


def _hist(page: MetricsText | None, names: tuple[str, ...]) -> Histogram | None:
    if page is None:
        return None
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


def _quantiles(
    base: Histogram | None, cur: Histogram | None
) -> tuple[float | None, float | None, float | None]:
    if cur is None:
        return None, None, None
    p50, p95, p99 = (histogram_delta_quantile(base, cur, q) for q in (0.50, 0.95, 0.99))
    return p50, p95, p99


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


def _ratio_of_deltas(
    page: MetricsText, base: MetricsText, num: tuple[str, ...], den: tuple[str, ...]
) -> float | None:
    n1, n0, d1, d0 = _first(page, num), _first(base, num), _first(page, den), _first(base, den)
    if n1 is None or n0 is None or d1 is None or d0 is None or d1 - d0 <= 0 or n1 < n0:
        return None
    return (n1 - n0) / (d1 - d0)


def names_for(page: MetricsText, engine: str | None = None) -> EngineMetricNames:
    """The table for ``engine``, else for the engine the page's metric names say (vLLM when nothing says)."""
    return ENGINES.get(engine or page.engine or "vllm", VLLM)


def engine_sample(
    url: str,
    now_s: float,
    page: MetricsText,
    prev: MetricsText | None,
    prev_time_s: float | None,
    *,
    engine: str | None = None,
    window_base: MetricsText | None = None,
    window_base_time_s: float | None = None,
) -> EngineSample:
    """Combine the current page with earlier ones into an :class:`EngineSample`.

    Rates cover the interval since ``prev``; latency quantiles and means cover the window since ``window_base``
    (the previous page when none is given).
    """
    names = names_for(page, engine)
    if window_base is None:
        window_base, window_base_time_s = prev, prev_time_s
    dt_s = now_s - prev_time_s if prev_time_s is not None else 0.0
    kv = _first(page, names.kv_cache_fraction, mean=True)
    gen = _first(page, names.generation_tokens)
    prompt = _first(page, names.prompt_tokens)
    gen_rate = _rate(gen, _first(prev, names.generation_tokens), dt_s) if prev else None
    if gen_rate is None and prev is None:
        gen_rate = _first(page, names.generation_rate, mean=False)
    ttft: tuple[float | None, float | None, float | None] = (None, None, None)
    tpot: tuple[float | None, float | None, float | None] = (None, None, None)
    ttft_mean = tpot_mean = window_s = None
    if window_base is not None and window_base_time_s is not None:
        ttft_cur, ttft_base = _hist(page, names.ttft), _hist(window_base, names.ttft)
        tpot_cur, tpot_base = _hist(page, names.tpot), _hist(window_base, names.tpot)
        ttft, tpot = _quantiles(ttft_base, ttft_cur), _quantiles(tpot_base, tpot_cur)
        ttft_mean = _delta_mean(ttft_base, ttft_cur)
        tpot_mean = _delta_mean(tpot_base, tpot_cur)
        if tpot_cur is None and names.generation_seconds:
            tpot_mean = _ratio_of_deltas(page, window_base, names.generation_seconds, names.generation_tokens)
        window_s = now_s - window_base_time_s
    return _in_range(
        EngineSample(
            url=url,
            time_s=now_s,
            engine=names.engine,
            model_name=page.model_name,
            requests_running=_first(page, names.running),
            requests_waiting=_first(page, names.waiting),
            kv_cache_usage_pct=kv * 100.0 if kv is not None else None,
            generation_tokens_total=gen,
            prompt_tokens_total=prompt,
            preemptions_total=_first(page, names.preemptions),
            requests_success_total=_first(page, names.requests_success),
            generation_tokens_per_s=gen_rate,
            prompt_tokens_per_s=_rate(prompt, _first(prev, names.prompt_tokens), dt_s) if prev else None,
            ttft_mean_s=ttft_mean,
            ttft_p50_s=ttft[0],
            ttft_p95_s=ttft[1],
            ttft_p99_s=ttft[2],
            itl_mean_s=tpot_mean,
            tpot_p50_s=tpot[0],
            tpot_p95_s=tpot[1],
            tpot_p99_s=tpot[2],
            latency_window_s=window_s,
            steps_per_s=_rate(_first(page, names.engine_steps), _first(prev, names.engine_steps), dt_s)
            if prev
            else None,
            kv_cache_blocks=_info_count(page, names.cache_info, "num_gpu_blocks", "kv_cache_blocks"),
            kv_block_size_tokens=_info_count(page, names.cache_info, "block_size", "kv_block_size_tokens"),
            kv_cache_dtype=_info_word(page, names.cache_info, "cache_dtype"),
        )
    )


def _in_range(sample: EngineSample) -> EngineSample:
    """Each figure finite and within its unit's range, else None: sums of a hostile page's huge values, and
    rates or quantiles over them, must not reach the screen as infinity or NaN."""
    bad: dict[str, Any] = {}
    for f in dataclasses.fields(sample):
        value = getattr(sample, f.name)
        if isinstance(value, float) and f.name != "time_s":
            try:
                checked_number(value, f.name)
            except BadValue:
                bad[f.name] = None
    return dataclasses.replace(sample, **bad) if bad else sample


def _went_backwards(prev: MetricsText, page: MetricsText, names: EngineMetricNames) -> bool:
    """A counter or histogram count that fell: the server restarted, older pages no longer subtract."""
    for counter in (names.generation_tokens, names.prompt_tokens, names.engine_steps):
        before, now = _first(prev, counter), _first(page, counter)
        if before is not None and now is not None and now < before:
            return True
    for hist_names in (names.ttft, names.tpot):
        before_h, now_h = _hist(prev, hist_names), _hist(page, hist_names)
        if before_h is not None and now_h is not None and now_h.count < before_h.count:
            return True
    return False


def fetch_metrics(client: httpx.Client, base_url: str) -> MetricsText:
    """GET and parse ``base_url``/metrics. Raises httpx.HTTPError (unreachable, timeout, non-2xx)."""
    response = client.get(f"{base_url.rstrip('/')}/metrics")
    response.raise_for_status()
    return parse_metrics(response.text)


class EngineScraper:
    """Scrapes one inference server. Keeps the pages of the last ``window_s`` seconds: the previous one turns
    counters into rates, the oldest one gives the window's latency quantiles.

    Each read ends within ``timeout_s`` and refuses a page over ``MAX_PAGE_BYTES`` (a server found on the box
    is not trusted to behave). Readings name the server by its URL without credentials."""

    def __init__(
        self,
        base_url: str,
        *,
        engine: str | None = None,
        timeout_s: float = 0.8,
        reader: PageReader | None = None,
        window_s: float = DEFAULT_LATENCY_WINDOW_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = redact_url(self.base_url)  # how its readings name it
        self.engine = engine  # None: told by the page's metric names
        self.window_s = window_s
        self._reader = reader or PageReader(deadline_s=timeout_s)
        self._pages: deque[tuple[float, MetricsText]] = deque()

    def scrape(self, now_s: float) -> EngineSample:
        """One reading. Any failure becomes ``EngineSample.error`` (the server may come and go)."""
        try:
            body = self._reader.get(f"{self.base_url}/metrics")
        except PageError as exc:
            self._pages.clear()
            return EngineSample(url=self.url, time_s=now_s, engine=self.engine, error=self._describe(exc))
        page = parse_metrics(body.decode("utf-8", errors="replace"))
        if not page.values and not page.histograms:
            return EngineSample(
                url=self.url,
                time_s=now_s,
                engine=self.engine,
                error="no inference-server metrics at /metrics",
            )
        names = names_for(page, self.engine)
        if self._pages and (self._pages[-1][0] >= now_s or _went_backwards(self._pages[-1][1], page, names)):
            self._pages.clear()
        while self._pages and self._pages[0][0] < now_s - self.window_s:
            self._pages.popleft()
        prev_time_s, prev = self._pages[-1] if self._pages else (None, None)
        base_time_s, base = self._pages[0] if self._pages else (None, None)
        sample = engine_sample(
            self.url,
            now_s,
            page,
            prev,
            prev_time_s,
            engine=names.engine,
            window_base=base,
            window_base_time_s=base_time_s,
        )
        self._pages.append((now_s, page))
        return sample

    def _describe(self, exc: PageError) -> str:
        if exc.status is None:
            return str(exc)
        hint = ENGINES[self.engine].enable_metrics if self.engine in ENGINES else ""
        off = exc.status in (404, 501) and hint
        return f"HTTP {exc.status} from /metrics" + (f" ({hint})" if off else "")

    def close(self) -> None:
        self._reader.close()
