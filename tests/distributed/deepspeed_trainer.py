"""DeepSpeed worker: the real HF Trainer under DeepSpeed ZeRO (stage 2 or 3) on 2 CPU ranks (gloo)::

    torchrun --nproc_per_node=2 tests/distributed/deepspeed_trainer.py STAGE OUT_DIR

DeepSpeed runs its optimizer step inside ``accelerator.backward()``, so gradguard checks inside that step
(``gradguard.engine.zero``), reading each rank's gradient partition. Three runs in one process
group: ``bare``, ``guarded`` (same losses; per-group norms equal to DeepSpeed's own full gradients; one
all-reduce per step added) and ``fault`` (NaN on rank 1 only from step 3: both ranks stop at step 3,
the update is skipped).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

from _common import CollectiveCounter, dump, train_once

counter = CollectiveCounter()


from gradguard.engine import zero as gg_deepspeed  # noqa: E402

STAGE = int(sys.argv[1])
OUT = Path(sys.argv[2])
STEPS = 4
FAULT_STEP = 3
REFERENCE: list[dict[str, float]] = []  # per step: group norms of DeepSpeed's full gradients


def read_with_reference(self: gg_deepspeed.StepHook) -> None:
    """gradguard's read, then the reference: every full gradient via safe_get_full_grad (test only)."""
    read_partitions(self)
    from deepspeed.utils import safe_get_full_grad

    probes = self.guard.probes
    assert probes is not None
    phase, counter.phase = counter.phase, "reference"  # its collectives are not gradguard's
    sumsq: dict[str, float] = {}
    for i, (_, p) in enumerate(probes.params):
        group = probes.group_names[probes.param_group[i]]
        sumsq[group] = sumsq.get(group, 0.0) + float(safe_get_full_grad(p).double().square().sum())
    counter.phase = phase
    REFERENCE.append({g: math.sqrt(v) for g, v in sumsq.items()})


read_partitions = gg_deepspeed.StepHook._read_partitions
gg_deepspeed.StepHook._read_partitions = read_with_reference  # type: ignore[method-assign]


def run(tag: str, guarded: bool, fault: bool = False) -> dict[str, Any]:
    REFERENCE.clear()
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {"stage": STAGE},
        "bf16": {"enabled": False},
    }
    trainer, guard, weights = train_once(
        OUT, tag, counter, guarded=guarded, fault=fault, steps=STEPS, fault_step=FAULT_STEP, deepspeed=config
    )
    report = guard.report() if guard else None
    return {
        "global_step": trainer.state.global_step,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "digests": weights.digests,
        "collectives": counter.of(tag),
        "norms": [r["norms"] for r in guard.history.rows] if guard else None,
        "reference": list(REFERENCE),
        "group_params": {g.name: g.params for g in report.groups} if report else None,
        "in_optimizer": {g.name: g.in_optimizer for g in report.groups} if report else None,
        "findings": [f"{f.code} {f.message}" for f in guard.findings] if guard else [],
        "internal_errors": [f.message for f in guard.findings if f.kind == "internal_error"] if guard else [],
        "stopped": guard.stopped if guard else None,
        "fault_step": guard.fault.step if guard and guard.fault else None,
        "origin_rank": guard.fault.origin.rank if guard and guard.fault else None,
        "weights_intact": guard.fault.weights_intact if guard and guard.fault else None,
    }


if __name__ == "__main__":
    runs = [("bare", False, False), ("guarded", True, False), ("fault", True, True)]
    dump(OUT, {tag: run(tag, guarded, fault) for tag, guarded, fault in runs})
