"""Hook hygiene and leaks: every hook gradguard adds, it removes; models stay collectable; long runs stay flat.

After training ends in every way it can (normally, stopped by a fault, raised by a fault, interrupted by
Ctrl-C inside a forward), the model has exactly the hooks it had before, and it can be garbage-collected
once the user drops it. A long plain-loop soak shows no growth of Python memory, of gc-tracked objects,
of the history, or of the per-step time.
"""

from __future__ import annotations

import gc
import math
import os
import signal
import statistics
import time
import tracemalloc
import weakref
from array import array
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from test_reliability_bitwise import Config, build_model, train, validate_report
from torch import nn

from gradguard import GradGuard, Guard, TrainingHealthError
from gradguard.engine import shutdown
from gradguard.testing.faults import inject_nan

_MODULE_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)
_PARAM_HOOKS = ("_post_accumulate_grad_hooks", "_backward_hooks")


def hooks(model: nn.Module) -> dict[str, int]:
    """How many hooks of each kind every module and parameter holds, plus torch's global module hooks."""
    out: dict[str, int] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attr in _MODULE_HOOKS:
            n = len(getattr(module, attr, None) or {})
            if n:
                out[f"{name or '<root>'}.{attr}"] = n
    for name, p in model.named_parameters(remove_duplicate=False):
        for attr in _PARAM_HOOKS:
            n = len(getattr(p, attr, None) or {})
            if n:
                out[f"{name}.{attr}"] = n
    mod = torch.nn.modules.module
    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks"):
        n = len(getattr(mod, attr, {}))
        if n:
            out[f"torch.{attr}"] = n
    return out


def assert_collectable(ref: weakref.ref[nn.Module]) -> None:
    gc.collect()
    if ref() is not None:
        referrers = [type(r).__name__ for r in gc.get_referrers(ref())][:10]
        raise AssertionError(f"the model is still alive after training with gradguard; held by {referrers}")


CFG = Config("minicpmv2", steps=4)


@pytest.fixture
def signals_untouched() -> Iterator[None]:
    shutdown.close_all()  # guards other tests left open (e.g. strict mode re-raised before on_train_end)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    assert {sig: signal.getsignal(sig) for sig in before} == before, "gradguard left a signal handler installed"
    assert not shutdown.open_guards()


def _end_normally(model: nn.Module, callback: GradGuard) -> Any:
    return train(CFG, [callback], model=model)


def _end_by_stop(model: nn.Module, callback: GradGuard) -> Any:
    with inject_nan(model.resampler, start=2):
        run = train(CFG, [callback], model=model)
    assert run.trainer.state.global_step == 2 and run.report["status"] == "fault"
    return run


def _end_by_raise(model: nn.Module, callback: GradGuard) -> Any:
    with inject_nan(model.resampler, start=2), pytest.raises(TrainingHealthError) as info:
        train(CFG, [callback], model=model)
    assert info.value.report["fault"]["step"] == 2
    del info  # its traceback holds the training frames (and so the model)


def _end_by_ctrl_c(model: nn.Module, callback: GradGuard) -> Any:
    """A real Ctrl-C: SIGINT delivered while the resampler's forward runs at step 3."""
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, None):
        pytest.skip("SIGINT is ignored in this process (e.g. some test runners' workers)")
    calls = 0

    def press_ctrl_c(module: nn.Module, args: Any, out: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            os.kill(os.getpid(), signal.SIGINT)

    handle = model.resampler.register_forward_hook(press_ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt) as info:
            train(CFG, [callback], model=model)
        del info
    finally:
        handle.remove()


ENDINGS = {
    "normal": (_end_normally, {}),
    "stop": (_end_by_stop, {}),
    "raise": (_end_by_raise, {"on_fault": "raise"}),
    "ctrl-c": (_end_by_ctrl_c, {}),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_hooks_removed_and_model_collectable(ending: str, signals_untouched: None, tmp_path: Any) -> None:
    end, kwargs = ENDINGS[ending]
    model = build_model(CFG)
    before = hooks(model)
    callback = GradGuard(console=False, report_dir=str(tmp_path), **kwargs)
    end(model, callback)
    assert hooks(model) == before, f"hooks left behind after a {ending} end"
    # the report is on disk however training ended
    report = (tmp_path / "gradguard-report.json").read_text()
    import json

    validate_report(json.loads(report))
    ref = weakref.ref(model)
    del model, callback
    assert_collectable(ref)


def test_raised_interrupt_in_a_plain_loop_with_context_manager(signals_untouched: None) -> None:
    """``with Guard(...)`` closes on any exception, a ``KeyboardInterrupt`` raised by code included."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    before = hooks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(KeyboardInterrupt), Guard(model, opt, console=False) as guard:
        for step in range(5):
            model(torch.randn(2, 4)).sum().backward()
            guard.check()
            opt.step()
            opt.zero_grad()
            if step == 2:
                raise KeyboardInterrupt
    assert hooks(model) == before


def test_start_twice_restarts_instead_of_doubling_the_hooks(signals_untouched: None) -> None:
    """``Guard(model)`` starts at once; handing over the optimizer later with ``start(opt)`` must not leave
    the first start's hooks in place (they would fire twice per step and outlive ``close()``)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    before = hooks(model)
    guard = Guard(model, console=False)
    once = hooks(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard.start(opt)
    assert hooks(model) == once
    model(torch.randn(2, 4)).sum().backward()
    assert guard.check()
    assert len(guard.last.inputs) == 1 and not guard.findings  # one forward, seen once; optimizer covered
    guard.close()
    assert hooks(model) == before


def test_interrupted_trainer_run_is_cleaned_up_by_the_next_run(signals_untouched: None) -> None:
    """A ``KeyboardInterrupt`` *raised* in a forward (no signal) leaves ``trainer.train()`` without
    ``on_train_end``: Python gives a callback no way to see it. The guard stays open (its hooks only
    observe, and are bounded per step) until the next run on the same model, the process exit, or a
    SIGINT/SIGTERM closes it; a second run never stacks a second set of hooks."""
    model = build_model(CFG)
    before = hooks(model)

    def boom(module: nn.Module, args: Any, out: Any) -> None:
        raise KeyboardInterrupt

    handle = model.resampler.register_forward_hook(boom)
    callback = GradGuard(console=False)
    with pytest.raises(KeyboardInterrupt):
        train(CFG, [callback], model=model)
    handle.remove()
    assert callback.guard is not None and shutdown.open_guards() == [callback.guard]
    # a fresh callback on the same model (the usual notebook retry) closes the stale guard first
    run = train(CFG, [GradGuard(console=False)], model=model)
    assert run.trainer.state.global_step == CFG.steps and run.report["status"] == "healthy"
    assert hooks(model) == before
    assert not shutdown.open_guards()


# -- the soak ---------------------------------------------------------------------------------------------------
class TinyVLM(nn.Module):
    """Four recognisable groups (vision, connector, language, head) in a model that steps in ~1 ms."""

    def __init__(self) -> None:
        super().__init__()
        self.vision_tower = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32))
        self.multi_modal_projector = nn.Linear(32, 32)
        self.language_model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 32), nn.Tanh())
        self.lm_head = nn.Linear(32, 64)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
        image = self.multi_modal_projector(self.vision_tower(pixel_values)).unsqueeze(1)
        logits = self.lm_head(self.language_model(input_ids) + image)  # every text token sees the image
        loss = nn.functional.cross_entropy(logits.reshape(-1, 64), labels.reshape(-1), ignore_index=-100)
        return {"loss": loss, "logits": logits}


def soak(steps: int, history_size: int = 256, trace_memory: bool = True) -> dict[str, Any]:
    """Train ``steps`` steps with a Guard; sample Python memory, gc objects and per-step CPU time."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: one thread is faster and far steadier on a shared 2-core machine
    model = TinyVLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = Guard(model, opt, console=False, history_size=history_size)
    gen = torch.Generator().manual_seed(0)
    batches = [
        {
            "pixel_values": torch.randn(4, 16, generator=gen),
            "input_ids": torch.randint(0, 64, (4, 8), generator=gen),
            "labels": torch.randint(0, 64, (4, 8), generator=gen),
        }
        for _ in range(64)
    ]
    times = array("d", bytes(8 * steps))  # preallocated: the measurement itself must not allocate per step
    mem: list[tuple[int, int, int]] = []  # (step, traced bytes, gc objects)
    max_rows = 0
    if trace_memory:
        tracemalloc.start()
    try:
        for step in range(steps):
            t0 = time.process_time()
            model(**batches[step % len(batches)])["loss"].backward()
            assert guard.check()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times[step] = time.process_time() - t0
            max_rows = max(max_rows, len(guard.history.rows))
            if trace_memory and step % 250 == 249:
                gc.collect()
                mem.append((step + 1, tracemalloc.get_traced_memory()[0], len(gc.get_objects())))
    finally:
        tracemalloc.stop()
        torch.set_num_threads(threads)
        report = guard.close()
    window = min(500, steps // 4)
    return {
        "steps": steps,
        "report": report,
        "mem": mem,
        "max_history_rows": max_rows,
        "first_ms": 1e3 * statistics.median(times[window : 2 * window]),  # after a warm-up window
        "last_ms": 1e3 * statistics.median(times[-window:]),
        "history_size": history_size,
        "findings": report.findings,
    }


@pytest.mark.slow
def test_long_run_is_flat() -> None:
    """Memory, gc objects, history and per-step time do not grow (2,000 steps in CI; set
    GRADGUARD_SOAK_STEPS=20000 for the long local run)."""
    steps = int(os.environ.get("GRADGUARD_SOAK_STEPS", "2000"))
    r = soak(steps)
    assert r["report"].status == "healthy" and not [f for f in r["findings"] if f.severity != "info"], r["findings"]
    # the history is bounded by its capacity, however long the run
    assert r["max_history_rows"] < r["history_size"]
    # memory: compare the second sample (history already full) with the last one
    (_, mem0, obj0), (_, mem1, obj1) = r["mem"][1], r["mem"][-1]
    growth = mem1 - mem0
    print(
        f"\nsoak {steps} steps: traced Python memory {mem0 / 1024:.0f} KiB -> {mem1 / 1024:.0f} KiB "
        f"({growth / 1024:+.0f} KiB), gc objects {obj0} -> {obj1} ({obj1 - obj0:+d}), "
        f"history rows <= {r['max_history_rows']}, median step CPU time {r['first_ms']:.2f} ms (early) "
        f"-> {r['last_ms']:.2f} ms (late)"
    )
    # The history's sawtooth (rows fill up to the capacity, then halve) is < 100 KiB here; a leak of
    # 64 bytes per step would add 128 KiB over 2,000 steps.
    assert growth < 128 * 1024, f"Python memory grew by {growth / 1024:.0f} KiB over {steps} steps"
    assert obj1 - obj0 < 2_000, f"{obj1 - obj0} more gc-tracked objects after {steps} steps"
    # time: generous (a step that got 3x slower would be a real leak; noise is far below that)
    assert r["last_ms"] < 3 * r["first_ms"] + 0.5, (r["first_ms"], r["last_ms"])
    assert math.isfinite(r["first_ms"])
