"""Never wrong about a healthy run, never silent about a broken one (issue 13's nine cases).

Each test is one way the guard used to be wrong: it stopped a healthy VLM run on text-only batches, turned itself
off when the report could not be written, called a crashed run healthy, trained a step despite a static error,
mixed an evaluation forward into the training loss, accepted knobs that make no sense, counted a misplaced
``check()`` as a step, said the loss was finite without having seen it, and missed tensors that never train.
"""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import trainer_args
from peft import LoraConfig, get_peft_model
from test_reliability_bitwise import validate_report
from torch import nn
from transformers import Trainer, TrainerCallback, default_data_collator

from gradguard import GradGuard, Guard, TrainingHealthError
from gradguard.engine import shutdown
from gradguard.errors import ConfigurationError
from gradguard.testing.faults import inject_nan
from gradguard.testing.models import FAMILIES, TinyDataset, tiny_llama, tiny_llava


def report_of(folder: Path | str) -> dict[str, Any]:
    report = json.loads((Path(folder) / "gradguard-report.json").read_text())
    validate_report(report)
    return report


def mixed_llava_data(model: nn.Module, n: int, image_every: int = 4) -> list[dict[str, torch.Tensor]]:
    """LLaVA samples where only one in ``image_every`` has an image: the others are the same text with the image
    placeholder tokens removed and no ``pixel_values`` (how real VLM instruction data looks)."""
    image_token = model.config.image_token_id
    out = []
    for i, sample in enumerate(TinyDataset(model, n=n)):
        if i % image_every == 0:
            out.append(sample)
            continue
        keep = sample["input_ids"] != image_token
        out.append({k: sample[k][keep] for k in ("input_ids", "attention_mask", "labels")})
    return out


def vlm_lora(model: nn.Module) -> nn.Module:
    """LoRA on the language model; vision tower and projector trained in full (modules_to_save)."""
    lora = LoraConfig(
        r=4,
        target_modules=FAMILIES["llava"].language_lora_regex,
        modules_to_save=["vision_tower", "multi_modal_projector"],
    )
    return get_peft_model(model, lora)


# -- 1 and 9: text-only batches in VLM data; tensors that never train ---------------------------------------------
def test_mixed_image_and_text_batches_do_not_stop_a_healthy_vlm_run(tmp_path: Path) -> None:
    base = tiny_llava()
    base.config.vision_feature_layer = -2  # LLaVA-1.5's choice: the features of the second-to-last CLIP layer
    model = vlm_lora(base)
    callback = GradGuard(expect_trainable=["vision_tower", "multi_modal_projector"], console=False)
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=12, per_device_train_batch_size=1),
        train_dataset=mixed_llava_data(model, 12),
        data_collator=default_data_collator,
        callbacks=[callback],
    )
    trainer.train()
    assert trainer.state.global_step == 12, "a healthy run on mixed data was stopped"
    report = report_of(tmp_path)
    assert report["status"] == "healthy", report["fault"]
    noisy = [f"{f['code']} {f['message']}" for f in report["findings"] if f["severity"] != "info"]
    assert not noisy
    # Case 9: LLaVA reads the vision features before the last CLIP layer (vision_feature_layer=-2): that layer's
    # tensors never get a gradient while the tower runs. One info finding, naming them.
    unused = [f for f in report["findings"] if f["kind"] == "unused_params"]
    assert [f["group"] for f in unused] == ["model.vision_tower"], report["findings"]
    assert "layers.1." in unused[0]["message"] and "layers.0." not in unused[0]["message"]
    assert unused[0]["severity"] == "info" and "freeze" in unused[0]["hint"]


def test_a_group_that_runs_but_gets_no_gradient_is_still_dead(tmp_path: Path) -> None:
    """The other side of case 1: the vision tower runs on every image step, under torch.no_grad (LLaVA#305)."""
    model = vlm_lora(tiny_llava())
    tower = model.base_model.model.model.vision_tower
    forward = tower.forward

    def frozen_by_mistake(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():  # the trainable tower's forward under no_grad: it runs, and gets no gradient
            return forward(*args, **kwargs)

    tower.forward = frozen_by_mistake
    callback = GradGuard(expect_trainable=["vision_tower"], console=False)
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=12, per_device_train_batch_size=1, train_sampling_strategy="sequential"),
        train_dataset=mixed_llava_data(model, 12, image_every=2),
        data_collator=default_data_collator,
        callbacks=[callback],
    )
    trainer.train()
    fault = report_of(tmp_path)["fault"]
    assert fault["kind"] == "dead_gradient" and fault["origin"]["group"] == "model.vision_tower"
    assert trainer.state.global_step == 5  # the 3rd image step (1, 3, 5): three steps where it ran, no gradient


def test_an_expected_group_that_never_runs_is_a_warning_at_the_end(tmp_path: Path) -> None:
    model = vlm_lora(tiny_llava())
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=4, per_device_train_batch_size=1),
        train_dataset=mixed_llava_data(model, 4, image_every=100)[1:],  # text only
        data_collator=default_data_collator,
        callbacks=[GradGuard(expect_trainable=["vision_tower"], console=False, thresholds={"idle_steps": 2})],
    )
    trainer.train()
    report = report_of(tmp_path)
    idle = [(f["severity"], f["group"]) for f in report["findings"] if f["kind"] == "idle_group"]
    assert ("info", "model.vision_tower") in idle and ("warning", "model.vision_tower") in idle
    assert report["status"] == "healthy" and trainer.state.global_step == 4


# -- 2: an unwritable report_dir is I/O, not a reason to stop watching ---------------------------------------------
def test_an_unwritable_report_dir_never_turns_the_guard_off(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "report"
    not_a_folder.write_text("a file where the report folder should be")
    model = tiny_llama()
    callback = GradGuard(report_dir=str(not_a_folder), console=False)
    with warnings.catch_warnings(record=True) as caught, inject_nan(model.model.layers[0], start=12):
        warnings.simplefilter("always")
        trainer = Trainer(
            model=model,
            args=trainer_args(tmp_path / "out", max_steps=20, save_strategy="steps", save_steps=5),
            train_dataset=TinyDataset(model, n=64),
            callbacks=[callback],
        )
        trainer.train()
    assert trainer.state.global_step == 12, "the NaN at step 12 must stop the run"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    guard = callback.guard
    assert guard is not None and not guard.disabled
    assert "GG901" not in [f.code for f in guard.findings]
    said = [str(w.message) for w in caught if "cannot write the report" in str(w.message)]
    assert len(said) == 1 and str(not_a_folder) in said[0]  # warned once, with the path and the OS error
    fallback = guard.writer.fallback if guard.writer else None
    assert fallback is not None and str(fallback) in said[0]
    report = report_of(fallback)
    assert report["status"] == "fault" and report["fault"]["step"] == 12 and report["fault"]["weights_intact"]


# -- 3: a crashed run is not healthy ---------------------------------------------------------------------------------
class RaiseAt(nn.Module):
    """Wraps a module; its forward raises from the ``at``-th training call on."""

    def __init__(self, inner: nn.Module, at: int, error: BaseException) -> None:
        super().__init__()
        self.inner, self.at, self.error, self.calls = inner, at, error, 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += torch.is_grad_enabled()
        if self.calls >= self.at:
            raise self.error
        return self.inner(*args, **kwargs)


def test_a_forward_that_raises_ends_the_run_aborted(tmp_path: Path) -> None:
    model = tiny_llama()
    model.model.layers[0] = RaiseAt(model.model.layers[0], 3, ValueError("shapes do not match at step 3"))
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=6),
        train_dataset=TinyDataset(model, n=32),
        callbacks=[GradGuard(console=False)],
    )
    with pytest.raises(ValueError, match="shapes do not match"):
        trainer.train()
    shutdown.close_all()  # what the process's exit (or its excepthook) does
    report = report_of(tmp_path)
    assert report["status"] == "aborted" and report["fault"] is None
    assert report["exit"] == {
        "status": "aborted",
        "type": "ValueError",
        "message": "shapes do not match at step 3",
        "last_step": 2,
    }


def test_ctrl_c_ends_the_run_interrupted(tmp_path: Path) -> None:
    model = tiny_llama()

    class CtrlC(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGINT)  # the real signal, through gradguard's handler

    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=6),
        train_dataset=TinyDataset(model, n=32),
        callbacks=[GradGuard(console=False), CtrlC()],
    )
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    report = report_of(tmp_path)
    assert report["status"] == "interrupted" and report["exit"]["type"] == "SIGINT"
    assert report["exit"]["last_step"] == 2


def test_a_plain_loop_with_guard_as_a_context_manager_reports_its_crash(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with (
        pytest.raises(RuntimeError, match="data loader died"),
        Guard(model, opt, report_dir=tmp_path, console=False) as g,
    ):
        for step in range(1, 5):
            if step == 3:
                raise RuntimeError("data loader died")
            model(torch.randn(2, 4)).sum().backward()
            g.check()
            opt.step()
            opt.zero_grad()
    report = report_of(tmp_path)
    assert report["status"] == "aborted" and report["exit"]["type"] == "RuntimeError"
    assert report["exit"]["last_step"] == 2


# -- 4: a static error under on_fault="stop" trains nothing ----------------------------------------------------------
def test_a_static_error_trains_nothing_in_a_plain_loop_either(tmp_path: Path) -> None:
    model = nn.ModuleDict({"vision_tower": nn.Linear(4, 4), "lm_head": nn.Linear(4, 2)})
    model["vision_tower"].requires_grad_(False)
    with pytest.raises(TrainingHealthError, match="before step 1.*nothing was trained"):
        Guard(model, expect_trainable=["vision_tower"], report_dir=tmp_path, console=False)
    report = report_of(tmp_path)
    assert report["fault"]["kind"] == "frozen_expected_trainable" and report["environment"]["steps"] == 0
    md = (tmp_path / "gradguard-report.md").read_text()
    assert "before step 1" in md and "nothing was trained" in md and "poisoned update was skipped" not in md
    # on_fault="warn" records it and lets the loop train
    guard = Guard(model, expect_trainable=["vision_tower"], on_fault="warn", console=False)
    assert guard.fault is not None and not guard.stopped
    guard.close()


# -- 5: a forward without a backward is not a training micro-batch ---------------------------------------------------
def test_evaluation_forwards_without_no_grad_never_mix_into_the_training_loss() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    guard = Guard(model, opt, console=False)
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    x_val, y_val = 10 * torch.randn(64, 8), 100 + torch.randn(64, 1)  # a very different validation set
    for _ in range(120):
        model.eval()
        val = nn.functional.mse_loss(model(x_val), y_val)  # grad enabled: a forward with no backward
        guard.record_loss(val)
        model.train()
        loss = nn.functional.mse_loss(model(x), y)
        guard.record_loss(loss)
        loss.backward()
        assert guard.check()
        assert guard.last is not None and guard.last.losses == [loss.item()]  # the validation loss is not in it
        opt.step()
        opt.zero_grad()
    report = guard.close()
    assert report.status == "healthy" and report.history["counts"]["nonfinite_loss_steps"] == 0
    assert not [f for f in report.findings if f.severity != "info"], report.findings


# -- 6: every knob is checked when the front door is built -----------------------------------------------------------
@pytest.mark.parametrize(
    ("thresholds", "match"),
    [
        ({"dead_steps": 0}, r"thresholds\['dead_steps'\] must be an integer >= 1, got 0"),
        ({"dead_step": 3}, r"unknown threshold\(s\) \['dead_step'\]"),
        ({"collapse_fraction": 2.0}, r"between 0 and 1"),
        ({"spike_z": "high"}, r"a number > 0"),
    ],
)
def test_bad_thresholds_fail_when_the_callback_is_built(thresholds: dict[str, Any], match: str) -> None:
    from gradguard.integrations.lightning import GradGuardCallback
    from gradguard.testing import smoke_test

    model = nn.Linear(2, 1)
    for build in (
        lambda: GradGuard(thresholds=thresholds),
        lambda: GradGuardCallback(thresholds=thresholds),
        lambda: Guard(model, thresholds=thresholds, console=False),
        lambda: smoke_test(model, [torch.ones(1, 2)], thresholds=thresholds, loss_fn=lambda o, b: o.sum()),
    ):
        with pytest.raises(ConfigurationError, match=match):
            build()


def test_other_bad_options_fail_when_built() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(ConfigurationError, match="unknown Guard option"):
        Guard(model, on_falt="stop")
    with pytest.raises(ConfigurationError, match="history_size must be an integer >= 4"):
        Guard(model, history_size=2)
    with pytest.raises(ConfigurationError, match="expect_trainable entries must be non-empty strings"):
        GradGuard(expect_trainable=["vision", ""])
    with pytest.raises(ConfigurationError, match="groups must be a dict"):
        GradGuard(groups=["vision_tower"])  # type: ignore[arg-type]


# -- 7: check() misuse ------------------------------------------------------------------------------------------------
def test_check_before_backward_warns_once_and_a_second_check_does_not_count() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    guard = Guard(model, console=False)
    with pytest.warns(RuntimeWarning, match="no backward since the last check"):
        assert guard.check()  # before any backward
    assert guard.step == 0 and guard.last is None
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the warning is said once only
            assert guard.check() and guard.check()  # twice in one step
    assert guard.step == 3 and guard.last is not None and guard.last.step == 3
    guard.close()


# -- 8: never say what was not observed -------------------------------------------------------------------------------
def test_without_a_recorded_loss_the_report_does_not_claim_it_was_finite() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    guard = Guard(model, console=False, localize=False)
    out = model(torch.randn(2, 4))
    (out.sum() * math.nan).backward()  # a NaN loss the guard never saw
    assert not guard.check()
    message = guard.close().fault.message  # type: ignore[union-attr]
    assert "loss is finite" not in message
    assert "the loss was not recorded" in message and "record_loss" in message


# -- reports carry the user's umask ------------------------------------------------------------------------------------
def test_reports_are_written_with_the_users_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        model = nn.Linear(2, 1)
        Guard(model, report_dir=tmp_path, console=False).close()
    finally:
        os.umask(old)
    for name in ("gradguard-report.json", "gradguard-report.md"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
