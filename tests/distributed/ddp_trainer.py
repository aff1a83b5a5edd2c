"""DDP worker: the real HF Trainer on 2 CPU ranks (gloo), launched by ``tests/test_distributed.py``::

    torchrun --nproc_per_node=2 tests/distributed/ddp_trainer.py OUT_DIR

Three runs in one process group (one launch: starting Python + transformers dominates the cost):

1. ``bare``: no gradguard;
2. ``guarded``: the same run with ``GradGuard()``: same losses and weights, one all-reduce per step;
3. ``fault``: ``GradGuard()`` with a NaN injected on rank 1 only, from step 3.

Each rank writes ``OUT_DIR/rank<r>.json`` with what the test checks.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from _common import CollectiveCounter, dump, train_once

counter = CollectiveCounter()  # before anything can bind the collectives


OUT = Path(sys.argv[1])
STEPS = 4
FAULT_STEP = 3


def run(tag: str, guarded: bool, fault: bool = False) -> dict[str, Any]:
    trainer, guard, weights = train_once(
        OUT, tag, counter, guarded=guarded, fault=fault, steps=STEPS, fault_step=FAULT_STEP
    )
    return {
        "global_step": trainer.state.global_step,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "digests": weights.digests,
        "collectives": counter.of(tag),
        "stopped": guard.stopped if guard else None,
        "fault_step": guard.fault.step if guard and guard.fault else None,
        "group_norm": guard.last.group_norm if guard and guard.last else None,
        "disabled": guard.disabled if guard else None,
        "internal_errors": [f.message for f in guard.findings if f.kind == "internal_error"] if guard else [],
        "origin_rank": guard.fault.origin.rank if guard and guard.fault else None,
    }


if __name__ == "__main__":
    runs = [("bare", False, False), ("guarded", True, False), ("fault", True, True)]
    dump(OUT, {tag: run(tag, guarded, fault) for tag, guarded, fault in runs})
