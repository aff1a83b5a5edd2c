"""Real LLaMA-Factory SFT jobs (``llamafactory.train.tuner.run_exp(args, callbacks=[GradGuard(...)])``) on a tiny LLaVA.

Model, tokenizer, processor, images and dataset are built locally (``tests/tiny_llava_assets.py``); LoRA unless
stated. LLaMA-Factory is not part of the default install (it pins its own transformers/peft/trl): these tests are
skipped there. ``./scripts/llamafactory_env.sh`` builds a throwaway venv and runs them.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "llamafactory",
    reason="LLaMA-Factory is not installed (not in the default install): run ./scripts/llamafactory_env.sh",
)

from tiny_llava_assets import build_dataset_dir, build_model_dir, sft_args
from transformers import TrainerCallback

from gradguard import GradGuard
from gradguard.integrations.frameworks import detect, find_trainer
from gradguard.testing.faults import inject_nan

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("llamafactory")
    return build_model_dir(root), build_dataset_dir(root)


class Probe(TrainerCallback):
    """Records what a callback can see of the LLaMA-Factory run: the trainer (found from the stack), the framework
    detected from it, the model, and the final state."""

    def __init__(self, nan_in: str | None = None, nan_from_call: int = 2) -> None:
        self.nan_in, self.nan_from_call = nan_in, nan_from_call
        self.trainer: Any = None
        self.framework: Any = None
        self.model: Any = None
        self.global_step: int | None = None
        self.changed: list[str] | None = None  # trainable tensors whose values moved during train()
        self._fault: Any = None
        self._before: dict[str, Any] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        frame = inspect.currentframe()
        try:
            self.trainer = find_trainer(frame, callback=self)
        finally:
            del frame
        self.framework = detect(self.trainer, args)
        self.model = kwargs["model"]
        self._before = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        if self.nan_in is not None:  # the module as LLaMA-Factory built it (PEFT-wrapped)
            module = self.model.get_submodule(self.nan_in)
            self._fault = inject_nan(module, start=self.nan_from_call).__enter__()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.global_step = state.global_step
        params = dict(self.model.named_parameters())
        self.changed = [n for n, before in self._before.items() if not params[n].detach().equal(before)]
        if self._fault is not None:
            self._fault.__exit__(None, None, None)


def run(assets: tuple[Path, Path], out: Path, guard: GradGuard, probe: Probe | None = None, **overrides: Any):
    from llamafactory.train.tuner import run_exp

    model_dir, data_dir = assets
    probe = probe or Probe()
    # The probe goes first: GradGuard must see the injected fault as the module's own output.
    run_exp(sft_args(model_dir, data_dir, out, **overrides), callbacks=[probe, guard])
    report = json.loads((out / "gradguard-report.json").read_text())
    return report, probe


def _finding(report: dict[str, Any], code: str, group: str) -> dict[str, Any]:
    hits = [f for f in report["findings"] if f["code"] == code and f["group"] == group]
    assert hits, f"no {code} for {group}: {report['findings']}"
    return hits[0]


def test_healthy_lora_run_trains_the_vision_tower_and_detects_llamafactory(assets, tmp_path) -> None:
    report, probe = run(assets, tmp_path, GradGuard(expect_trainable=["model.vision_tower"], console=False))

    assert report["status"] == "healthy", report["findings"]
    assert report["history"]["steps"] == [1, 2, 3, 4]
    groups = {g["name"]: g for g in report["groups"]}
    # freeze_vision_tower: false + lora_target: all -> LoRA adapters on the CLIP tower, and they got gradients
    # (the images really went through it).
    assert groups["model.vision_tower"]["state"] == "adapters"
    assert all(n and n > 0 for n in report["history"]["grad_norm"]["model.vision_tower"])
    assert not [f for f in report["findings"] if f["severity"] == "error"]

    assert type(probe.trainer).__module__ == "llamafactory.train.sft.trainer"
    assert probe.trainer.callback_handler.callbacks.count(probe) == 1
    assert probe.framework.name == "llamafactory"
    assert probe.framework.settings["finetuning_type"] == "lora"
    assert probe.framework.settings["freeze_vision_tower"] is False


def test_nan_in_the_projector_is_caught_training_stops_and_the_report_is_written(assets, tmp_path) -> None:
    probe = Probe(nan_in="base_model.model.model.multi_modal_projector", nan_from_call=2)
    report, probe = run(assets, tmp_path, GradGuard(console=False), probe, max_steps=6)

    assert report["status"] == "fault"
    fault = report["fault"]
    assert fault["kind"] in ("nonfinite_loss", "nonfinite_grad"), fault
    assert fault["step"] >= 2
    assert fault["weights_intact"] is True
    assert fault["origin"]["group"] == "model.multi_modal_projector" and fault["origin"]["role"] == "connector"
    localization = fault["localization"]
    assert localization is not None and "multi_modal_projector" in localization["module"], localization
    # Stopped at the poisoned step instead of running on to max_steps; the steps before it were finite.
    assert probe.global_step == fault["step"] < 6
    assert probe.changed  # the healthy steps before it did train
    assert all(loss != "NaN" for loss in report["history"]["loss"][: fault["step"] - 1])


def test_freeze_vision_tower_true_gives_gg001_naming_the_llamafactory_switch(assets, tmp_path) -> None:
    report, probe = run(
        assets,
        tmp_path,
        GradGuard(expect_trainable=["model.vision_tower"], console=False),
        freeze_vision_tower=True,
    )

    assert report["status"] == "fault"
    assert report["fault"]["code"] == "GG001" and report["fault"]["step"] == 0
    hint = _finding(report, "GG001", "model.vision_tower")["hint"]
    assert "freeze_vision_tower: false" in hint
    assert "modules_to_save" in hint  # the PEFT fix stays beside it
    # HF's loop reads should_training_stop only after a step, so one step runs, but its update is skipped.
    assert probe.global_step <= 1
    assert probe.changed == []


def test_connector_under_lora_the_hint_is_additional_target_and_following_it_works(assets, tmp_path) -> None:
    # LLaMA-Factory's LoRA never adapts the projector (freeze_multi_modal_projector is for full/freeze tuning):
    # the hint must say additional_target, and doing what it says must make the run healthy.
    guard = GradGuard(expect_trainable=["model.multi_modal_projector"], console=False)
    report, _ = run(assets, tmp_path / "frozen", guard, freeze_multi_modal_projector=False, max_steps=1)
    hint = _finding(report, "GG001", "model.multi_modal_projector")["hint"]
    assert "additional_target: multi_modal_projector" in hint

    guard = GradGuard(expect_trainable=["model.multi_modal_projector"], console=False)
    report, _ = run(assets, tmp_path / "fixed", guard, additional_target="multi_modal_projector", max_steps=2)
    assert report["status"] == "healthy", report["findings"]
    assert all(n and n > 0 for n in report["history"]["grad_norm"]["model.multi_modal_projector"])


def test_full_finetuning_gg002_names_the_switch_that_freezes_the_tower(assets, tmp_path) -> None:
    guard = GradGuard(expect_trainable=["model.language_model", "lm_head"], console=False)
    report, _ = run(assets, tmp_path, guard, finetuning_type="full", freeze_vision_tower=False, max_steps=2)
    hint = _finding(report, "GG002", "model.vision_tower")["hint"]
    assert "freeze_vision_tower: true" in hint
    assert "(it is false in this run)" in hint


def test_vision_tower_as_users_write_it_is_accepted(assets, tmp_path) -> None:
    report, _ = run(assets, tmp_path, GradGuard(expect_trainable=["vision_tower"], console=False), max_steps=2)
    assert report["status"] == "healthy", report["findings"]


def test_vision_tower_as_users_write_it_with_freeze_vision_tower_true_hints_the_switch(assets, tmp_path) -> None:
    guard = GradGuard(expect_trainable=["vision_tower"], console=False)
    report, _ = run(assets, tmp_path, guard, freeze_vision_tower=True)
    assert report["fault"]["code"] == "GG001"
    assert "freeze_vision_tower: false" in _finding(report, "GG001", "model.vision_tower")["hint"]
