"""Streaming load generator for an OpenAI-compatible ``/v1/completions`` endpoint (vLLM).

A *phase* sends token-id prompts of exact lengths (seeded), asks for a fixed number of output tokens
(``ignore_eos``), streams every answer, and times each request: TTFT, inter-chunk latencies, E2E; output
tokens come from the server's ``usage`` chunk, never from counting chunks. Load is a closed loop of N
streams (``concurrency``) or Poisson arrivals (``rate``, optionally capped); warm-up requests run first and
are not counted. :func:`run_phase` returns a :class:`PhaseResult`: the per-request :class:`RequestResult`
list and the :class:`PhaseStats` computed from it by :func:`compute_stats`. :func:`run_ladder` runs one phase
per concurrency. Metric definitions are vLLM ``bench serve``'s (see REFERENCE.md "Metrics").

Failures a server can cause end up in the request they hit, as ``error_kind`` + a one-line ``error``: the
server dying mid-phase ("connection closed after 17 chunks"), a non-JSON data line, a missing usage chunk, an
HTTP error, silence for ``Timeouts.read_idle_s``, a stream still open at the request's deadline (from its
length and the SLO: ``Timeouts.deadline_s``), an SSE line over 1 MiB, more tokens than ``max_tokens``. The
other requests go on; a phase whose server stops accepting connections, or holds a whole round of requests
open past their deadlines, stops early (``PhaseResult.aborted``) with what it measured so far. A caller can stop a
phase at any time through ``cancel`` (anything with ``is_set()``, e.g. a ``threading.Event`` set from another
thread); in-flight requests are then recorded as ``cancelled`` and left out of the statistics.

The package, one concept per module, each importing only those listed before it (an import-linter layers
contract in pyproject.toml keeps it so): :mod:`~tuner.loadgen.control` (where a server is, its model, JSON
calls, its errors in one line), :mod:`~tuner.loadgen.stats` (what came back, and its statistics),
:mod:`~tuner.loadgen.trace`, :mod:`~tuner.loadgen.dataset`, :mod:`~tuner.loadgen.vocab` and
:mod:`~tuner.loadgen.workload` (the traffic's shape), :mod:`~tuner.loadgen.spec` (what to send),
:mod:`~tuner.loadgen.stream` (one response's SSE parsing and timing), :mod:`~tuner.loadgen.transport` (what a
transport does, the httpx one) and :mod:`~tuner.loadgen.rawhttp` (the raw asyncio HTTP/1.1 client on the hot
path, with the measurements behind it), :mod:`~tuner.loadgen.runner` (a phase, a ladder of phases),
:mod:`~tuner.loadgen.merge` (phases run side by side, as one), :mod:`~tuner.loadgen.steady` (the steady window
and its intervals) and :mod:`~tuner.loadgen.workers` (a phase from several processes, or several replicas).
"""

from tuner.loadgen.control import LoadgenError, discover_model
from tuner.loadgen.runner import CancelToken, FailFast, PhaseProgress, PhaseResult, run_ladder, run_phase
from tuner.loadgen.spec import LoadMode, LoadSpec, RequestSpec, Timeouts, make_requests
from tuner.loadgen.stats import ErrorCount, PhaseStats, RequestResult, compute_stats, percentile
from tuner.loadgen.transport import Transport

__all__ = [
    "CancelToken",
    "ErrorCount",
    "FailFast",
    "LoadMode",
    "LoadSpec",
    "LoadgenError",
    "PhaseProgress",
    "PhaseResult",
    "PhaseStats",
    "RequestResult",
    "RequestSpec",
    "Timeouts",
    "Transport",
    "compute_stats",
    "discover_model",
    "make_requests",
    "percentile",
    "run_ladder",
    "run_phase",
]
