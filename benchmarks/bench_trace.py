"""Overhead of ``GradGuard(trace="full")`` (every-module finiteness tracing) against a bare run.

Measured the way DESIGN.md §5 asks: one thread, process CPU time, arms interleaved (the order alternates
between repetitions), the median of the per-repetition ratios. Two set-ups:

- ``trainer``: the real HF ``Trainer``, a tiny Llama full fine-tune (the set-up the reference numbers in
  DESIGN.md were taken in: ``DebugUnderflowOverflow`` 1.36x, ``detect_anomaly`` 1.49x). Only the training
  steps after a warm-up are timed (a callback reads the clock), not the Trainer's construction.
- ``loop``: a hand-written loop (forward, backward, ``guard.check()``, AdamW step) on the same model: the
  harshest view, since nothing but the model's own work dilutes the hooks' cost.

Arms: ``bare`` (no gradguard), ``guard`` (gradguard's default, ``trace=None``) and ``trace``
(``trace="full"``); ``trace/guard`` is what trace mode adds on top of the default. The target for
``trace`` was under 1.15x ``bare`` in the Trainer; gradguard's default alone already costs about that on
this model (see docs/localization.md for the measured numbers).

    .venv/bin/python benchmarks/bench_trace.py                 # both set-ups
    .venv/bin/python benchmarks/bench_trace.py --setup trainer --reps 9 --steps 40
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import statistics
import tempfile
import time
import warnings
from typing import Any

import torch

ARMS = ("bare", "guard", "trace")


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    logging.getLogger("gradguard").setLevel(logging.ERROR)
    import transformers

    transformers.logging.set_verbosity_error()


def trainer_run(arm: str, steps: int, warmup: int) -> float:
    """CPU seconds of ``steps - warmup`` Trainer steps of a tiny Llama full fine-tune."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from gradguard import GradGuard
    from gradguard.testing.models import TinyDataset, tiny_llama

    class Clock(TrainerCallback):
        start = end = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == warmup:
                self.start = time.process_time()

        def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.end = time.process_time()

    model = tiny_llama()
    clock = Clock()
    callbacks: list[Any] = [clock]
    if arm != "bare":
        callbacks.append(GradGuard(console=False, trace="full" if arm == "trace" else None))
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=steps,
            per_device_train_batch_size=2,
            learning_rate=1e-4,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            logging_steps=10**6,
            disable_tqdm=True,
            seed=0,
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=TinyDataset(model, n=2 * steps), callbacks=callbacks)
        with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints its final metrics
            trainer.train()
    return clock.end - clock.start


def loop_run(arm: str, steps: int, warmup: int) -> float:
    """CPU seconds of ``steps - warmup`` steps of a plain loop on the same model and batch size."""
    from gradguard import Guard
    from gradguard.testing.models import make_batch, tiny_llama

    model = tiny_llama()
    batch = make_batch(model, batch_size=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    guard = None if arm == "bare" else Guard(model, opt, console=False, trace="full" if arm == "trace" else None)
    start = 0.0
    for i in range(steps):
        if i == warmup:
            start = time.process_time()
        model(**batch).loss.backward()
        if guard is not None:
            guard.check()
        opt.step()
        opt.zero_grad()
    elapsed = time.process_time() - start
    if guard is not None:
        guard.close()
    return elapsed


def measure(setup: str, reps: int, steps: int, warmup: int) -> dict[str, Any]:
    run = trainer_run if setup == "trainer" else loop_run
    run("bare", warmup + 2, warmup)  # imports, first-call costs
    times: dict[str, list[float]] = {a: [] for a in ARMS}
    for r in range(reps):
        order = ARMS if r % 2 == 0 else ARMS[::-1]  # interleaved, alternating order
        for arm in order:
            times[arm].append(run(arm, steps, warmup))
    ratios = {arm: statistics.median(t / b for t, b in zip(times[arm], times["bare"])) for arm in ARMS if arm != "bare"}
    # What trace mode adds on top of gradguard's default.
    ratios["trace/guard"] = statistics.median(t / g for t, g in zip(times["trace"], times["guard"]))
    return {
        "setup": setup,
        "bare_ms_per_step": 1000 * statistics.median(times["bare"]) / (steps - warmup),
        "ratios": ratios,
        "bare_vs_bare_spread": (max(times["bare"]) - min(times["bare"])) / statistics.median(times["bare"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setup", choices=("trainer", "loop", "both"), default="both")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    opts = parser.parse_args()
    torch.set_num_threads(1)
    _quiet()
    setups = ("trainer", "loop") if opts.setup == "both" else (opts.setup,)
    for setup in setups:
        res = measure(setup, opts.reps, opts.steps, opts.warmup)
        ratios = ", ".join(f"{arm} {r:.3f}x" for arm, r in res["ratios"].items())
        print(
            f"{setup:8s} bare {res['bare_ms_per_step']:.2f} ms/step (spread {100 * res['bare_vs_bare_spread']:.1f}%)"
            f" | median ratios: {ratios}"
        )


if __name__ == "__main__":
    main()
