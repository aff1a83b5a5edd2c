"""Fault injection: prove that your guard is wired by breaking a run on purpose.

Every injector is a context manager (and a decorator) that adds one hook and removes it on exit::

    with inject_nan(model.resampler, start=3):          # NaN in the resampler's output from call 3 on
        trainer.train()

Calls are counted per module, in training forward passes only (grad enabled). Without gradient
accumulation or checkpointing, call *k* is optimizer step *k*.

- ``inject_nan`` / ``inject_inf``: a non-finite value in a module's forward output (``phase="forward"``)
  or in the gradient flowing back through it (``phase="backward"``: identity forward, NaN gradient).
- ``zero_grad``: the gradient flowing back through the module is multiplied by zero.
- ``detach_output``: the module's output is detached (its parameters get no gradient at all).
- ``mask_labels``: every label of the batch becomes ``-100`` (no supervision).
- ``corrupt_input``: a floating-point input of the batch (``pixel_values`` …) becomes NaN.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

Fault = Literal["nan", "inf", "zero", "detach"]
Phase = Literal["forward", "backward"]


class _ScaleGrad(torch.autograd.Function):
    """Identity in forward; multiplies the incoming gradient by ``factor`` in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def _map_first_tensor(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to the first floating tensor of a module output, keeping its structure."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, tuple):
        for i, v in enumerate(out):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                return (*out[:i], fn(v), *out[i + 1 :])
        return out
    if isinstance(out, list):
        return list(_map_first_tensor(tuple(out), fn))
    if isinstance(out, dict):  # ModelOutput
        for k, v in out.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                out[k] = fn(v)
                return out
    return out


class _Injector(contextlib.ContextDecorator):
    """Base class: counts training calls and adds/removes exactly one hook."""

    def __init__(self, module: nn.Module, *, start: int = 1, times: int | None = None) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"inject into a torch.nn.Module, got {type(module).__name__}")
        if start < 1:
            raise ValueError(f"start counts training calls from 1, got {start}")
        self.module = module
        self.start = start
        self.times = times
        self.calls = 0
        self.fired = 0
        self._handle: Any = None

    def _due(self) -> bool:
        if not torch.is_grad_enabled():
            return False
        self.calls += 1
        if self.calls < self.start or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True

    def __enter__(self) -> _Injector:
        self._handle = self._install()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _install(self) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError


class OutputFault(_Injector):
    def __init__(
        self,
        module: nn.Module,
        fault: Fault = "nan",
        phase: Phase = "forward",
        *,
        start: int = 1,
        times: int | None = None,
    ) -> None:
        super().__init__(module, start=start, times=times)
        if fault not in ("nan", "inf", "zero", "detach"):
            raise ValueError(f"fault must be 'nan', 'inf', 'zero' or 'detach', got {fault!r}")
        if phase not in ("forward", "backward"):
            raise ValueError(f"phase must be 'forward' or 'backward', got {phase!r}")
        self.fault, self.phase = fault, phase

    def _install(self) -> Any:
        # prepend: the fault must look as if the module itself produced it, so every other forward hook
        # (gradguard's probes included, whenever they were attached) sees the faulty output.
        return self.module.register_forward_hook(self._hook, prepend=True)

    def _hook(self, module: nn.Module, args: Any, out: Any) -> Any:
        if not self._due():
            return None
        value = {"nan": float("nan"), "inf": float("inf"), "zero": 0.0}.get(self.fault, 0.0)
        if self.fault == "detach":
            return _map_first_tensor(out, lambda t: t.detach())
        if self.phase == "forward":
            # Keep the graph intact so backward still runs through the module (as a real overflow does).
            return _map_first_tensor(out, lambda t: t + (t.detach() * 0 + value))
        return _map_first_tensor(out, lambda t: _ScaleGrad.apply(t, value))


def inject_nan(module: nn.Module, phase: Phase = "forward", *, start: int = 1, times: int | None = None) -> OutputFault:
    """NaN in ``module``'s output (forward) or in the gradient through it (backward), from call ``start``."""
    return OutputFault(module, "nan", phase, start=start, times=times)


def inject_inf(module: nn.Module, phase: Phase = "forward", *, start: int = 1, times: int | None = None) -> OutputFault:
    """Like :func:`inject_nan` with ``+inf``."""
    return OutputFault(module, "inf", phase, start=start, times=times)


def zero_grad(module: nn.Module, *, start: int = 1, times: int | None = None) -> OutputFault:
    """The gradient flowing back through ``module`` becomes exactly zero."""
    return OutputFault(module, "zero", "backward", start=start, times=times)


def detach_output(module: nn.Module, *, start: int = 1, times: int | None = None) -> OutputFault:
    """``module``'s output is detached: its trainable parameters get no gradient (a dead group)."""
    return OutputFault(module, "detach", "forward", start=start, times=times)


class BatchFault(_Injector):
    """Rewrites the top model's keyword inputs before forward."""

    def __init__(
        self, model: nn.Module, key: str, make: Callable[[torch.Tensor], torch.Tensor], *, start: int, times: int | None
    ) -> None:
        super().__init__(model, start=start, times=times)
        self.key, self.make = key, make

    def _install(self) -> Any:
        return self.module.register_forward_pre_hook(self._hook, with_kwargs=True, prepend=True)

    def _hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
        value = kwargs.get(self.key)
        if not isinstance(value, torch.Tensor) or not self._due():
            return None
        return args, {**kwargs, self.key: self.make(value)}


def mask_labels(model: nn.Module, *, start: int = 1, times: int | None = None) -> BatchFault:
    """Every label becomes ``-100`` (the batch supervises nothing), from call ``start``."""
    return BatchFault(model, "labels", lambda t: torch.full_like(t, -100), start=start, times=times)


def corrupt_input(
    model: nn.Module,
    key: str = "pixel_values",
    value: float = float("nan"),
    *,
    start: int = 1,
    times: int | None = None,
) -> BatchFault:
    """The batch input ``key`` is filled with ``value`` (NaN by default), from call ``start``."""
    return BatchFault(model, key, lambda t: torch.full_like(t, value), start=start, times=times)


__all__ = [
    "BatchFault",
    "OutputFault",
    "corrupt_input",
    "detach_output",
    "inject_inf",
    "inject_nan",
    "mask_labels",
    "zero_grad",
]
