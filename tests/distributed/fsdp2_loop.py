"""FSDP2 worker: ``fully_shard`` on a 2-rank CPU mesh (gloo), a plain loop with ``Guard``::

    torchrun --nproc_per_node=2 tests/distributed/fsdp2_loop.py OUT_DIR

(Accelerate applies FSDP only on accelerators: on CPU the HF Trainer silently falls back to DDP, so this
uses the loop every FSDP2 user writes.) Every rank trains on the SAME batch: FSDP2 averages the gradients
over the ranks, so the full gradients equal those of one process on that batch, and the per-group norms
that gradguard reduces from the local shards must equal the single-process ones (the test computes those
in its own process). Three runs in one process group:

1. ``bare``: no gradguard (to count the collectives FSDP2 itself issues);
2. ``guarded``: ``Guard`` built AFTER ``fully_shard`` (its hooks must sit on the sharded DTensor params);
3. ``fault``: a NaN injected on rank 1 only, from step 2: both ranks must stop at step 2.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

from _common import CollectiveCounter, dump, rank, report_dir, weights_digest

counter = CollectiveCounter()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from gradguard import Guard  # noqa: E402
from gradguard.testing.faults import inject_nan  # noqa: E402
from gradguard.testing.models import make_batch, tiny_llama  # noqa: E402

OUT = Path(sys.argv[1])
STEPS = 3
FAULT_STEP = 2


def run(tag: str, guarded: bool, fault: bool = False) -> dict[str, Any]:
    model = tiny_llama(seed=0)
    batch = make_batch(model, batch_size=2, seed=0)  # the same batch on every rank
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = Guard(model, optimizer, report_dir=report_dir(OUT, tag), console=False) if guarded else None
    injector = inject_nan(model.model.layers[0], start=FAULT_STEP) if fault and rank() == 1 else None
    steps: list[dict[str, Any]] = []
    counter.phase = tag
    with injector or contextlib.nullcontext():
        for step in range(1, STEPS + 1):
            loss = model(**batch).loss
            loss.backward()
            ok = guard.check() if guard else True
            last = guard.last if guard else None
            steps.append(
                {
                    "step": step,
                    "loss": last.loss if last else None,
                    "group_norm": last.group_norm if last else None,
                    "group_fired": last.group_fired if last else None,
                }
            )
            if not ok:
                break
            optimizer.step()
            optimizer.zero_grad()
    counter.phase = "idle"
    report = guard.close() if guard else None
    return {
        "steps": steps,
        "collectives": counter.of(tag),
        "weights": weights_digest(model),
        "sharded_params": len(guard.probes.shard_weights) if guard and guard.probes else None,
        "trainable_params": len(guard.probes.params) if guard and guard.probes else None,
        "groups": [g.name for g in report.groups] if report else None,
        "group_params": {g.name: g.params for g in report.groups} if report else None,
        "stopped": guard.stopped if guard else None,
        "fault_step": guard.fault.step if guard and guard.fault else None,
        "origin_rank": guard.fault.origin.rank if guard and guard.fault else None,
        "internal_errors": [f.message for f in guard.findings if f.kind == "internal_error"] if guard else [],
    }


if __name__ == "__main__":
    dist.init_process_group("gloo")
    runs = [("bare", False, False), ("guarded", True, False), ("fault", True, True)]
    dump(OUT, {tag: run(tag, guarded, fault) for tag, guarded, fault in runs})
    dist.destroy_process_group()
