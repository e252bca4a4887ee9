"""What to launch next: the two search strategies, asked for proposals best first as GPUs free up.

* :class:`PredictedStrategy` (a performance model covers the GPU): vLLM's defaults first (the reference every
  result is compared with), then the best calibrated predictions of *node* capacity that could still beat the
  incumbent (:class:`tuner.predict.rank.Ranker`), one per configuration family not yet tried first, so that trials
  side by side explore rather than repeat one another (a family with a trial still running counts as tried);
  while trials still run, GPUs the contenders leave idle measure the incumbent's neighbours in what the model does
  not see (batched tokens, memory fraction); it has nothing more to propose when nothing runs and no untried
  configuration could win given the model's error so far.
* :class:`EvidenceStrategy`: from vLLM's defaults, every move the incumbent's evidence argues for
  (:func:`tuner.tuning.search.propose_moves`: a full KV cache asks for an FP8 one, a queue for a larger batch ...).

Both see the search through :class:`SearchView` (the tuner), record each trial as it ends, and never propose a
candidate already tried or running.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, Protocol

from tuner.predict.rank import Ranker
from tuner.tuning.space import Candidate, SearchSpace

__all__ = ["EvidenceStrategy", "Outcome", "PredictedStrategy", "SearchView", "Strategy"]

Proposal = tuple[Candidate, str]  # a candidate and why it is proposed


Outcome = Any
"""A finished trial (tuner.tuning.tune.TrialOutcome): strategies read its ``candidate`` and hand it back to the
view, which knows what else it holds."""


class SearchView(Protocol):
    """What a strategy asks of the tuner."""

    space: SearchSpace
    parallel: int

    def predicted_node(self, candidate: Candidate) -> float | None: ...
    def node_measured(self, outcome: Outcome) -> float: ...
    def argued_for(self, base: Outcome, tried: set[str]) -> dict[str, str]: ...
    def next_moves(self, base: Outcome, tried: set[str], *, record: bool = True) -> list[Proposal]: ...
    def defaults_that_fit(self, defaults: Candidate) -> list[Proposal]: ...
    def note_refusal(self, outcome: Outcome) -> None: ...


class Strategy(Protocol):
    stop_note: str | None  # why the search ended when it has nothing left to propose

    def propose(self, tried: set[str], incumbent: Outcome | None) -> list[Proposal]: ...
    def record(self, outcome: Outcome) -> None: ...
    def expected_left(self) -> int: ...


DEFAULTS_WHY = "vLLM's defaults: the configuration to beat"
HIDDEN = ("max_num_batched_tokens", "gpu_memory_utilization")  # what a performance model does not see
HIDDEN_WHY = "GPUs otherwise idle: the best's neighbour in what the model does not see"


def family(candidate: Candidate) -> Hashable:
    """Configurations a performance model tends to get wrong together: weights and KV-cache precision, and TP
    (vLLM's default, unset, is one GPU: the defaults calibrate the one-GPU family they belong to)."""
    return (candidate.quantization, candidate.kv_cache_dtype, candidate.tensor_parallel_size or 1)


class PredictedStrategy:
    """Predict, then measure, ranked by the node's capacity (see the module docstring)."""

    stop_note: str | None = "no untried configuration could beat the best, given the model's error so far"

    def __init__(self, view: SearchView, outcomes: Mapping[str, Outcome], defaults: Candidate) -> None:
        self.view = view
        self.candidates = {
            c.key(): c for c in [defaults, *view.space.feasible()]
        }  # the defaults calibrate too
        predicted = {k: view.predicted_node(c) or 0.0 for k, c in self.candidates.items()}
        self.ranker = Ranker(predicted, family=lambda k: family(self.candidates[k]))
        for key, outcome in outcomes.items():  # a resumed run's trials calibrate the model too
            if key in predicted:
                self.ranker.record(key, view.node_measured(outcome))
        self.queue: list[Proposal] = [(defaults, DEFAULTS_WHY)]

    def propose(self, tried: set[str], incumbent: Outcome | None) -> list[Proposal]:
        proposals = [(c, why) for c, why in self.queue if c.key() not in tried]
        argued = self.view.argued_for(incumbent, tried) if incumbent is not None else {}
        seen = set(tried) | {c.key() for c, _ in proposals}
        top = self.ranker.next(seen, prefer=list(argued))
        pending = {k for k in tried if k in self.candidates and k not in self.ranker.measured}  # running
        # While trials still run, GPUs the contenders leave idle measure the incumbent's neighbours in what the
        # model does not see; when nothing runs and nothing could win, the search ends as before.
        hidden = self.hidden_neighbours(incumbent, seen) if pending and incumbent is not None else []
        if top is None:
            return proposals + [
                (self.candidates[k], HIDDEN_WHY) for k in hidden[: max(1, self.view.parallel)]
            ]
        # One per configuration family not yet tried, proposed or running first (one trial calibrates a whole
        # family), however far down the ranking it is, then the next best of any family. The ranker's top goes
        # first unless its family is already being explored by a trial still running: the tuner starts the
        # first proposal whose GPUs are free, and trials side by side should explore, not repeat one another.
        families = {family(self.candidates[k]) for k in tried if k in self.candidates}
        families |= {family(c) for c, _ in proposals}
        top_family = family(self.candidates[top])
        busy = {family(self.candidates[k]) for k in pending} | {family(c) for c, _ in proposals}
        running = top_family in busy
        families.add(top_family)
        first: list[str] = []
        later: list[str] = []
        for key in self.ranker.contenders(seen | {top}):
            f = family(self.candidates[key])
            if f in families:
                later.append(key)
            else:
                first.append(key)
                families.add(f)
        ordered = [*first, top, *later] if running else [top, *first, *later]
        for key in ordered[: max(1, self.view.parallel)]:
            why = self.ranker.why(key)
            proposals.append((self.candidates[key], f"{argued[key]}; {why}" if key in argued else why))
        chosen = set(ordered)
        spare = max(0, self.view.parallel - len(ordered))
        proposals += [(self.candidates[k], HIDDEN_WHY) for k in hidden if k not in chosen][:spare]
        return proposals

    def hidden_neighbours(self, incumbent: Outcome, seen: set[str]) -> list[str]:
        """The incumbent's untried neighbours in what the model does not see (HIDDEN: the prefill budget, the
        memory fraction), its other settings kept, best calibrated prediction first."""
        base = incumbent.candidate
        if base.key() not in self.candidates:
            return []
        keys: list[str] = []
        for name in HIDDEN:
            for value in self.view.space.values.get(name, ()):
                key = base.with_values(**{name: value}).key()
                if key in self.candidates and key not in seen and self.ranker.predicted.get(key, 0) > 0:
                    keys.append(key)
        return sorted(dict.fromkeys(keys), key=lambda k: -self.ranker.expected(k))

    def record(self, outcome: Outcome) -> None:
        key = outcome.candidate.key()
        if key in self.ranker.predicted:
            self.ranker.record(key, self.view.node_measured(outcome))

    def expected_left(self) -> int:
        return len(self.ranker.contenders(set(self.ranker.measured)))


class EvidenceStrategy:
    """The coordinate search from vLLM's defaults, every move the evidence argues for proposed at once."""

    stop_note: str | None = None

    def __init__(self, view: SearchView, defaults: Candidate) -> None:
        self.view = view
        self.queue: list[Proposal] = [(defaults, DEFAULTS_WHY), *view.defaults_that_fit(defaults)]
        self.last: Outcome | None = None

    def propose(self, tried: set[str], incumbent: Outcome | None) -> list[Proposal]:
        queued = [(c, why) for c, why in self.queue if c.key() not in tried]
        if queued:
            return queued
        base = incumbent or self.last
        return self.view.next_moves(base, tried) if base is not None else []

    def record(self, outcome: Outcome) -> None:
        self.last = outcome
        self.view.note_refusal(outcome)

    def expected_left(self) -> int:
        return len(self.view.next_moves(self.last, set(), record=False)) if self.last is not None else 1
