"""Keys, and what each number on screen means (the honest definitions matter more than the keys)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Markdown

HELP = """\
# infertop

| key | does |
|---|---|
| `q` | quit |
| `?` | this help (`esc` closes it) |
| `p` / `space` | pause / resume sampling |
| `c` | compact GPU rows / full cards |
| `s` / `r` | process sort (VRAM, CPU, GPU, PID) / reverse it |
| `↑` `↓` | select a process |
| `k` | send SIGTERM to the selected process, after asking (see *Processes* below) |
| `R` | start / stop recording to a new NDJSON file (replay with `infertop --replay FILE`) |
| `tab`, `enter` | in the fleet (`infertop --host URL`): move to a host, open or close its GPUs and servers |

## Processes
- **COMMAND** shows each command line with its secrets masked (`--api-key ***`, `HF_TOKEN=***`, a URL's user
  and password). infertop masks them as it reads them, so nothing it shows, records or reports holds them and
  a screenshot or a shared terminal leaks none; the exporter serves no command lines at all. `ps -o args -p PID`
  shows the full line to whoever may read it.
- **`k`** asks first (`y`/`n`), then sends SIGTERM (a request to stop, never SIGKILL) as the user running
  infertop: the system lets it reach that user's own processes only (any process when infertop runs as root),
  and another user's process gets "not allowed". A pid of another PID namespace (a container's) is never
  signalled: here that number names a different process.
- **Recordings** (`R`, `--record`, `infertop record`) are private to you (mode 0600) and replace no file
  unless told to (`--force`).

## What the numbers are
- **DRAM BW** — real DRAM bandwidth: % of the GPU's peak, and GB/s (10⁹ bytes/s) = % × peak. Decode is
  memory-bound, so this is the number that says how hard inference works the GPU. Three sources, each named:
  - **GPM** (NVML, Hopper and newer): measured, every reading.
  - **DCGM** (`DCGM` on the card; below, `via DCGM ≤n s old`: how old it may be): DCGM's profiling counter
    "DRAM active", read from a local nv-hostengine or dcgm-exporter (`--dcgm`). Measured on A100, L4 and
    Hopper alike, but sampled by DCGM at its own interval (dcgm-exporter: every 30 s by default), so it lags.
  - **est.** (italic, yellow): an ESTIMATE, not a measurement, while an inference server runs on the GPU and
    nothing measures it: the bytes its decode steps must read (weights per GPU + the KV cache in use) × its
    step rate. It counts no activations, prefill or writes, so it reads below the counters (BENCHMARKS.md).
  `n/a` where none applies (with the reason where GPM stops answering); the card then shows the duty cycles.
- **mem busy** — NVML's older "memory utilization": the % of time memory was read or written (a duty cycle).
  It is *not* bandwidth: 60 % busy is often 25 % of peak bandwidth.
- **util** — % of time any kernel ran (duty cycle). **SM active** (GPM or DCGM) — how many SMs were busy;
  **tensor** — tensor-core pipes active.
- **Power** — board power now (W, NVML's instantaneous reading; its 1 s average where the driver has no
  instantaneous one) against the enforced limit. **energy** — counter since the driver loaded.
- **throttle** — clock-event reasons: power cap, thermal, HW slowdown, board limit, reliability… `none` means
  clocks run free; `other(0x…)` is a reason this version has no name for (it counts as throttling). In
  brackets: the share of the window the sparklines show (its length in seconds) that each reason held.
- **Processes: SM, MEM BUSY** — the driver's per-process samples (`nvmlDeviceGetProcessUtilization`): % of
  time the process had a kernel running, and % of time it read or wrote memory. Duty cycles, not bandwidth;
  `n/a` where the driver has no sample for it (it ran nothing lately; MIG and some GPUs never report them).
- **Inference servers** (vLLM, SGLang, TGI, llama.cpp) — from each server's `/metrics`: requests running and
  waiting, KV-cache use, generated tokens/s; **TTFT** and **TPOT** p50/p95/p99 of the requests of the last
  minute (estimated from the server's histogram buckets; `n/a` where the server keeps no histogram: TGI has no
  TTFT, llama.cpp no histograms at all).
- **J/token**, **tok/s/W** — the energy counters of the GPUs holding the server's processes over its
  generated-tokens counter, in the last minute: energy per output token, and its inverse. "all GPUs" where the
  server's processes are not known; `n/a`, with why, where the GPUs have no energy counter or several servers
  share GPUs nobody can attribute.
- **Fleet** — other hosts read from their `infertop exporter` each second: one line per host (mean DRAM BW and
  SM over its GPUs, VRAM, power against the sum of limits in kW, hottest GPU, tokens/s, throttled or lost GPUs).
  **stale Ns** — the host stopped answering (or its exporter's readings stopped) N s ago: its last state, dimmed.
  **down** — it never answered, with why.

## Scales of the sparklines
Every sparkline has a fixed scale, the same on every GPU, so one GPU's 0 % looks like 0 % beside another's
50 %: percentages (DRAM BW, SM active, util, mem busy) on 0–100 %, DRAM BW thus on the GPU's peak, power on
0 W to its power limit. A cell is as tall as its value in eighths of the scale (▄ is half); the lowest block
is 0 (or near it), a blank is no reading. Only the vLLM tokens/s line has no ceiling: it is scaled to its
own window, a shape rather than an amount. Each cell averages 4 readings (a second at the default 4 Hz).

`n/a` always means the GPU, driver or server does not report it: never a hidden zero.
"""


class MarkdownHelpScreen(ModalScreen[None]):
    """A modal page of Markdown over the current screen; esc, ``?`` or ``q`` closes it."""

    DEFAULT_CSS = """
    MarkdownHelpScreen { align: center middle; }
    MarkdownHelpScreen > VerticalScroll {
        width: 90%; max-width: 100; height: 90%;
        border: round $accent; background: $surface; padding: 0 1;
    }
    """
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "Close")]

    def __init__(self, markdown: str) -> None:
        super().__init__()
        self._markdown = markdown

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Markdown(self._markdown)


class HelpScreen(MarkdownHelpScreen):
    """The monitor's keys and what its numbers mean."""

    def __init__(self) -> None:
        super().__init__(HELP)
