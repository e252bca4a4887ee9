"""Keys of the tune screen, and what each column and mark means."""

from __future__ import annotations

from tui.screens.help import MarkdownHelpScreen

HELP = """\
# infertop tune

| key | does |
|---|---|
| `s` | stop the tuning run (asks first): the server is stopped, finished trials are kept, the app stays open |
| `q` | quit (asks first while a run is active, then stops it) |
| `?` | this help (`esc` closes it) |
| `↑` `↓` `←` `→` | move through the trial table (`→` reaches the reason column) |

## The trial table
One row per launched configuration. **status**: `running`, `feasible` (met the SLO at some concurrency),
`infeasible` (launched, but no concurrency met the SLO), `failed` (the server did not start or crashed:
the reason says why), `interrupted` (stopped by you or the budget), `skipped` (not launched).
The numbers are from the trial's best phase that met the SLO — the highest **out tok/s** (output tokens/s
of the whole server) at concurrency **conc** (simultaneous users) — and are dimmed while the trial runs.

- **TTFT p95** — time to first token, 95th percentile over the phase's requests.
- **tok/s/user** — per-user output speed as the SLO judges it: 1 / TPOT p95, so 95 % of requests streamed
  at least this fast.
- **bound** — what limited the phase: `mem BW` (GPU DRAM bandwidth), `compute` (SMs / tensor cores),
  `KV/queue` (KV cache full or requests waiting), `frontend` (the GPU idles: the API server or the client
  set the pace), `client` (the load generator ran out of CPU), `engine` (no GPU telemetry: the CPU build),
  `unclear`.

## SLO vs concurrency
Each measured concurrency of the current trial (the best trial once the run ends). The `┃` mark is the
SLO's limit, mid-bar: the TTFT bar must end left of it, the per-user speed bar must reach past it.
`✓` the phase met the whole SLO (errors included), `×` it did not.

## Best so far
The configuration with the most output tok/s within the SLO, and its ratio over vLLM's defaults measured
in the same run (`1.31x` = 31 % more tokens per second at the same SLO).
"""


class TuneHelpScreen(MarkdownHelpScreen):
    """The tune screen's keys and what its columns and marks mean."""

    def __init__(self) -> None:
        super().__init__(HELP)
