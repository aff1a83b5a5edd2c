"""Everywhere users train: a plain PyTorch loop, an Accelerate loop and Lightning, against the HF Trainer.

The acceptance story: the MiniCPM-V-shaped model, LoRA with the resampler fully trained
(``modules_to_save``), a NaN injected into the resampler from step 3. The plain loop and the Accelerate
loop (three added lines each) stop at the faulty step with the same report content as the real HF
``Trainer`` with ``GradGuard``; a real ``lightning.Trainer`` with ``GradGuardCallback`` stops, leaves the
weights bitwise unchanged by the faulty step, and writes the report. The examples in ``examples/`` run here.
"""

from __future__ import annotations

import math
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import trainer_args
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader

from gradguard import GradGuard, Guard, Report, TrainingHealthError
from gradguard.testing.faults import inject_nan
from gradguard.testing.models import TinyDataset, make_batch, tiny_minicpmv2

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FAULT_FIELDS = ("step", "kind", "code", "phase", "group", "role", "trainable", "weights_intact")


def seed_vlm() -> Any:
    return get_peft_model(
        tiny_minicpmv2(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["resampler"])
    )


def resampler_of(model: Any) -> torch.nn.Module:
    return model.get_base_model().resampler


def fault_fields(report: Report) -> dict[str, Any]:
    f = report.fault
    assert f is not None, report
    o = f.origin
    return dict(
        step=f.step,
        kind=f.kind,
        code=f.code,
        phase=o.phase,
        group=o.group,
        role=o.role,
        trainable=o.trainable,
        weights_intact=f.weights_intact,
    )


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_no_hooks(model: torch.nn.Module) -> None:
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, m
    for p in model.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)


@pytest.fixture
def fresh_accelerate() -> Iterator[None]:
    """Accelerate keeps a process-wide state (mixed precision, accumulation): start and leave it clean."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


# -- the loops -------------------------------------------------------------------------------------------


def plain_loop(model: Any, batches: list[dict[str, torch.Tensor]], report_dir: Path, accumulation: int = 1) -> Any:
    """The documented plain loop: three gradguard lines. Returns (report, weights before the last check)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    guard = Guard(model, optimizer, report_dir=report_dir, console=False)
    before = None
    for i, batch in enumerate(batches):
        loss = model(**batch).loss / accumulation
        loss.backward()
        if (i + 1) % accumulation:
            continue
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before = weights(model)
        if not guard.check():
            break
        optimizer.step()
        optimizer.zero_grad()
    return guard.close(), before


def test_every_loop_reports_the_fault_as_the_trainer_does(tmp_path, capsys, fresh_accelerate) -> None:
    """The plain, Accelerate (bf16 autocast) and Lightning examples against a real HF Trainer run.

    Same model, same LoRA set-up, a NaN in the resampler from step 3 (the examples accumulate 2 micro-batches
    and inject from forward call 5: micro-batch 0 of step 3). Each must stop at step 3 with the same fault
    kind, code, origin phase, group, role and trainable flag, print the report and write it.
    """
    from transformers import Trainer

    model = seed_vlm()
    with inject_nan(resampler_of(model), start=3):
        trainer = Trainer(
            model=model,
            args=trainer_args(tmp_path / "trainer", max_steps=6),
            train_dataset=TinyDataset(model, n=32),
            callbacks=[GradGuard(console=False)],
        )
        trainer.train()
    assert trainer.state.global_step == 3
    expected = fault_fields(Report.load(tmp_path / "trainer"))
    assert expected["step"] == 3 and expected["group"] == "resampler" and expected["role"] == "connector"
    assert expected["phase"] == "forward" and expected["trainable"] is True and expected["weights_intact"]
    capsys.readouterr()

    from accelerate.state import AcceleratorState

    runs = [
        ("plain_loop.py", [], "plain loop: fault at step 3 in resampler"),
        # The CPU has no fp16 GradScaler (Accelerate gives scaler=None there): bf16 autocast instead.
        ("accelerate_loop.py", ["--mixed-precision", "bf16"], "accelerate loop (bf16): fault at step 3 in resampler"),
        ("lightning_loop.py", [], "lightning: fault at step 3 in resampler (global_step 3)"),
    ]
    for name, args, line in runs:
        AcceleratorState._reset_state(reset_partial_state=True)  # the Trainer made its own Accelerator
        out_dir = tmp_path / name
        run_example(name, "--report-dir", str(out_dir), *args)
        out, err = capsys.readouterr()
        assert line in out, (name, out)
        assert "gradguard: fault" in err and "GG101" in err and "resampler" in err, name  # the printed report
        assert fault_fields(Report.load(out_dir)) == expected, name


def test_plain_loop_with_accumulation_is_observational_and_checks_per_optimizer_step(tmp_path) -> None:
    # Healthy: the guarded run is bitwise identical to the bare one; check() runs once per optimizer step.
    runs = []
    for guarded in (False, True):
        torch.manual_seed(0)
        model = seed_vlm()
        batches = [make_batch(model, seed=i) for i in range(6)]
        if guarded:
            report, _ = plain_loop(model, batches, tmp_path, accumulation=3)
            assert report.status == "healthy" and not report.errors(), report
            assert report.environment["steps"] == 2  # 6 micro-batches / 3
            assert [r["supervised"] for r in report.history["recent"]] == [48, 48]  # 3 x 16 tokens per step
            assert_no_hooks(model)
        else:
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
            for i, batch in enumerate(batches):
                (model(**batch).loss / 3).backward()
                if (i + 1) % 3 == 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    optimizer.zero_grad()
        runs.append(weights(model))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])

    # Faulty: NaN from forward call 5, the second micro-batch (index 1) of optimizer step 2.
    model = seed_vlm()
    with inject_nan(resampler_of(model), start=5):
        report, before = plain_loop(model, [make_batch(model, seed=i) for i in range(9)], tmp_path, accumulation=3)
    assert report.fault is not None and report.fault.step == 2 and report.fault.origin.group == "resampler"
    assert report.fault.origin.micro_batch == 1
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_record_loss_names_a_loss_computed_outside_the_model(tmp_path) -> None:
    # A plain nn.Module returns logits; the loss is computed in the loop, and it is what turns NaN.
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 4)
    with Guard(model, optimizer, console=False) as guard:
        for step in range(1, 5):
            out = model(x)
            loss = torch.log(out.square().mean() * (step != 3))  # log(0) at step 3, outside the model
            guard.record_loss(loss)
            loss.backward()
            if not guard.check():
                break
            optimizer.step()
            optimizer.zero_grad()
    report = guard.report()
    assert report.fault is not None and report.fault.step == 3
    assert report.fault.kind == "nonfinite_loss" and report.fault.origin.phase == "forward"
    assert report.fault.origin.group is None  # every module's output was finite: the loss itself
    assert_no_hooks(model)
    with Guard(model, console=False) as guard, pytest.raises(ValueError, match="scalar loss"):
        guard.record_loss(torch.ones(3))
    assert_no_hooks(model)


# -- Lightning -------------------------------------------------------------------------------------------


def lightning_fit(model: Any, tmp_path: Path, callbacks: list[Any], max_steps: int = 5, **kwargs: Any) -> Any:
    import lightning

    class FineTune(lightning.LightningModule):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(**batch).loss

        def configure_optimizers(self) -> Any:
            params = [p for p in self.parameters() if p.requires_grad]
            return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)

    trainer = lightning.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        gradient_clip_val=1.0,
        **kwargs,
    )
    loader = DataLoader(TinyDataset(model, n=2 * max_steps * 2, batch_size=2), batch_size=2)
    trainer.fit(FineTune(model), loader)
    return trainer


@pytest.mark.parametrize("precision", ["32", "16-mixed"])
def test_lightning_stops_at_the_fault_with_weights_unchanged_and_writes_the_report(tmp_path, precision) -> None:
    """fp32, and fp16 with a real GradScaler: Lightning's own "16-mixed" falls back to bf16 on the CPU, so
    its MixedPrecision plugin is given torch's CPU GradScaler, which unscales before the check and skips."""
    import lightning
    from lightning.pytorch.plugins import MixedPrecision

    from gradguard.integrations.lightning import GradGuardCallback

    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    plugins = [MixedPrecision("16-mixed", "cpu", scaler)] if scaler is not None else []

    snapshots: dict[str, dict[int, dict[str, torch.Tensor]]] = {"before": {}, "after": {}}

    class Snapshot(lightning.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            snapshots["before"][trainer.global_step + 1] = weights(pl_module)

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            snapshots["after"][trainer.global_step] = weights(pl_module)

    model = seed_vlm()
    guard = GradGuardCallback(expect_trainable=["resampler"], console=False)
    with inject_nan(resampler_of(model), start=3):
        trainer = lightning_fit(model, tmp_path, [guard, Snapshot()], plugins=plugins)
    assert trainer.global_step == 3  # stopped through trainer.should_stop after the faulty step
    assert guard.guard is not None and guard.guard.scaler is scaler
    report = Report.load(tmp_path)  # report_dir defaults to trainer.log_dir (= default_root_dir, no logger)
    assert guard.report is not None and guard.report.to_json() == report.to_json()
    f = fault_fields(report)
    assert (f["step"], f["phase"], f["group"], f["role"], f["trainable"]) == (
        3,
        "forward",
        "resampler",
        "connector",
        True,
    )
    assert f["kind"] == "nonfinite_loss" and f["weights_intact"]
    # Steps 1 and 2 trained; the faulty step 3 changed no weight, bitwise (AdamW with weight decay).
    changed = {
        s: any(not torch.equal(snapshots["before"][s][n], t) for n, t in snapshots["after"][s].items())
        for s in (1, 2, 3)
    }
    assert changed == {1: True, 2: True, 3: False}
    assert_no_hooks(model)


def test_lightning_on_fault_raise_and_a_healthy_run(tmp_path) -> None:
    from gradguard.integrations.lightning import GradGuardCallback

    model = seed_vlm()
    with inject_nan(resampler_of(model), start=2), pytest.raises(TrainingHealthError) as info:
        lightning_fit(model, tmp_path / "raise", [GradGuardCallback(on_fault="raise", console=False)])
    assert info.value.fault is not None and info.value.fault["step"] == 2
    assert (tmp_path / "raise" / "gradguard-report.json").exists()
    assert_no_hooks(model)

    # Healthy, with accumulation: one check per optimizer step, and the run is bitwise what it is bare.
    final = []
    for callbacks in ([], [GradGuardCallback(console=False, report_dir=tmp_path / "healthy")]):
        torch.manual_seed(0)
        model = seed_vlm()
        trainer = lightning_fit(model, tmp_path / "healthy", callbacks, max_steps=3, accumulate_grad_batches=2)
        assert trainer.global_step == 3
        final.append(weights(model))
    assert all(torch.equal(final[0][n], final[1][n]) for n in final[0])
    report = Report.load(tmp_path / "healthy")
    assert report.status == "healthy" and report.environment["steps"] == 3 and not report.errors(), report
    assert [r["step"] for r in report.history["recent"]] == [1, 2, 3]


def test_lightning_module_with_its_own_loss_and_several_children(tmp_path) -> None:
    """The common Lightning shape: several child modules, the loss computed in ``training_step``.

    The guard then watches the LightningModule itself (whose forward Lightning never calls) and gets the
    loss from ``on_before_backward``: a NaN is still a loss fault, born in the right module.
    """
    import lightning
    from torch.utils.data import TensorDataset

    from gradguard.integrations.lightning import GradGuardCallback

    class Regressor(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = torch.nn.Linear(4, 8)
            self.head = torch.nn.Linear(8, 1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return torch.nn.functional.mse_loss(self.head(self.encoder(x).tanh()), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Regressor()
    guard = GradGuardCallback(console=False, strict=True)  # strict: gradguard's own errors would surface
    assert guard.watched_module(module) is module
    assert GradGuardCallback(module="head").watched_module(module) is module.head
    with pytest.raises(ValueError, match="children are: encoder, head"):
        GradGuardCallback(module="model").watched_module(module)
    with pytest.raises(ValueError, match="on_fault"):
        GradGuardCallback(on_fault="explode")  # type: ignore[arg-type]

    loader = DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32, 1)), batch_size=4)
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_steps=5,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    with inject_nan(module.encoder, start=3):
        trainer.fit(module, loader)
    report = guard.report
    assert report is not None and report.fault is not None, report
    assert trainer.global_step == 3 and report.fault.step == 3
    assert report.fault.kind == "nonfinite_loss"  # the training_step loss reached the guard
    assert report.fault.origin.phase == "forward" and report.fault.origin.group == "encoder"
    losses = report.history["loss"]
    assert len(losses) == 3 and all(math.isfinite(v) and v > 0 for v in losses[:2])  # recorded every step
    assert_no_hooks(module)

    # The guard's history travels in Lightning checkpoints: a resumed run continues it.
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    resumed = GradGuardCallback(console=False, strict=True)
    again = lightning.Trainer(
        accelerator="cpu",
        max_steps=5,
        callbacks=[resumed],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path / "resumed"),
    )
    again.fit(module, loader, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.report is not None and resumed.report.status == "healthy", resumed.report
    assert resumed.report.history["steps"] == [1, 2, 3, 4, 5]
    assert resumed.report.history["nonfinite_loss_steps"] == [3]


# -- the examples run ------------------------------------------------------------------------------------


def run_example(name: str, *args: str) -> None:
    argv = sys.argv
    sys.argv = [str(EXAMPLES / name), *args]
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    except SystemExit as exc:
        assert exc.code in (0, None), f"{name} exited with {exc.code}"
    finally:
        sys.argv = argv
