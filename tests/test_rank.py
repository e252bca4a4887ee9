"""Predict, then measure: the ranker launches the best calibrated prediction first, corrects the model per
family after each trial, and stops when nothing untried could beat the incumbent."""

from __future__ import annotations

import math
import random

import pytest

from tuner.predict.rank import Ranker


def family(key: str) -> str:
    return key.split("/")[0]


PREDICTED = {"bf16/a": 10.0, "bf16/b": 9.5, "fp8/a": 14.0, "fp8/b": 13.0, "fp8/c": 6.0, "tp2/a": 0.0}


def test_with_no_trial_the_highest_prediction_goes_first_and_nonfitting_never() -> None:
    ranker = Ranker(PREDICTED, family=family)
    assert ranker.next() == "fp8/a"
    ranker.record("fp8/a", 14.0)
    assert ranker.calibration("fp8/b")[0] == pytest.approx(1.0)
    assert "tp2/a" not in [ranker.next(tried={"fp8/b", "bf16/a", "bf16/b", "fp8/c"})]


def test_a_family_measured_below_its_prediction_hands_the_lead_to_another() -> None:
    ranker = Ranker(PREDICTED, family=family)
    ranker.record("fp8/a", 7.0)  # the model was 2x optimistic for FP8 here
    ratio, error = ranker.calibration("fp8/b")
    assert ratio == pytest.approx(0.5) and error < ranker.prior_error
    assert ranker.expected("fp8/b") == pytest.approx(6.5)
    # bf16 has no trial of its own: the bias seen (0.5x) is a hint, with the prior's width kept.
    assert ranker.calibration("bf16/a")[1] >= ranker.prior_error
    # bf16 has no trial yet and could be off by the model's whole error: one trial there comes first.
    assert ranker.next() == "bf16/a"
    assert Ranker(PREDICTED, family=family, explore_families=False, measured={"fp8/a": 7.0}).next() == "fp8/b"
    ranker.record("bf16/a", 10.5)
    assert ranker.incumbent() == ("bf16/a", 10.5)
    assert ranker.next() == "bf16/b"  # fp8 now measured below it: only bf16 can still win


def test_it_stops_when_nothing_untried_could_beat_the_incumbent() -> None:
    ranker = Ranker({"a/1": 10.0, "a/2": 5.0, "b/1": 4.0}, family=family)
    ranker.record("a/1", 10.0)
    assert ranker.next() is None  # 5 x (1 + 2 x 0.25) = 7.5 < 10.2
    assert "expect" in ranker.why("a/2")


def test_on_a_random_landscape_it_finds_the_best_with_a_fraction_of_the_launches() -> None:
    """A small landscape like the benchmark's: 6 families x 8 configs, 20 % family and 5 % config errors."""
    hits, launches = 0, []
    for seed in range(30):
        rng = random.Random(seed)
        predicted = {f"f{f}/{c}": rng.uniform(5, 15) for f in range(6) for c in range(8)}
        bias = {f"f{f}": rng.gauss(0, 0.2) for f in range(6)}
        truth = {k: p * math.exp(bias[family(k)] + rng.gauss(0, 0.05)) for k, p in predicted.items()}
        ranker = Ranker(predicted, family=family)
        while len(ranker.measured) < len(predicted) // 4 and (key := ranker.next()) is not None:
            ranker.record(key, truth[key])
        best = ranker.incumbent()
        assert best is not None
        launches.append(len(ranker.measured))
        hits += truth[best[0]] >= 0.95 * max(truth.values())
    assert hits >= 27  # 90 % of the seeds
    assert max(launches) <= 12


def test_the_evidence_breaks_what_the_model_cannot_tell_apart_and_nothing_more() -> None:
    ranker = Ranker({"a/1": 10.0, "a/2": 9.6, "a/3": 6.0}, family=family)
    assert ranker.next(prefer=["a/2"]) == "a/2"  # within the model's 25 % of the top: the evidence decides
    assert ranker.next(prefer=["a/3"]) == "a/1"  # 40 % below: the model's ranking stands
    ranker.record("a/1", 10.0)
    assert ranker.next(prefer=["a/2"]) == "a/2"  # still a contender: 9.6 x 1.0 x (1 + 2 x 0.05 + ...) > 10.2


def test_a_family_member_keeps_its_own_error_however_many_trials_its_family_has() -> None:
    """What the model does not see (batched tokens, memory fraction, load) moves each member off its family's
    mean: the family's trials pin the mean, not the member, so a member just below the incumbent stays open."""
    predicted = {**{f"a/{i}": 10.0 for i in range(6)}, "a/6": 9.2, "a/7": 9.2}
    measured = {f"a/{i}": 10.0 for i in range(6)}
    new = Ranker(predicted, family=family, measured=dict(measured))
    old = Ranker(predicted, family=family, config_error=0.0, measured=dict(measured))
    # six equal trials shrink the prior, not down to the floor
    assert new.calibration("a/6")[1] > 1.2 * new.floor_error
    assert old.calibration("a/6")[1] == pytest.approx(old.floor_error)  # the old rule: down to the floor
    assert new.next() == "a/6"  # 8 % below the incumbent's prediction: it could still win
    assert old.next() is None  # the old rule stopped here: 9.2 x (1 + 2 x 0.05) < 10.2


def test_the_spread_seen_within_families_widens_the_error() -> None:
    predicted = {f"a/{i}": 10.0 for i in range(6)}
    calm = Ranker(predicted, family=family, measured={"a/0": 10.0, "a/1": 10.1, "a/2": 9.9})
    wild = Ranker(predicted, family=family, measured={"a/0": 13.0, "a/1": 7.0, "a/2": 10.0})
    assert calm.within_family_error() < calm.config_error < wild.within_family_error()
    assert wild.calibration("a/3")[1] > calm.calibration("a/3")[1]


def test_a_batch_takes_one_per_unexplored_family_first_then_the_best_and_skips_running_ones() -> None:
    predicted = {"a/1": 14.0, "a/2": 13.5, "b/1": 10.0, "b/2": 9.0, "c/1": 8.0, "d/1": 0.0}
    ranker = Ranker(predicted, family=family)
    assert ranker.next_batch(k=4) == ["a/1", "b/1", "c/1", "a/2"]
    assert ranker.next_batch(k=2) == ["a/1", "b/1"]
    # a running trial is not offered again, and its family counts as explored
    assert ranker.next_batch(running={"a/1"}, k=3) == ["b/1", "c/1", "a/2"]
    assert ranker.next_batch(tried={"a/1", "b/1", "c/1"}, running={"a/2"}, k=8) == ["b/2"]
    assert "d/1" not in ranker.next_batch(k=8)  # predicted not to fit: never
    assert ranker.next_batch(k=0) == []
    assert ranker.next_batch(tried=set(predicted), k=8) == []
    done = Ranker({"a/1": 10.0, "x/1": 3.0}, family=family)
    done.record("a/1", 10.0)  # x/1 could reach 3 x (1 + 2 x 0.25) = 4.5 at best
    assert done.next_batch(k=8) == [] and done.next() is None


def test_calibrations_are_cached_per_family_and_follow_every_new_trial() -> None:
    """A search asks for every candidate's calibration after each trial: computed once per family, and never
    stale, whether a trial is recorded or given at construction."""
    calls: list[str] = []

    def counted(key: str) -> str:
        calls.append(key)
        return family(key)

    ranker = Ranker(PREDICTED, family=counted, measured={"fp8/a": 7.0})
    assert ranker.calibration("fp8/b")[0] == pytest.approx(0.5)
    assert ranker.calibration("fp8/c") == ranker.calibration("fp8/b")
    before = len(calls)
    ranker.contenders()
    ranker.contenders()
    assert len(calls) - before <= len(PREDICTED)  # each key's family looked up once, not per call
    ranker.record("fp8/b", 13.0)
    ratio, _ = ranker.calibration("fp8/c")
    assert ratio == pytest.approx(math.exp((math.log(0.5) + math.log(1.0)) / 2))
