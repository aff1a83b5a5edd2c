"""gradguard in a hand-written PyTorch loop: three added lines (marked ``# gradguard``).

A tiny MiniCPM-V-shaped model (random weights, nothing downloaded) is LoRA-tuned with the resampler fully
trained (``modules_to_save``), with gradient accumulation and clipping. For the demo a NaN is injected into
the resampler's output from its 5th forward call (the first micro-batch of optimizer step 3); the guard
stops the run at step 3 before the poisoned update, names the resampler, and prints and writes the report.

    python examples/plain_loop.py                 # the injected fault
    python examples/plain_loop.py --healthy       # no fault: the same loop, bitwise as without gradguard
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from peft import LoraConfig, get_peft_model

from gradguard import Guard
from gradguard.testing.faults import inject_nan
from gradguard.testing.models import make_batch, tiny_minicpmv2

ACCUMULATION = 2  # micro-batches per optimizer step
STEPS = 6  # optimizer steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--healthy", action="store_true", help="do not inject the fault")
    parser.add_argument("--report-dir", default="gradguard-example/plain_loop")
    args = parser.parse_args(argv)

    model = get_peft_model(
        tiny_minicpmv2(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["resampler"])
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    batches = [make_batch(model, seed=i) for i in range(STEPS * ACCUMULATION)]

    guard = Guard(model, optimizer, expect_trainable=["resampler"], report_dir=args.report_dir)  # gradguard
    resampler = model.base_model.model.resampler
    fault = contextlib.nullcontext() if args.healthy else inject_nan(resampler, start=5)  # demo only
    with fault:
        for i, batch in enumerate(batches):
            loss = model(**batch).loss / ACCUMULATION
            loss.backward()
            if (i + 1) % ACCUMULATION:  # accumulate: check only on the iterations that step the optimizer
                continue
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            if not guard.check():  # gradguard: False = a fault; its update was already skipped
                break
            optimizer.step()
            optimizer.zero_grad()
    report = guard.close()  # gradguard: removes the hooks, prints and writes the report

    fault_info = report.fault
    where = f" at step {fault_info.step} in {fault_info.origin.group}" if fault_info else ""
    print(f"plain loop: {report.status}{where}; report in {args.report_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
