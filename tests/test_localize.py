"""Localisation: replay the faulty step with tracing on, name the exact module, and triage the fault.

Real HF ``Trainer`` runs where the callback would be used; ``localize`` called directly on a ``Guard`` in a
plain loop where the test needs to look at the state before and after a replay.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import torch
from conftest import trainer_args
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import Trainer

from gradguard import GradGuard, Guard
from gradguard.engine.localize import localize
from gradguard.engine.trace import Recorder, locate
from gradguard.report.model import Origin, Report
from gradguard.report.render import to_markdown, to_text
from gradguard.testing.faults import inject_nan
from gradguard.testing.models import FAMILIES, TinyDataset, make_batch, tiny_llama, tiny_llava, tiny_minicpmv2


def train(model: nn.Module, tmp_path, callback: GradGuard, **args: Any) -> Trainer:
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, **{"max_steps": 4, **args}),
        train_dataset=TinyDataset(model, n=16),
        callbacks=[callback],
    )
    trainer.train()
    return trainer


def localization(tmp_path) -> dict[str, Any]:
    """The localisation as a program reads it: from the JSON report on disk."""
    report = Report.load(tmp_path)
    assert report.fault is not None and report.fault.localization is not None
    return report.fault.localization


# -- the exact module, in the real Trainer ----------------------------------------------------------------


def test_connector_fault_is_localised_to_the_resampler_sub_module(tmp_path) -> None:
    # The seed story: LoRA on the language model, the resampler trained through modules_to_save.
    model = get_peft_model(
        tiny_minicpmv2(),
        LoraConfig(
            r=4, target_modules=r"llm\..*layers\.\d+\.self_attn\.(q_proj|v_proj)", modules_to_save=["resampler"]
        ),
    )
    resampler = model.get_base_model().resampler.modules_to_save["default"]  # the copy that trains
    with inject_nan(resampler.kv_proj, start=3):
        train(model, tmp_path, GradGuard(console=False, strict=True))
    loc = localization(tmp_path)
    # PEFT's `base_model.model.` and `modules_to_save.default` segments are gone from the path.
    assert loc["module"] == "resampler.kv_proj" and loc["class"] == "Linear"
    assert (loc["group"], loc["role"], loc["trainable"], loc["phase"]) == ("resampler", "connector", True, "forward")
    assert (loc["verdict"], loc["source"], loc["micro_batch"], loc["value"]) == ("deterministic", "replay", 0, "nan")
    assert loc["inputs_finite"] is True
    # The frames: the ramp of abs-max values leading into the module, which is the last one.
    last = loc["frames"][-1]
    assert last["module"] == "resampler.kv_proj" and last["output_absmax"] == "NaN"
    assert math.isfinite(last["input_absmax"]) and last["dtype"] == "float32"
    assert all(math.isfinite(f["output_absmax"]) for f in loc["frames"][:-1])
    # Console and Markdown show the module and the verdict.
    report = Report.load(tmp_path)
    for text in (to_text(report), to_markdown(report)):
        assert "resampler.kv_proj (Linear; group resampler, role connector, trainable)" in text
        assert "deterministic" in text
    assert "localized" in (tmp_path / "gradguard-report.md").read_text()


def test_llava_projector_linear_is_localised(tmp_path) -> None:
    model = tiny_llava()
    (projector,) = FAMILIES["llava"].paths("connector")  # transformers 5 (and >= 4.52): model.multi_modal_projector
    with inject_nan(model.get_submodule(f"{projector}.linear_2"), start=2):
        train(model, tmp_path, GradGuard(console=False, strict=True), max_steps=2)
    loc = localization(tmp_path)
    assert loc["module"] == f"{projector}.linear_2"
    assert (loc["group"], loc["role"], loc["verdict"]) == (projector, "connector", "deterministic")


def test_head_output_is_judged_by_the_loss_and_a_nan_there_is_still_localised(tmp_path) -> None:
    """The logits a returned loss was computed from are not read again (the loss's check covers them, and
    they are the step's largest activation); logits without a loss still are. A NaN born in ``lm_head``
    is a loss fault that names the head, and the replay pins it to the module."""
    model = tiny_llama()
    batch = make_batch(model)
    guard = Guard(model, console=False)
    model(**batch).loss.backward()
    assert guard.check()
    assert [g for g, _, _ in guard.last.group_outputs] == ["model"]  # lm_head: covered by the loss
    labels = batch.pop("labels")
    logits = model(**batch).logits  # a loss computed outside the model: the head's output is read
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).backward()
    assert guard.check()
    assert [g for g, _, _ in guard.last.group_outputs] == ["model", "lm_head"]
    guard.close()

    model = tiny_llama()
    with inject_nan(model.lm_head, start=2):
        train(model, tmp_path, GradGuard(console=False, strict=True), max_steps=2)
    report = Report.load(tmp_path)
    assert report.fault is not None and report.fault.kind == "nonfinite_loss"
    assert "the head (`lm_head`" in report.fault.message and report.fault.origin.phase == "forward"
    loc = localization(tmp_path)
    assert (loc["module"], loc["group"], loc["role"], loc["verdict"]) == ("lm_head", "lm_head", "head", "deterministic")


def test_backward_only_nan_is_localised_to_its_decoder_layer(tmp_path) -> None:
    model = tiny_llama()
    with inject_nan(model.model.layers[1].mlp, phase="backward", start=2):
        train(model, tmp_path, GradGuard(console=False, strict=True), max_steps=2)
    loc = localization(tmp_path)
    assert loc["phase"] == "backward" and loc["verdict"] == "deterministic"
    assert loc["module"].startswith("model.layers.1.")  # the MLP whose backward produced the NaN
    assert loc["module"] == "model.layers.1.mlp" and loc["gradient_into"] == "model.layers.1.mlp.down_proj"
    assert (loc["group"], loc["role"], loc["trainable"]) == ("model", "language", True)
    kinds = [f["gradient"] for f in loc["frames"]]
    assert kinds[-1] == "output" and loc["frames"][-1]["absmax"] == "NaN"


def test_fault_in_a_frozen_vision_layer_is_localised_with_trainable_false(tmp_path) -> None:
    model = tiny_llava()
    (tower,) = FAMILIES["llava"].paths("vision")  # transformers 5 (and >= 4.52): model.vision_tower
    model.get_submodule(tower).requires_grad_(False)
    # transformers 4.x's CLIPVisionModel wraps its encoder in `.vision_model`; 5.x's does not
    layer = next(
        name for name, _ in model.named_modules() if name.startswith(tower) and name.endswith("encoder.layers.0")
    )
    with inject_nan(model.get_submodule(layer), start=2):
        train(model, tmp_path, GradGuard(console=False, strict=True), max_steps=2)
    loc = localization(tmp_path)
    assert loc["module"] == layer and loc["class"] == "CLIPEncoderLayer"
    assert (loc["group"], loc["role"], loc["trainable"], loc["phase"]) == (
        tower,
        "vision",
        False,
        "forward",
    )


# -- triage: deterministic or transient -------------------------------------------------------------------


@pytest.mark.parametrize("trace", [None, "full"])
def test_one_off_fault_is_transient(tmp_path, trace) -> None:
    # times=1: the NaN is injected into the original forward only, so the replay does not see it.
    model = tiny_llama()
    with inject_nan(model.model.layers[0].self_attn.o_proj, start=2, times=1):
        train(model, tmp_path, GradGuard(console=False, strict=True, trace=trace), max_steps=2)
    loc = localization(tmp_path)
    assert loc["verdict"] == "transient"
    assert loc["replays"] == [
        {"micro_batch": 0, "reproduced": False, "original_loss": "NaN", "replay_loss": loc["replays"][0]["replay_loss"]}
    ]
    assert math.isfinite(loc["replays"][0]["replay_loss"])
    assert "hardware" in loc["advice"] and "Megatron" in loc["advice"]
    if trace is None:
        assert loc["module"] is None  # nothing to point at without the trace of the original step
    else:  # the trace of the original step still names the module
        assert (loc["module"], loc["source"], loc["phase"]) == ("model.layers.0.self_attn.o_proj", "trace", "forward")
        assert loc["trace"]["module"] == loc["module"]


def test_persistent_fault_is_deterministic_and_the_trace_agrees(tmp_path) -> None:
    model = tiny_llama()
    with inject_nan(model.model.layers[0].self_attn.o_proj, start=2):
        train(model, tmp_path, GradGuard(console=False, strict=True, trace="full"), max_steps=2)
    loc = localization(tmp_path)
    assert (loc["verdict"], loc["source"], loc["module"]) == (
        "deterministic",
        "replay",
        "model.layers.0.self_attn.o_proj",
    )
    assert loc["trace"]["module"] == loc["module"] and not loc["notes"]


def test_gradient_accumulation_names_the_faulty_micro_batch(tmp_path) -> None:
    model = tiny_llama()
    with inject_nan(model.model.layers[0].mlp.up_proj, start=2):  # the 2nd micro-batch of step 1
        train(
            model,
            tmp_path,
            GradGuard(console=False, strict=True),
            max_steps=2,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=1,
        )
    report = Report.load(tmp_path)
    loc = report.fault.localization
    assert report.fault.step == 1
    assert (loc["module"], loc["micro_batch"], loc["verdict"]) == ("model.layers.0.mlp.up_proj", 1, "deterministic")


# -- the replay itself, called directly on a Guard in a plain loop --------------------------------------


class _NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def _nan_grad_for_single_samples(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor | None:
    """A data-dependent backward fault: NaN gradient only for a micro-batch of one sample."""
    return _NaNGrad.apply(out) if out.shape[0] == 1 else None


def snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "grad_values": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "opt": [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()} for s in opt.state.values()],
        "buffers": [b.clone() for b in model.buffers()],
        "rng": torch.get_rng_state(),
        "training": [m.training for m in model.modules()],
    }


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    assert all(x is y for x, y in zip(a["grads"], b["grads"]))  # the very same .grad tensors…
    assert all((x is None and y is None) or torch.equal(x, y) for x, y in zip(a["grad_values"], b["grad_values"]))
    assert len(a["opt"]) == len(b["opt"]) > 0
    for sa, sb in zip(a["opt"], b["opt"]):
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) if isinstance(sa[k], torch.Tensor) else sa[k] == sb[k] for k in sa)
    assert all(torch.equal(x, y) for x, y in zip(a["buffers"], b["buffers"]))
    assert torch.equal(a["rng"], b["rng"]) and a["training"] == b["training"]


def test_replay_leaves_state_bitwise_unchanged_with_dropout_and_accumulation() -> None:
    model = tiny_llama(attention_dropout=0.3)  # dropout on: the replay must draw the same masks
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    guard = Guard(model, opt, console=False, strict=True)
    batches = [make_batch(model, batch_size=2, seed=0), make_batch(model, batch_size=1, seed=1)]
    for _ in range(2):  # optimizer state exists before the step that is replayed
        for b in batches:
            model(**b).loss.backward()
        assert guard.check()
        opt.step()
        opt.zero_grad()
    for b in batches:  # the step to replay: two micro-batches, gradients accumulated
        model(**b).loss.backward()
    before = snapshot(model, opt)
    loc = localize(model, guard.probes, Origin(phase="backward"))
    assert_same(before, snapshot(model, opt))
    # Nothing was wrong, so nothing reproduces; the replay drew the same dropout masks: the losses match.
    assert loc["verdict"] == "transient" and [r["micro_batch"] for r in loc["replays"]] == [0, 1]
    assert all(r["replay_loss"] == r["original_loss"] for r in loc["replays"])
    # The probes' record of the step is intact: the guard checks it as if no replay had happened.
    assert guard.check() and len(guard.last.losses) == 2
    report = guard.close()
    assert report.status == "healthy"


def test_replay_finds_a_data_dependent_backward_fault_in_the_second_micro_batch() -> None:
    model = tiny_llama()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = Guard(model, opt, console=False, strict=True)
    handle = model.model.layers[1].mlp.register_forward_hook(_nan_grad_for_single_samples)
    try:
        for b in (make_batch(model, batch_size=2), make_batch(model, batch_size=1)):
            model(**b).loss.backward()
        assert not guard.check()  # the guard stops: gradients are NaN, both losses finite
    finally:
        handle.remove()
    fault = guard.fault
    assert fault is not None and fault.kind == "nonfinite_grad"
    loc = fault.localization
    assert (loc["verdict"], loc["micro_batch"], loc["phase"]) == ("deterministic", 1, "backward")
    assert loc["module"] == "model.layers.1.mlp"
    assert [(r["micro_batch"], r["reproduced"]) for r in loc["replays"]] == [(0, False), (1, True)]
    guard.close()


class _Net(nn.Module):
    """A plain module with BatchNorm (running stats change in a training forward) returning its loss."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).square().mean()


def test_replay_restores_batchnorm_running_stats() -> None:
    net = _Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    guard = Guard(net, opt, console=False, strict=True)
    net(torch.randn(16, 4)).backward()
    guard.check()
    opt.step()
    opt.zero_grad()
    net(torch.randn(16, 4)).backward()
    before = snapshot(net, opt)
    loc = localize(net, guard.probes, Origin(phase="backward"))
    assert_same(before, snapshot(net, opt))
    assert loc["replays"][0]["replay_loss"] == loc["replays"][0]["original_loss"]
    guard.close()


def test_fp16_overflow_ramp_and_distance_to_the_dtype_max() -> None:
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)).half()
    with torch.no_grad():
        model[0].weight.fill_(1000.0)  # 4 * 10 * 1000 = 40000: fits in fp16 (max 65504)…
        model[1].weight.fill_(1000.0)  # …then 4 * 40000 * 1000: overflows to inf
    rec = Recorder(model)
    rec.attach()
    model(torch.full((2, 4), 10.0, dtype=torch.float16))
    rec.detach()
    found = locate(rec.read(), rec.param_owner)
    assert found is not None and found.phase == "forward" and rec.names[found.module] == "1"
    assert found.value == math.inf and found.inputs_finite
    first, _ = found.frames
    assert first.value == 40000.0 and first.dtype == torch.float16
    assert 0.6 < first.value / torch.finfo(torch.float16).max < 0.62  # how close it came to overflow


def test_replay_is_refused_with_a_reason_where_it_cannot_run() -> None:
    model = tiny_llama()
    guard = Guard(model, console=False, strict=True)
    model(**make_batch(model)).loss.backward()
    next(model.parameters()).ds_id = 0  # what DeepSpeed ZeRO puts on its parameters
    loc = localize(model, guard.probes, Origin(phase="backward"))
    assert loc["verdict"] == "unknown" and "DeepSpeed" in loc["message"] and loc["replays"] == []
    guard.close()


# -- trace mode: observational, and every hook removed ------------------------------------------------------


def _train_loop(trace: str | None, steps: int = 3) -> list[torch.Tensor]:
    model = tiny_llama(seed=1, attention_dropout=0.2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = Guard(model, opt, console=False, strict=True, trace=trace) if trace != "bare" else None
    torch.manual_seed(0)
    for i in range(steps):
        model(**make_batch(model, seed=i)).loss.backward()
        if guard is not None:
            assert guard.check()
        opt.step()
        opt.zero_grad()
    if guard is not None:
        guard.close()
        for m in model.modules():
            assert not m._forward_hooks and not m._forward_pre_hooks, m
        assert not any(getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    return [p.detach().clone() for p in model.parameters()]


def test_trace_mode_is_observational_and_removes_its_hooks() -> None:
    bare = _train_loop("bare")
    for arm in (_train_loop(None), _train_loop("full")):
        assert all(torch.equal(a, b) for a, b in zip(bare, arm))


def test_a_bug_in_the_trace_disables_the_guard_not_the_training(monkeypatch) -> None:
    model = tiny_llama()
    guard = Guard(model, console=False, trace="full")

    def boom(self: Recorder, t: torch.Tensor) -> int:
        raise RuntimeError("bug in the trace")

    monkeypatch.setattr(Recorder, "_slot", boom)
    with pytest.warns(RuntimeWarning, match="disabled itself"):
        model(**make_batch(model)).loss.backward()  # training goes on
    assert guard.disabled and guard.check()
    assert json.loads(guard.close().to_json())["findings"][-1]["kind"] == "internal_error"


def test_on_fault_warn_replays_only_the_first_fault() -> None:
    model = tiny_llama()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    guard = Guard(model, opt, console=False, strict=True, on_fault="warn")
    with inject_nan(model.model.layers[0].mlp, start=1) as injector:
        for _ in range(3):
            model(**make_batch(model)).loss.backward()
            assert guard.check()  # "warn": training goes on
            opt.zero_grad()
    assert injector.calls == 3 + 1  # three steps, one replay
    assert guard.close().fault.localization["module"] == "model.layers.0.mlp"


class _Overflowing(nn.Module):
    """Finite in fp32; under fp16 autocast the second Linear overflows (4 * 40000 * 1000 > 65504)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
        with torch.no_grad():
            self.a.weight.fill_(1000.0)
            self.b.weight.fill_(1000.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x)).float().mean()


def test_replay_re_enters_the_autocast_of_the_step() -> None:
    model = _Overflowing()
    guard = Guard(model, torch.optim.SGD(model.parameters(), lr=0.0), console=False, strict=True)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(torch.full((2, 4), 10.0))
    loss.backward()
    assert not guard.check()
    loc = guard.close().fault.localization
    # Replayed outside autocast, fp32 would not overflow and the fault would look transient.
    assert (loc["verdict"], loc["module"], loc["value"], loc["phase"]) == ("deterministic", "b", "inf", "forward")
    ramp = loc["frames"][-2]
    assert ramp["module"] == "a" and ramp["dtype"] == "float16" and 0.6 < ramp["dtype_max_fraction"] < 0.62
    assert "overflow" in loc["message"] and "bf16" in loc["advice"]
