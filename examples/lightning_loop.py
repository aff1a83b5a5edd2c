"""gradguard in PyTorch Lightning: one callback (``pip install gradguard[lightning]``).

The same tiny MiniCPM-V-shaped LoRA set-up as ``plain_loop.py`` (random weights, nothing downloaded) in a
``LightningModule``, with gradient accumulation and clipping. ``GradGuardCallback`` checks every optimizer
step after backward and before the update (Lightning's ``on_before_optimizer_step``), skips a poisoned
update and stops through ``trainer.should_stop``; ``on_fault="raise"`` raises ``TrainingHealthError`` out
of ``trainer.fit`` instead. For the demo a NaN is injected into the resampler from its 5th forward call
(the first micro-batch of optimizer step 3).

    python examples/lightning_loop.py               # the injected fault: stops at step 3
    python examples/lightning_loop.py --healthy     # no fault
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import lightning
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader

from gradguard.integrations.lightning import GradGuardCallback
from gradguard.testing.faults import inject_nan
from gradguard.testing.models import TinyDataset, tiny_minicpmv2

ACCUMULATION = 2  # micro-batches per optimizer step
STEPS = 6  # optimizer steps


class FineTune(lightning.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model  # the guard watches this child: group names read as the model's own

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--healthy", action="store_true", help="do not inject the fault")
    parser.add_argument("--report-dir", default="gradguard-example/lightning_loop")
    args = parser.parse_args(argv)

    model = get_peft_model(
        tiny_minicpmv2(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["resampler"])
    )
    loader = DataLoader(TinyDataset(model, n=2 * STEPS * ACCUMULATION, batch_size=2), batch_size=2)
    guard = GradGuardCallback(expect_trainable=["resampler"], report_dir=args.report_dir)
    trainer = lightning.Trainer(
        accelerator="cpu",
        max_steps=STEPS,
        accumulate_grad_batches=ACCUMULATION,
        gradient_clip_val=1.0,
        callbacks=[guard],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=args.report_dir,
    )
    resampler = model.base_model.model.resampler
    fault = contextlib.nullcontext() if args.healthy else inject_nan(resampler, start=5)  # demo only
    with fault:
        trainer.fit(FineTune(model), loader)

    report = guard.report  # also printed, and written to report_dir, when training ended
    assert report is not None
    fault_info = report.fault
    where = f" at step {fault_info.step} in {fault_info.origin.group}" if fault_info else ""
    print(f"lightning: {report.status}{where} (global_step {trainer.global_step}); report in {args.report_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
