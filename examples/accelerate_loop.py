"""gradguard in an Accelerate loop: three added lines (marked ``# gradguard``).

The same tiny MiniCPM-V-shaped LoRA set-up as ``plain_loop.py`` (random weights, nothing downloaded), run
through ``accelerate``: ``accelerator.prepare``, ``accelerator.accumulate``, ``accelerator.backward`` and
``accelerator.clip_grad_norm_``. Give the guard the *prepared* model and optimizer, and the fp16 GradScaler
(``accelerator.scaler``; it is ``None`` for fp32 and bf16, and on the CPU, where Accelerate has no fp16
scaler). For the demo a NaN is injected into the resampler from its 5th forward call (the first
micro-batch of optimizer step 3): the guard stops the run at step 3 before the poisoned update.

    python examples/accelerate_loop.py                          # fp32, the injected fault
    python examples/accelerate_loop.py --mixed-precision bf16   # bf16 autocast
    python examples/accelerate_loop.py --healthy                # no fault
    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 examples/accelerate_loop.py   # DDP: all ranks stop at step 3
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader

from gradguard import Guard
from gradguard.testing.faults import inject_nan
from gradguard.testing.models import TinyDataset, tiny_minicpmv2

ACCUMULATION = 2  # micro-batches per optimizer step
STEPS = 6  # optimizer steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--healthy", action="store_true", help="do not inject the fault")
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--report-dir", default="gradguard-example/accelerate_loop")
    args = parser.parse_args(argv)

    accelerator = Accelerator(gradient_accumulation_steps=ACCUMULATION, mixed_precision=args.mixed_precision)
    model = get_peft_model(
        tiny_minicpmv2(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["resampler"])
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loader = DataLoader(TinyDataset(model, n=2 * STEPS * ACCUMULATION, batch_size=2), batch_size=2)
    resampler = model.base_model.model.resampler  # before prepare: DDP would wrap the model
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    guard = Guard(  # gradguard
        model, optimizer, expect_trainable=["resampler"], report_dir=args.report_dir, scaler=accelerator.scaler
    )
    fault = contextlib.nullcontext() if args.healthy else inject_nan(resampler, start=5)  # demo only
    with fault:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:  # the micro-batch that steps the optimizer
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                    if not guard.check():  # gradguard: False = a fault; its update was already skipped
                        break
                optimizer.step()
                optimizer.zero_grad()
    report = guard.close()  # gradguard: removes the hooks, prints and writes the report (rank 0)

    fault_info = report.fault
    where = f" at step {fault_info.step} in {fault_info.origin.group}" if fault_info else ""
    accelerator.print(f"accelerate loop ({args.mixed_precision}): {report.status}{where}; report in {args.report_dir}")
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
