"""The decision chain's pure parts: ``policy.decide`` over every combination it can be given, a ``Diagnosis``'s
trip between ranks, and the trend detectors' checkpoint state.

``decide`` is checked against the contract written out below as a table of rules, for every finding kind of
``gradguard.codes`` at every severity, every ``on_fault``, one process and two ranks (agreed or not), a static
and a runtime origin, before and after a stop.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math

import pytest

from gradguard.codes import RULES
from gradguard.engine import policy
from gradguard.engine.detectors import Thresholds
from gradguard.engine.diagnosis import Diagnosis, fact
from gradguard.engine.stats import GroupContext, StepStats
from gradguard.engine.trends import Trends
from gradguard.report.model import Finding, Origin

KINDS = sorted({r.kind for r in RULES.values()})
COMBINATIONS = list(
    itertools.product(
        KINDS,
        ("error", "warning", "info"),
        ("stop", "raise", "warn"),
        ((1, True), (2, True), (2, False)),  # (world, the ranks' flags marked this step)
        ("static", "forward"),
        (True, False),  # static_stop_raises
        (False, True),  # stopped already
    )
)


def expected(kind, severity, on_fault, world, agreed, phase, static_raises, stopped) -> dict[str, bool]:
    """The contract, one rule per line: what each combination must do."""
    none = dict(record=False, skip_update=False, stop=False, raise_error=False, let_through=False, defer=False)
    if stopped:  # after a stop nothing more reaches the weights
        return {**none, "skip_update": True, "stop": True}
    if severity != "error":  # warnings and infos are recorded by the journal; training goes on
        return none
    if world > 1 and not agreed:  # a rank alone never acts: it defers, all ranks stop at the next step
        return {**none, "defer": True}
    if on_fault == "warn":  # recorded; a non-finite update is let through, as asked
        return {**none, "record": True, "let_through": kind.startswith("nonfinite")}
    raises = on_fault == "raise" or (phase == "static" and static_raises)
    return {**none, "record": True, "skip_update": True, "stop": True, "raise_error": raises}


def test_decide_follows_the_contract_for_every_combination() -> None:
    assert len(COMBINATIONS) > 2000  # every kind: the product really is exhaustive
    wrong = []
    for kind, severity, on_fault, (world, agreed), phase, static_raises, stopped in COMBINATIONS:
        finding = dataclasses.replace(Finding.of(kind, "message", "hint", step=3), severity=severity)
        diagnosis = Diagnosis(finding, Origin(phase=phase))
        action = policy.decide(
            diagnosis, on_fault, world=world, agreed=agreed, stopped=stopped, static_stop_raises=static_raises
        )
        again = policy.decide(
            diagnosis, on_fault, world=world, agreed=agreed, stopped=stopped, static_stop_raises=static_raises
        )
        got = {k: getattr(action, k) for k in ("record", "skip_update", "stop", "raise_error", "let_through", "defer")}
        want = expected(kind, severity, on_fault, world, agreed, phase, static_raises, stopped)
        if got != want or action != again:
            wrong.append((kind, severity, on_fault, world, agreed, phase, static_raises, stopped, got, want))
        if action.raise_error:  # TrainingHealthError carries a sentence that names the fault
            assert finding.code in action.reason and kind in action.reason
    assert not wrong, wrong[:5]


def test_no_diagnosis_is_no_action() -> None:
    for on_fault in ("stop", "raise", "warn"):
        assert policy.decide(None, on_fault) == policy.CONTINUE
        assert policy.decide(None, on_fault, stopped=True) == policy.STOPPED


def test_a_diagnosis_survives_the_trip_between_ranks() -> None:
    finding = Finding.of("nonfinite_loss", "step 3: the raw loss is nan", "check the loss", "resampler", step=3)
    origin = Origin(phase="forward", module="resampler.kv_proj", group="resampler", role="connector", trainable=True)
    diagnosis = Diagnosis(finding, origin).with_evidence(
        fact("raw_loss", "raw loss per micro-batch: [nan]", value=[math.nan]),
        fact("first_nonfinite_output", "first non-finite forward output", group="resampler", micro_batch=0),
    )
    wire = json.loads(json.dumps(diagnosis.to_plain()))  # what the ranks exchange: plain JSON
    back = Diagnosis.from_plain(wire)
    assert back.finding == diagnosis.finding and back.origin == diagnosis.origin
    assert [e["kind"] for e in back.evidence] == ["raw_loss", "first_nonfinite_output"]
    assert math.isnan(back.evidence[0]["value"][0]) and back.evidence[1]["group"] == "resampler"


def _stats(step: int, loss: float, norm: float, ratio: float, lr: float, finite: bool = True) -> StepStats:
    return StepStats(
        step=step,
        losses=[loss],
        supervised=[8],
        group_norm={"llm": norm},
        group_nonfinite={"llm": 0 if finite else 1},
        group_nonzero={"llm": 4},
        group_fired={"llm": 4},
        group_ran={"llm": True},
        update_ratio={"llm": ratio},
        lr={"llm": lr},
        vocab=320,
        scaler_active=True,
        loss_scale=1024.0,
    )


def test_trend_state_round_trips_through_a_checkpoint_and_resumes_identically() -> None:
    """A resumed run continues every detector's state: the same findings as a run that never stopped."""
    groups = {"llm": GroupContext("llm", "language", True, True)}
    th = Thresholds(warmup=5)
    run = [_stats(s, 5.0 - 0.01 * s, 1.0 + 0.01 * (s % 3), 1e-3, 1e-4, finite=s % 7 != 0) for s in range(1, 30)]
    run += [_stats(30, 60.0, 500.0, 1e-12, 1e-4)]  # a divergence and an explosion, after the resume
    run += [_stats(s, 5.0, 1.0, 1e-12, 1e-4) for s in range(31, 40)]  # weights that stop moving

    straight = Trends(th)
    straight_findings = [(f.kind, f.step) for s in run for f in straight.update(s, groups)]

    first = Trends(th)
    resumed_findings = [(f.kind, f.step) for s in run[:20] for f in first.update(s, groups)]
    saved = json.loads(json.dumps(first.state_dict()))  # a checkpoint is plain JSON
    resumed = Trends(th)
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == first.state_dict()  # every field of every detector came back
    resumed_findings += [(f.kind, f.step) for s in run[20:] for f in resumed.update(s, groups)]

    assert resumed_findings == straight_findings
    assert {"grad_explosion", "no_update"} <= {kind for kind, _ in straight_findings}, straight_findings


@pytest.mark.parametrize("part", ["loss", "norms", "groups", "updates", "scaler"])
def test_every_detector_field_is_in_the_checkpoint(part: str) -> None:
    trends = Trends(Thresholds())
    detector = getattr(trends, part)
    saved = trends.state_dict()[part]
    assert set(saved) == {f.name for f in dataclasses.fields(detector) if f.name != "th"}
