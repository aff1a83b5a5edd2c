"""The engine without a Trainer: detectors as pure functions, the fp16 scaler path, history, JSON."""

from __future__ import annotations

import json
import math

import torch

from gradguard import Guard, Report
from gradguard.engine.detectors import Thresholds, diagnose
from gradguard.engine.history import History
from gradguard.engine.stats import GroupContext, StepStats
from gradguard.engine.trends import Trends

GROUPS = {
    "vision": GroupContext("vision", "vision", False, False),
    "proj": GroupContext("proj", "connector", True, True),
    "lm": GroupContext("lm", "language", True, False),
}


def stats(step=1, loss=1.0, norms=None, **kw) -> StepStats:
    norms = norms or {"proj": 1.0, "lm": 2.0}
    return StepStats(
        step=step,
        losses=[loss],
        supervised=[8],
        group_norm=norms,
        group_nonfinite={g: int(not math.isfinite(v)) for g, v in norms.items()},
        group_nonzero={g: 1 for g in norms},
        group_fired={g: 1 for g in norms},
        **kw,
    )


def test_forward_origin_is_the_first_group_in_execution_order() -> None:
    s = stats(
        loss=math.nan,
        norms={"proj": math.nan, "lm": math.nan},
        group_outputs=[("vision", 0, 3.0), ("proj", 0, math.inf), ("lm", 0, math.nan)],
    )
    d = diagnose(s, GROUPS, first_bad_grad=("lm", "lm.weight"))
    finding, origin, evidence = d.finding, d.origin, d.evidence
    assert finding.kind == "nonfinite_loss" and origin.phase == "forward"
    assert (origin.group, origin.role, origin.trainable) == ("proj", "connector", True)
    before = next(e for e in evidence if e["kind"] == "finite_outputs_before")
    assert before["value"] == {"vision": 3.0} and before["text"] == "finite outputs before it (abs-max): vision: 3"


def test_backward_origin_when_the_forward_was_finite() -> None:
    s = stats(norms={"proj": math.nan, "lm": math.nan}, group_outputs=[("proj", 0, 1.0), ("lm", 0, 1.0)])
    d = diagnose(s, GROUPS, first_bad_grad=("lm", "lm.weight"))
    finding, origin = d.finding, d.origin
    assert (finding.kind, origin.phase, origin.group) == ("nonfinite_grad", "backward", "lm")


def test_data_faults_come_first() -> None:
    s = stats(loss=math.nan, inputs=[(0, "pixel_values", math.nan)])
    assert diagnose(s, GROUPS).finding.kind == "nonfinite_input"
    s = stats(loss=math.nan)
    s.supervised = [0]
    assert diagnose(s, GROUPS).origin.phase == "data"


def test_scaler_overflow_is_not_a_fault_but_a_collapsing_scale_is() -> None:
    s = stats(norms={"proj": math.inf, "lm": 1.0}, scaler_active=True, loss_scale=2.0**-3)
    assert diagnose(s, GROUPS) is None
    trends = Trends(Thresholds(scaler_skips=3))
    found = [
        f
        for i in range(1, 5)
        for f in trends.update(stats(i, norms={"proj": math.inf, "lm": 1}, scaler_active=True), GROUPS)
    ]
    assert [(f.kind, f.severity, f.step) for f in found] == [("loss_scale_collapse", "error", 3)]


def test_spike_explosion_and_collapse_use_the_runs_own_history() -> None:
    trends = Trends(Thresholds(warmup=10, window=20))
    found = []
    for i in range(1, 31):
        # healthy noise: loss ~2 +- 5%, norms ~1e3 (large but normal for this run)
        noise = 1 + 0.05 * math.sin(i)
        found += trends.update(stats(i, loss=2 * noise, norms={"proj": 1e3 * noise, "lm": 5e-3 * noise}), GROUPS)
    assert found == []
    found = trends.update(stats(31, loss=9.0, norms={"proj": 1e3, "lm": 5.0}), GROUPS)
    assert sorted((f.kind, f.group) for f in found) == [("grad_explosion", "lm"), ("loss_spike", None)]
    steady = {"proj": 1e3, "lm": 5e-3}
    collapse = [f for i in range(32, 40) for f in trends.update(stats(i, loss=1e-6, norms=steady), GROUPS)]
    assert [f.kind for f in collapse] == ["loss_collapse"]


def test_lora_b_zero_start_is_not_dead_but_a_silent_group_is() -> None:
    trends = Trends(Thresholds(dead_steps=3))
    first = stats(1)
    first.group_nonzero = {"proj": 1, "lm": 1}  # lora_A grads are 0 on step 1, lora_B's are not
    assert trends.update(first, GROUPS) == []
    found = []
    for i in range(2, 6):
        s = stats(i)
        s.group_fired = {"proj": 0, "lm": 1}
        found += trends.update(s, GROUPS)
    assert [(f.kind, f.group, f.severity, f.step) for f in found] == [("dead_gradient", "proj", "error", 4)]


def test_history_stays_bounded() -> None:
    h = History(capacity=64)
    for step in range(1, 100_001):
        h.add(step, {"loss": 1.0})
    assert len(h.rows) < 64 and h.rows[-1]["step"] > 100_000 - h.stride and h.rows[0]["step"] <= h.stride


def test_plain_loop_with_an_fp16_grad_scaler() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=1000)
    guard = Guard(model, opt, scaler=scaler, console=False, thresholds={"scaler_skips": 4})
    for step in range(1, 9):
        loss = model(torch.randn(8, 4)).pow(2).mean()
        scaler.scale(loss * (1e30 if step >= 3 else 1)).backward()  # overflowing gradients from step 3
        scaler.unscale_(opt)
        if not guard.check():
            break
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    report = guard.close()
    assert report.history["skipped_steps"][:3] == [3, 4, 5]
    assert report.fault.kind == "loss_scale_collapse" and report.fault.step == 6


def test_report_json_is_strict_and_round_trips_nan() -> None:
    model = torch.nn.Linear(2, 1)
    guard = Guard(model, console=False)
    model(torch.full((1, 2), math.nan)).sum().backward()
    assert not guard.check()
    report = guard.close()
    text = report.to_json()
    assert "NaN" in text and "nan" not in text.replace("NaN", "").replace("nonfinite", "").lower().replace(
        "non-finite", ""
    )
    data = json.loads(text)  # strict JSON: NaN became the string "NaN"
    assert Report.from_dict(data).fault.kind == report.fault.kind


def test_every_front_door_rejects_bad_options_at_construction() -> None:
    import pytest

    from gradguard import GradGuard
    from gradguard.integrations.lightning import GradGuardCallback

    for make in (lambda **kw: Guard(torch.nn.Linear(2, 1), console=False, **kw), GradGuard, GradGuardCallback):
        with pytest.raises(ValueError, match="on_fault must be one of"):
            make(on_fault="halt")
        with pytest.raises(ValueError, match="trace must be None or 'full'"):
            make(trace="everything")
    assert GradGuardCallback(trace="full").trace == "full"


def test_gradient_norms_are_pre_clip_per_backward_and_fall_back_at_check() -> None:
    """Norms are taken when each backward ends (one fused call in one process), so clipping cannot change
    them; with gradient accumulation they are the accumulated gradient's; a float64 or sparse gradient takes
    the per-tensor path; and a gradient set by hand, without a backward, is not a step the hooks report."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {"body": torch.nn.Linear(4, 4), "emb": torch.nn.Embedding(10, 4, sparse=True), "wide": torch.nn.Linear(4, 1)}
    )
    model["wide"].double()
    guard = Guard(model, console=False)
    assert guard.probes is not None and guard.probes.batched

    def loss(x: torch.Tensor) -> torch.Tensor:
        h = model["body"](x) + model["emb"](torch.tensor([1, 2]))
        return 100 * model["wide"](h.double()).sum()

    for x in (torch.randn(2, 4), torch.randn(2, 4)):  # two micro-batches, accumulated
        loss(x).backward()
    expected = {g: math.sqrt(sum(p.grad.to_dense().norm().item() ** 2 for p in model[g].parameters())) for g in model}
    torch.nn.utils.clip_grad_norm_([p for n, p in model.named_parameters() if "emb" not in n], 1e-3)
    assert guard.check()
    assert guard.last is not None and set(guard.last.group_norm) == set(expected)
    for group, norm in expected.items():
        assert math.isclose(guard.last.group_norm[group], norm, rel_tol=1e-5), (group, norm, guard.last.group_norm)

    for p in model.parameters():  # no backward at all: the hooks never fire, nothing is read
        p.grad = None
    model["body"].weight.grad = torch.ones(4, 4)
    last, steps = guard.last, guard.step
    assert guard.check()  # nothing recorded since the last check: no step to count, nothing read
    assert guard.step == steps and guard.last is last
    guard.close()


def test_a_backward_that_raised_does_not_leave_the_next_without_its_pre_clip_norms() -> None:
    """The norms' end-of-backward callback is queued once per backward (autograd graph task): a backward
    that raised after some gradients arrived never ran its callback, and the next one still gets its own."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    guard = Guard(model, console=False)
    x = torch.randn(8, 4)

    def boom(grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a user's backward hook failed")

    hidden = model[1](model[0](x))
    hidden.register_hook(boom)  # fires after the last layer's gradients were accumulated
    try:
        (100 * model[2](hidden)).sum().backward()
    except RuntimeError:
        pass
    model.zero_grad(set_to_none=True)  # the user skips this step and goes on

    (100 * model(x)).sum().backward()
    expected = math.sqrt(sum(p.grad.norm().item() ** 2 for p in model.parameters()))
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    assert guard.check()
    got = math.sqrt(sum(v**2 for v in guard.last.group_norm.values()))
    assert math.isclose(got, expected, rel_tol=1e-5), (got, expected)
    guard.close()
