"""Real ms-swift SFT jobs (``swift.sft_main(SftArguments(..., callbacks=["gradguard"]))``) on a tiny LLaVA, LoRA.

ms-swift takes callbacks by name: a factory ``(args, trainer) -> TrainerCallback`` registered in
``swift.callbacks.callbacks_map``. Model, tokenizer, processor, images and dataset are built locally
(``tests/tiny_llava_assets.py``). Skipped where ms-swift is not installed (it is not part of the default
install); ``./scripts/msswift_env.sh`` builds a throwaway venv and runs these tests.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip(
    "swift.callbacks",
    reason="ms-swift is not installed (not in the default install): run ./scripts/msswift_env.sh",
)

from tiny_llava_assets import build_dataset_dir, build_model_dir, swift_args, swift_dataset
from transformers import TrainerCallback

from gradguard import GradGuard
from gradguard.integrations.frameworks import detect, find_trainer
from gradguard.testing.faults import inject_nan

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("msswift")
    return build_model_dir(root), swift_dataset(root, build_dataset_dir(root))


class Probe(TrainerCallback):
    def __init__(self, trainer: Any, nan_in: str | None = None) -> None:
        self.given_trainer = trainer  # ms-swift hands its callbacks the trainer
        self.nan_in = nan_in
        self.found_trainer: Any = None
        self.framework: Any = None
        self.global_step: int | None = None
        self._fault: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        frame = inspect.currentframe()
        try:
            self.found_trainer = find_trainer(frame, callback=self)
        finally:
            del frame
        self.framework = detect(self.found_trainer, args)
        if self.nan_in is not None:
            self._fault = inject_nan(kwargs["model"].get_submodule(self.nan_in), start=2).__enter__()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.global_step = state.global_step
        if self._fault is not None:
            self._fault.__exit__(None, None, None)


def run(
    assets: tuple[Path, Path],
    out: Path,
    monkeypatch: pytest.MonkeyPatch,
    guard: GradGuard,
    nan_in: str | None = None,
    **overrides: Any,
):
    from swift import SftArguments, sft_main
    from swift.callbacks import callbacks_map

    made: dict[str, Probe] = {}

    def probe(args: Any, trainer: Any) -> Probe:
        made["probe"] = Probe(trainer, nan_in)
        return made["probe"]

    # The probe goes first: GradGuard must see the injected fault as the module's own output.
    monkeypatch.setitem(callbacks_map, "probe", probe)
    monkeypatch.setitem(callbacks_map, "gradguard", lambda args, trainer: guard)
    model_dir, dataset = assets
    sft_main(SftArguments(**swift_args(model_dir, dataset, out, callbacks=["probe", "gradguard"], **overrides)))
    return json.loads((out / "gradguard-report.json").read_text()), made["probe"]


def _finding(report: dict[str, Any], code: str, group: str) -> dict[str, Any]:
    hits = [f for f in report["findings"] if f["code"] == code and f["group"] == group]
    assert hits, f"no {code} for {group}: {report['findings']}"
    return hits[0]


def test_healthy_lora_run_and_detection_of_msswift(assets, tmp_path, monkeypatch) -> None:
    guard = GradGuard(expect_trainable=["model.vision_tower"], console=False)
    report, probe = run(assets, tmp_path, monkeypatch, guard)

    assert report["status"] == "healthy", report["findings"]
    assert report["history"]["steps"] == [1, 2, 3, 4]
    groups = {g["name"]: g for g in report["groups"]}
    assert groups["model.vision_tower"]["state"] == "adapters"  # --freeze_vit false: LoRA on the ViT
    assert all(n and n > 0 for n in report["history"]["grad_norm"]["model.vision_tower"])

    assert probe.found_trainer is probe.given_trainer  # the stack walk finds the very trainer ms-swift built
    assert type(probe.found_trainer).__module__.startswith("swift.")
    assert probe.framework.name == "ms-swift"
    # freeze_vit lives on SftArguments, not on the trainer's TrainingArguments: read from the pipeline's frame.
    assert probe.framework.settings["freeze_vit"] is False
    assert probe.framework.settings["tuner_type"] == "lora"


def test_freeze_vit_true_gives_gg001_naming_the_swift_flag(assets, tmp_path, monkeypatch) -> None:
    guard = GradGuard(expect_trainable=["model.vision_tower"], console=False)
    report, probe = run(assets, tmp_path, monkeypatch, guard, freeze_vit=True)

    assert report["fault"]["code"] == "GG001"
    hint = _finding(report, "GG001", "model.vision_tower")["hint"]
    assert "--freeze_vit false" in hint and "(it is true in this run)" in hint
    assert probe.global_step is not None and probe.global_step <= 1


def test_nan_in_the_aligner_is_caught_and_training_stops(assets, tmp_path, monkeypatch) -> None:
    report, probe = run(
        assets,
        tmp_path,
        monkeypatch,
        GradGuard(console=False),
        nan_in="base_model.model.model.multi_modal_projector",
        max_steps=6,
    )
    fault = report["fault"]
    assert report["status"] == "fault"
    assert fault["kind"] in ("nonfinite_loss", "nonfinite_grad")
    assert fault["origin"]["group"] == "model.multi_modal_projector"
    assert fault["weights_intact"] is True
    assert probe.global_step == fault["step"] < 6


def test_vision_tower_as_users_write_it_is_accepted(assets, tmp_path, monkeypatch) -> None:
    report, _ = run(assets, tmp_path, monkeypatch, GradGuard(expect_trainable=["vision_tower"], console=False))
    assert report["status"] == "healthy", report["findings"]
