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
| `↑` `↓` `←` `→` | move through the trial table (`→` reaches the reason column); a row above the newest: \
that trial in the panels below; the newest row: follow the trial active last |

## The trial table
One row per launched configuration. **status**: `running`, `feasible` (some load met the SLO),
`infeasible` (launched, but no load met the SLO), `failed` (the server did not start, crashed, or refused
every request: the reason says why), `interrupted` (stopped by you or the budget), `skipped` (not launched).
**GPUs**: the GPUs its server held (`4-7`); **layout**: how the configuration fills the node (`8 x TP 1`:
eight servers of one GPU; `2 x TP 4 (…idle)` counts GPUs left idle as lost); **node**: the capacity of the
whole node so filled (one server's capacity times its replicas), what the search ranks by. A `!` after the
status: trials running beside it disturbed its measurement (host CPU busy, throttling); the reason says how.
The numbers are from the trial's capacity: the highest **load** that met the SLO — requests/s arriving at
random (Poisson, the default objective) or concurrent users (`--objective users`) — with the **out tok/s**
of the whole server there; dimmed while the trial runs. The **proof** row is vLLM relaunched from the
exported file (status `proven`, `backed off` or `not proven`); its numbers are from the load it was proven at.

- **TTFT p95** — time to first token, 95th percentile over the steady part of the load (ramp-up and drain
  left out).
- **tok/s/user** — per-user output speed as the SLO judges it: 1 / TPOT p95, so 95 % of requests streamed
  at least this fast.
- **bound** — what limited the phase: `mem BW` (GPU DRAM bandwidth), `compute` (SMs / tensor cores),
  `KV/queue` (KV cache full or requests waiting), `frontend` (the GPU idles: the API server or the client
  set the pace), `client` (the load generator ran out of CPU), `engine` (no GPU telemetry: the CPU build),
  `unclear`.

## SLO vs load
Each load measured on the current trial (the best trial once the run ends), in the order measured. Dim rows
are *scouting* phases (short closed-loop runs that find the server's pace); the others are judged with 90 %
intervals. The `┃` mark is the SLO's limit, mid-bar: the TTFT bar must end left of it, the per-user speed bar
must reach past it. `✓` the whole interval met the SLO, `×` it failed, `?` at the limit: an interval still
straddled a limit after measuring more, which counts as not passing. On a narrow screen `12.5/s` is
12.5 requests/s and `64u` 64 users.

## The node
Trials run at once on the node's GPUs, one per slot. The node panel has a line (a cell, on a narrow screen)
per GPU: the trial holding it (`#3`, in that trial's colour) and what it does (`start`: its server is
starting, `scout`, `judged`, `proof`, `prod`: the production check), or `idle`; then the GPU's readings:
**BW** DRAM bandwidth in % of peak (GPM or DCGM; `~` marks the decode-traffic estimate; `busy` is the memory duty
cycle where there is neither), power against
its limit, VRAM. **ETA** in the header: the tuner's estimate of the time left, counted down; `?` until it can
tell (or once it has run out).

## Current trial
The trial active last (or the one selected in the table), its GPUs and layout. The load under way: its role
(`scout`, `judged`, `proof`, `production`), how many requests are done, and the server's output tok/s.
`measure again`: the host was busy with other work, so the phase is measured
again; `measure further`: an interval straddled a limit, so more requests are measured. The log says why.

## Best so far
The configuration with the highest capacity within the SLO, and its ratio over vLLM's defaults measured in
the same run: capacity over capacity (`1.76x the defaults (9.13 req/s)`: 76 % more requests/s within the
SLO), or output tok/s over tok/s when the two loads are not of one kind (`the defaults' tok/s`). One
configuration beats another only when it held a load the other failed; otherwise they tie and the one closer
to vLLM's defaults is kept (`= ties with …`, or `(a tie)` on a short screen; the log has the whole note).

## The verdict
At the end vLLM is relaunched from the exported file: the capacity point again (the **proof**), then 75 % of
it held longer (the **production check**), backing off if it does not hold. `PROVEN`, `PROVEN AFTER BACKING
OFF` or `NOT PROVEN` heads the result, the report and the exported file, and is shown whole when the run
ends (green when proven, red when not, yellow when stopped).
"""


class TuneHelpScreen(MarkdownHelpScreen):
    """The tune screen's keys and what its columns and marks mean."""

    def __init__(self) -> None:
        super().__init__(HELP)
