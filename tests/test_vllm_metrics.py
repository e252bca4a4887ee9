"""Parsing vLLM's /metrics and turning counters and histograms into interval values."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tuner.telemetry.vllm_metrics import (
    EngineScraper,
    Histogram,
    engine_sample,
    histogram_delta_quantile,
    parse_metrics,
)

DATA = Path(__file__).parent / "data"
PAGE_A = (DATA / "vllm_metrics_a.txt").read_text()
PAGE_B = (DATA / "vllm_metrics_b.txt").read_text()


def test_parse_reads_gauges_counters_and_sums_label_sets() -> None:
    page = parse_metrics(PAGE_A)
    assert page.values["vllm:num_requests_running"] == 64
    assert page.values["vllm:num_requests_waiting"] == 3
    assert page.values["vllm:request_success_total"] == 100  # two finished_reason label sets summed
    assert page.model_name == "meta-llama/Llama-3.1-8B"
    assert "python_gc_objects_collected_total" not in page.values
    ttft = page.histograms["vllm:time_to_first_token_seconds"]
    assert ttft.count == 100 and ttft.total_sum == 20
    assert ttft.buckets[0.5] == 80 and ttft.buckets[float("inf")] == 100


def test_first_sample_has_gauges_but_no_rates() -> None:
    sample = engine_sample("http://x", 10.0, parse_metrics(PAGE_A), None, None)
    assert sample.requests_running == 64
    assert sample.kv_cache_usage_pct == pytest.approx(43.12)
    assert sample.generation_tokens_per_s is None
    assert sample.ttft_mean_s is None


def test_rates_and_interval_histograms_between_two_pages() -> None:
    a, b = parse_metrics(PAGE_A), parse_metrics(PAGE_B)
    sample = engine_sample("http://x", 12.0, b, a, 10.0)
    assert sample.generation_tokens_per_s == pytest.approx(2500.0)  # 5000 tokens in 2 s
    assert sample.prompt_tokens_per_s == pytest.approx(1024.0)
    assert sample.ttft_mean_s == pytest.approx(0.3)  # 6 s over 20 new requests
    # 20 new requests: 10 in (0.1, 0.5], 10 in (0.5, 1.0]; rank 19 lies 90 % into the second bucket.
    assert sample.ttft_p95_s == pytest.approx(0.95)


def test_counter_reset_gives_no_rate_rather_than_a_negative_one() -> None:
    a, b = parse_metrics(PAGE_A), parse_metrics(PAGE_B)
    sample = engine_sample("http://x", 12.0, a, b, 10.0)  # server restarted: counters went down
    assert sample.generation_tokens_per_s is None


def test_older_kv_cache_metric_name_is_accepted() -> None:
    page = parse_metrics('vllm:gpu_cache_usage_perc{model_name="m"} 0.5\n')
    assert engine_sample("u", 0, page, None, None).kv_cache_usage_pct == 50.0


def test_values_that_are_not_finite_are_skipped_and_sums_that_overflow_are_none() -> None:
    page = parse_metrics(
        "vllm:num_requests_running inf\n"
        "vllm:num_requests_waiting NaN\n"
        'vllm:generation_tokens_total{engine="0"} 1e308\n'
        'vllm:generation_tokens_total{engine="1"} 1e308\n'  # finite each, infinite summed
        'vllm:time_to_first_token_seconds_bucket{le="nan"} 5\n'
        'vllm:time_to_first_token_seconds_bucket{le="1e999"} 5\n'
        "vllm:kv_cache_usage_perc 0.5\n"
    )
    assert "vllm:num_requests_running" not in page.values and "vllm:num_requests_waiting" not in page.values
    assert page.histograms == {}  # bounds that are no finite number say nothing
    sample = engine_sample("u", 0.0, page, None, None)
    assert sample.requests_running is None and sample.generation_tokens_total is None  # n/a, not inf
    assert sample.kv_cache_usage_pct == 50.0


def test_quantile_beyond_last_finite_bucket_is_its_lower_bound() -> None:
    cur = Histogram(buckets={1.0: 0.0, float("inf"): 10.0}, total_sum=50.0, count=10.0)
    assert histogram_delta_quantile(None, cur, 0.95) == 1.0


def test_quantile_of_an_empty_interval_is_none() -> None:
    h = Histogram(buckets={1.0: 5.0, float("inf"): 5.0}, total_sum=1.0, count=5.0)
    assert histogram_delta_quantile(h, h, 0.5) is None


class _Handler(http.server.BaseHTTPRequestHandler):
    pages: list[str] = []

    def do_GET(self) -> None:
        if self.path != "/metrics":
            self.send_error(404)
            return
        body = (self.pages.pop(0) if self.pages else PAGE_B).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def metrics_server() -> Iterator[str]:
    _Handler.pages = [PAGE_A, PAGE_B]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_scraper_over_http(metrics_server: str) -> None:
    scraper = EngineScraper(metrics_server)
    first = scraper.scrape(100.0)
    second = scraper.scrape(102.0)
    scraper.close()
    assert first.error is None and first.requests_waiting == 3
    assert second.generation_tokens_per_s == pytest.approx(2500.0)


def test_scraper_reports_an_unreachable_server_as_an_error_not_an_exception() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sample = EngineScraper(f"http://127.0.0.1:{port}", timeout_s=0.5).scrape(1.0)
    assert sample.error is not None and "refused" in sample.error
    assert sample.requests_running is None
