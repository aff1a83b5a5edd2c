"""Where gradguard's host time goes, per optimizer step: the per-probe profile of docs/performance.md.

    python benchmarks/host_time.py                         # the three CPU workloads, 40 steps (120 on the LLaVA)
    python benchmarks/host_time.py --workloads llama_lora --steps 100
    python benchmarks/host_time.py --json benchmarks/results/host-time.json

On a GPU, a small model's step is launch-bound: the device waits for Python, so every microsecond gradguard
spends on the host shows up in the step. This measures that host work directly, on one CPU thread, in a plain
loop (forward, backward, ``clip_grad_norm_``, ``guard.check()``, ``optimizer.step()``, ``zero_grad``) on the
workloads of ``benchmarks/run.py``: every hook and step method of gradguard is wrapped in a timer of the
thread's CPU time (``time.thread_time``: steady on a shared machine; on CPU, autograd runs the hooks on the
calling thread) that books its *exclusive* time (a nested timed call, e.g. the norms taken inside
``check()``, is booked to itself, not twice). The timers' own cost is left in the step times; it is a few
microseconds per call. The first ``--warmup`` steps are not counted.

The lines of the table:

- *gradient hooks*: the post-accumulate-grad hook on each trainable tensor (it notes the tensor);
- *gradient norms*: one ``_foreach_norm`` per (device, dtype) when a backward ends. On CPU this reads every
  gradient once (memory-bound, and what any per-step gradient statistic pays); shown apart, since the
  issue's budget for the full fine-tune excludes it;
- *group outputs*: each group's forward hook (the abs-max of its output) and the deferred head check;
- *top-model hooks*: the pre-forward and forward hooks of the model (raw loss, label counts, RNG copy,
  autocast state, the backward watch);
- *check()*: packing the step's values, the one host read, the update-to-weight ratio sample, detectors,
  trends, history.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import workloads

from gradguard import Guard
from gradguard.testing.models import make_batch

# (category, module, class, method, factory): a factory method returns the hook closure, which is what gets
# timed. Names an installed gradguard lacks (an older version, for a before/after comparison) are skipped.
TIMED = [
    ("gradient hooks", "probes", "Probes", "_grad_hook", True),
    ("gradient norms", "probes", "Probes", "take_norms", False),
    ("group outputs", "probes", "Probes", "_group_hook", True),
    ("group outputs", "probes", "Probes", "settle", False),
    ("top-model hooks", "probes", "Probes", "_pre_hook", False),
    ("top-model hooks", "probes", "Probes", "_top_hook", False),
    ("top-model hooks", "probes", "Probes", "_crash_hook", False),
    ("top-model hooks", "probes", "Probes", "_watch_backward", False),
    ("top-model hooks", "trace", "Tracer", "_pre_hook", False),
    ("check()", "guard", "Guard", "check", False),
    ("check()", "checker", "Checker", "reset", False),
]
ORDER = ["gradient hooks", "gradient norms", "group outputs", "top-model hooks", "check()"]


class Clock:
    """Exclusive time per category: a call nested in a timed call is subtracted from its parent."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[list[float]] = []  # per open call: [time spent in nested timed calls]
        self.on = False

    def timed(self, category: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not self.on:
                return fn(*args, **kwargs)
            self._stack.append([0.0])
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = time.thread_time() - t0
                nested = self._stack.pop()[0]
                self.spent[category] += elapsed - nested
                self.calls[category] += 1
                if self._stack:
                    self._stack[-1][0] += elapsed

        return wrapper

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        spent, calls = dict(self.spent), dict(self.calls)
        self.spent.clear()
        self.calls.clear()
        return spent, calls


@contextmanager
def instrumented(clock: Clock) -> Iterator[None]:
    """Wrap gradguard's hooks and step methods in the clock's timers (class attributes, put back on exit)."""
    saved = []
    for category, module, cls_name, name, factory in TIMED:
        try:
            cls = getattr(importlib.import_module(f"gradguard.engine.{module}"), cls_name)
            original = cls.__dict__[name]
        except (ImportError, AttributeError, KeyError):
            continue
        saved.append((cls, name, original))
        if factory:

            def make(self: Any, *a: Any, _orig: Any = original, _cat: str = category) -> Any:
                return clock.timed(_cat, _orig(self, *a))

            setattr(cls, name, make)
        else:
            setattr(cls, name, clock.timed(category, original))
    try:
        yield
    finally:
        for cls, name, original in saved:
            setattr(cls, name, original)


def measure(name: str, steps: int, warmup: int) -> dict[str, Any]:
    wl = workloads()[name]
    steps *= wl.step_scale
    model = wl.build()
    model.train()
    batch = make_batch(model, batch_size=wl.batch_size, seq_len=wl.seq_len, seed=0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    clock = Clock()
    step_ms, per_step = [], defaultdict(list)
    with instrumented(clock):
        guard = Guard(model, optimizer, console=False)
        try:
            for i in range(warmup + steps):
                clock.on = i >= warmup
                t0 = time.process_time()
                model(**batch).loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                if not guard.check():
                    raise RuntimeError(f"gradguard stopped a healthy benchmark run: {guard.fault}")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                spent, _ = clock.take()
                if clock.on:
                    step_ms.append(1e3 * (time.process_time() - t0))
                    for category in ORDER:
                        per_step[category].append(1e3 * spent.get(category, 0.0))
        finally:
            clock.on = False
            guard.close()
    rows = {category: statistics.median(per_step[category]) for category in ORDER}
    total = sum(rows.values())
    step = statistics.median(step_ms)
    return {
        "workload": name,
        "description": wl.description,
        "steps": steps,
        "step_ms": round(step, 2),
        "ms": {k: round(v, 3) for k, v in rows.items()},
        "total_ms": round(total, 3),
        "total_excluding_norms_ms": round(total - rows["gradient norms"], 3),
        "share": round(total / step, 4),
    }


def table(results: list[dict[str, Any]]) -> str:
    head = ["", *(f"{r['workload']} ({r['step_ms']:.0f} ms step)" for r in results)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for category in ORDER:
        lines.append(f"| {category} | " + " | ".join(f"{r['ms'][category]:.2f} ms" for r in results) + " |")
    totals = " | ".join(f"**{r['total_ms']:.2f} ms ({100 * r['share']:.1f}%)**" for r in results)
    lines.append(f"| **total** | {totals} |")
    lines.append("| total without the norm read | " + " | ".join(
        f"{r['total_excluding_norms_ms']:.2f} ms" for r in results
    ) + " |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="llama_full,llama_lora,llava_lora")
    ap.add_argument("--steps", type=int, default=40, help="counted steps (times the workload's step scale)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # one thread: the host work of one Python thread, steady on a shared machine
    results = [measure(name, args.steps, args.warmup) for name in args.workloads.split(",")]
    print(table(results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
