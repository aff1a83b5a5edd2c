"""Silent failures with finite numbers (issue 14), in real HF Trainer runs on tiny models.

NaN is the loud failure. These keep every logged number finite: a loss that diverges from step 2 (a learning rate
typo), an explosion on its way to NaN, weights that do not move (a warm-up given in steps where a ratio was meant,
a learning rate of 0, ``lora_alpha=0``), a loss that collapses because labels leak, and a set-up that cannot learn
one repeated batch. Beside them, the healthy look-alikes that must stay quiet: memorising a tiny data set, and a
warm-up from 0.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import trainer_args
from peft import LoraConfig, get_peft_model
from test_reliability_bitwise import validate_report
from torch import nn
from transformers import Trainer

from gradguard import GradGuard
from gradguard.testing import smoke_test
from gradguard.testing.models import FAMILIES, TinyDataset, make_batch, tiny_llama


def run(tmp_path: Path, model: nn.Module | None = None, callback: GradGuard | None = None, **args: Any) -> Any:
    model = model if model is not None else tiny_llama()
    optimizer = args.pop("optimizer", None)
    scheduler = args.pop("scheduler", None)
    dataset = args.pop("dataset", None) or TinyDataset(model, n=64)
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, **{"max_steps": 20, **args}),
        train_dataset=dataset,
        callbacks=[callback or GradGuard(console=False)],
        optimizers=(optimizer, scheduler),
    )
    trainer.train()
    report = json.loads((tmp_path / "gradguard-report.json").read_text())
    validate_report(report)
    return trainer, report


def kinds(report: dict[str, Any], *, severity: str | None = None) -> list[tuple[int | None, str]]:
    return [(f["step"], f["kind"]) for f in report["findings"] if severity in (None, f["severity"])]


# -- divergence, from the first steps ---------------------------------------------------------------------------------
def test_adamw_at_lr_1_diverges_from_step_2_and_is_stopped(tmp_path: Path) -> None:
    trainer, report = run(tmp_path, learning_rate=1.0, max_grad_norm=1.0)  # a typo for 1e-4
    fault = report["fault"]
    assert fault["kind"] == "loss_divergence" and fault["step"] <= 4, kinds(report)
    assert trainer.state.global_step == fault["step"]  # stopped there
    assert "loss of guessing (ln 256" in fault["message"]
    losses = [float(v) for v in report["history"]["loss"]]
    assert all(map(math.isfinite, losses)) and losses[-1] > 2 * math.log(256)  # finite, and worse than guessing


def test_sgd_at_lr_10_is_signalled_early_and_stopped_before_its_first_nan(tmp_path: Path) -> None:
    model = tiny_llama()
    sgd = torch.optim.SGD(model.parameters(), lr=10.0)
    trainer, report = run(tmp_path, model, learning_rate=10.0, max_grad_norm=0.0, optimizer=sgd)
    first_signal = min(step for step, kind in kinds(report) if kind != "masked_nonfinite_log")
    assert first_signal <= 5
    fault = report["fault"]
    assert fault["kind"] == "loss_divergence", kinds(report)
    assert fault["weights_intact"] and all(torch.isfinite(p).all() for p in model.parameters())
    assert report["history"]["counts"]["nonfinite_loss_steps"] == 0  # stopped before the NaN
    assert trainer.state.global_step == fault["step"]


def test_divergence_can_be_made_a_warning(tmp_path: Path) -> None:
    callback = GradGuard(console=False, severity={"loss_divergence": "warning"})
    trainer, report = run(tmp_path, callback=callback, learning_rate=1.0, max_steps=8)
    assert trainer.state.global_step == 8 and report["status"] == "healthy"
    assert ("warning", "loss_divergence") in [(f["severity"], f["kind"]) for f in report["findings"]]


# -- weights that do not move ----------------------------------------------------------------------------------------
def test_warmup_longer_than_the_run_is_flagged_before_step_1(tmp_path: Path) -> None:
    _, report = run(tmp_path, warmup_steps=10**6)
    static = [f for f in report["findings"] if f["kind"] == "no_update"]
    assert static and static[0]["phase"] == "static" and "warm-up (1000000 steps) is longer" in static[0]["message"]
    assert "warmup_ratio" in static[0]["hint"]


def test_a_scheduler_that_returns_1e_9_is_no_update_at_runtime(tmp_path: Path) -> None:
    model = tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1e-9)  # bypasses the static check
    callback = GradGuard(console=False, expect_trainable=["language"])
    trainer, report = run(tmp_path, model, callback, optimizer=optimizer, scheduler=scheduler)
    fault = report["fault"]
    assert fault["kind"] == "no_update" and fault["origin"]["group"] == "model", kinds(report)
    assert "learning rate is 1e-12" in fault["message"]
    assert trainer.state.global_step == fault["step"] <= 7


def test_learning_rate_0_is_flagged_before_step_1_and_at_runtime(tmp_path: Path) -> None:
    _, report = run(tmp_path, learning_rate=0.0)
    found = [(f["phase"], f["kind"]) for f in report["findings"] if f["kind"] == "no_update"]
    assert ("static", "no_update") in found and ("optimizer", "no_update") in found, report["findings"]


def test_lora_alpha_0_is_flagged_before_step_1(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=0, target_modules=["q_proj", "v_proj"]))
    _, report = run(tmp_path, model, max_steps=8)
    static = [f for f in report["findings"] if f["kind"] == "no_update" and f["phase"] == "static"]
    assert static and "lora_alpha=0" in static[0]["message"] and static[0]["group"] == "model"


def test_a_warmup_from_0_is_not_no_update(tmp_path: Path) -> None:
    _, report = run(tmp_path, learning_rate=1e-3, warmup_steps=10, lr_scheduler_type="linear")
    assert report["status"] == "healthy" and not kinds(report), kinds(report)


# -- loss collapse: memorising is not leaking ---------------------------------------------------------------------------
def test_memorising_four_examples_is_at_most_an_info(tmp_path: Path) -> None:
    model = tiny_llama()
    trainer, report = run(
        tmp_path,
        model,
        dataset=TinyDataset(model, n=4),
        max_steps=300,
        learning_rate=3e-3,
        warmup_steps=20,
        lr_scheduler_type="cosine",
        logging_steps=50,
    )
    assert trainer.state.global_step == 300
    assert float(report["history"]["recent"][-1]["loss"]) < 0.01  # memorised
    noisy = [f"{f['code']} {f['message']}" for f in report["findings"] if f["severity"] != "info"]
    assert report["status"] == "healthy" and not noisy, noisy


class LeakLabels(nn.Module):
    """A data bug: from call ``start`` on, the answer leaks into what the model sees (here: straight into its
    logits), so the loss falls to ~0 in a step or two."""

    def __init__(self, model: nn.Module, start: int) -> None:
        super().__init__()
        self.model, self.start, self.calls = model, start, 0
        self.config = model.config

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs: Any) -> Any:
        self.calls += 1
        out = self.model(input_ids=input_ids, **kwargs)
        logits = out.logits
        if self.calls >= self.start:
            answer = torch.roll(labels, -1, dims=1).clamp(min=0)  # the next token, what the loss asks for
            logits = logits + 40.0 * nn.functional.one_hot(answer, logits.shape[-1])
        loss = nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        out.loss, out.logits = loss, logits
        return out


def test_leaked_labels_collapse_the_loss_suddenly_and_warn(tmp_path: Path) -> None:
    model = LeakLabels(tiny_llama(), start=6)
    _, report = run(tmp_path, model, dataset=TinyDataset(model.model, n=64), max_steps=16, learning_rate=1e-3)
    collapse = [f for f in report["findings"] if f["kind"] == "loss_collapse"]
    assert collapse and collapse[0]["severity"] == "warning" and "within 3 steps" in collapse[0]["message"]
    assert "labels do not leak" in collapse[0]["hint"]


# -- smoke tests that check learning ----------------------------------------------------------------------------------
def test_smoke_test_expect_learning_passes_on_a_healthy_model_and_fails_at_lr_0() -> None:
    model = tiny_llama()
    batch = make_batch(model, batch_size=2)
    healthy = smoke_test(model, [batch], steps=20, expect_learning=True)
    assert healthy.ok, healthy.findings
    frozen = smoke_test(model, [batch], steps=20, lr=0.0, expect_learning=True)
    assert not frozen.ok
    not_learning = [f for f in frozen.findings if f.kind == "not_learning"]
    assert not_learning and "model: 0.0e+00" in not_learning[0].message  # the ratios say who did not move
    with pytest.raises(ValueError, match="expect_learning must be True"):
        smoke_test(model, [batch], expect_learning=2.0)


def test_update_ratios_are_logged_per_group(tmp_path: Path) -> None:
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=FAMILIES["llama"].lora_targets))
    trainer, _ = run(tmp_path, model, max_steps=4, learning_rate=1e-3)
    logged = [row for row in trainer.state.log_history if "gradguard/update_ratio/model" in row]
    assert len(logged) == 3  # from step 2 on (step 1 has no update before it)
    assert all(1e-6 < row["gradguard/update_ratio/model"] < 1e-1 for row in logged)
