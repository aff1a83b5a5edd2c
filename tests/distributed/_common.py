"""Helpers shared by the torchrun worker scripts (not a test module: pytest does not collect it)."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# The collectives a guard could add on the steady-state path, counted per phase of the worker.
COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_object",
    "all_gather_into_tensor",
    "broadcast",
    "broadcast_object_list",
    "reduce_scatter_tensor",
    "gather_object",
    "barrier",
)


class CollectiveCounter:
    """Counts Python-level ``torch.distributed`` collective calls, by the phase set in ``.phase``.

    The functions are looked up at call time by gradguard (``torch.distributed.all_reduce``), so wrapping
    the module attributes sees every call it makes. DDP's own bucketed gradient all-reduce runs in C++
    and is not counted: the point is to compare a bare run with a guarded one.
    """

    def __init__(self) -> None:
        self.phase = "setup"
        self.counts: dict[str, Counter[str]] = {}
        for name in COLLECTIVES:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.counts.setdefault(self.phase, Counter())[name] += 1
            return fn(*args, **kwargs)

        return counted

    def of(self, phase: str) -> dict[str, int]:
        return dict(self.counts.get(phase, {}))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def weights_digest(model: torch.nn.Module) -> str:
    """A hash of this rank's parameter bytes (a DTensor's local shard, a ZeRO-3 parameter's partition)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        t = p.ds_tensor if hasattr(p, "ds_tensor") else p
        t = t.detach()
        t = t.to_local() if hasattr(t, "to_local") else t
        h.update(name.encode())
        h.update(t.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def dump(out: Path, data: dict[str, Any]) -> None:
    """Write this rank's results as ``rank<r>.json`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank()}.json").write_text(json.dumps(data, indent=1, default=str))


def weights_callback(model: torch.nn.Module) -> Any:
    """A Trainer callback keeping this rank's weight digest after every optimizer step, in ``.digests``.

    Proves a skipped update changed nothing: after the faulty step the digest is the previous step's.
    """
    from transformers import TrainerCallback

    class Weights(TrainerCallback):
        def __init__(self) -> None:
            self.digests: dict[int, str] = {}

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.digests[state.global_step] = weights_digest(model)

    return Weights()


def report_dir(out: Path, tag: str) -> Path:
    """A report folder per rank, so that the test can see that only rank 0 writes one."""
    return out / tag / f"rank{rank()}"


def train_once(
    out: Path,
    tag: str,
    counter: CollectiveCounter,
    *,
    guarded: bool,
    fault: bool,
    steps: int,
    fault_step: int,
    **extra_args: Any,
) -> tuple[Any, Any, Any]:
    """One real HF Trainer run of the tiny Llama on this process group: (trainer, guard or None, weights).

    The fault is born on rank 1 only: the forward output of the first decoder layer becomes NaN from
    ``fault_step`` on. ``extra_args`` go to ``TrainingArguments`` (e.g. ``deepspeed=config``).
    """
    import contextlib

    from transformers import Trainer, TrainingArguments

    from gradguard import GradGuard
    from gradguard.testing.faults import inject_nan
    from gradguard.testing.models import TinyDataset, tiny_llama

    model = tiny_llama(seed=0)
    args = TrainingArguments(
        output_dir=str(out / tag),
        max_steps=steps,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        use_cpu=True,
        ddp_backend="gloo",
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        **extra_args,
    )
    callback = GradGuard(report_dir=str(report_dir(out, tag)), console=False) if guarded else None
    weights = weights_callback(model)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TinyDataset(model, n=32),
        callbacks=[weights] + ([callback] if callback else []),
    )
    injector = inject_nan(model.model.layers[0], start=fault_step) if fault and rank() == 1 else None
    counter.phase = tag
    with injector or contextlib.nullcontext():
        trainer.train()
    counter.phase = "idle"
    return trainer, (callback.guard if callback else None), weights
