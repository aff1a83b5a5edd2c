"""Per-module tracing: where, inside the model, a value first stops being finite.

Two users share the machinery here:

- the **replay** (:mod:`gradguard.engine.localize`) attaches a :class:`Recorder` for one re-run of a
  faulty micro-batch, on the fault path only;
- the opt-in **trace mode** (``Guard(trace="full")``) keeps a :class:`Recorder` attached on every step, for
  faults that a replay cannot reproduce (transient ones) or cannot run (sharded models).

A :class:`Recorder` hooks every module (one forward hook each, reading the call's inputs and output) and,
for a replay, every module output's gradient and every trainable parameter's gradient. Each traced tensor
is reduced on the fly, on the device, to its (min, max) with one ``aminmax`` kernel (no activation-sized
temporary, no host sync); a tensor seen before (a module's input is usually the previous module's output)
is not reduced again. NaN propagates through min and max and an overflow shows as +/-Inf, so the pair says
whether the tensor is finite and, for an overflow, how close the values before it came to the dtype's
maximum (the abs-max). The scalars are read with one host sync by :meth:`Recorder.read`, which only the
fault path calls.

:func:`locate` turns the events into an origin, the way ``DebugUnderflowOverflow`` reads its frames:

- forward: the first module call, in completion order, whose inputs are finite and whose output is not;
- backward: the first non-finite gradient in the order backward produced them; when it is the gradient
  arriving at a module's output, the module that produced it is the one whose incoming gradient was the
  last finite one before it (its incoming gradient is finite, its outgoing one is not); when it is a
  parameter's gradient, it is that parameter's module.

:class:`Tracer` is what :class:`~gradguard.engine.guard.Guard` attaches: one forward pre-hook on the top
model that records what a replay needs besides the batch (the autocast state each micro-batch ran
under), plus, with ``trace="full"``, a forward-only :class:`Recorder` (gradient hooks would cost more than
all the forward hooks together; in trace mode the backward is localised by the probes' per-parameter
gradient norms, which are recorded in backward order anyway).
"""

from __future__ import annotations

import itertools
import math
import weakref
from array import array
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from gradguard.core.groups import normalize_name
from gradguard.engine.probes import _local

# Event kinds.
FWD_IN, FWD_OUT, GRAD_OUT, GRAD_PARAM = 0, 1, 2, 3
KIND_NAMES = {FWD_IN: "input", FWD_OUT: "output", GRAD_OUT: "grad_output", GRAD_PARAM: "grad_param"}
# Small codes for the dtypes a frame reports (its distance to the dtype's maximum); -1: no tensor.
_DTYPES: list[torch.dtype] = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}
_OTHER_DTYPE = len(_DTYPES)
_CHUNK = 1024  # scalars stacked into one device tensor at a time (bounds the number of live 0-d tensors)
ROOT_NAME = "(model)"  # the display name of the top model, whose own path is ""


def _is_float(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())


def _floats(value: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a module output (itself, a tuple/list, or a dict/ModelOutput; one level)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() or value.is_complex() else []
    if isinstance(value, dict):
        return [v for v in value.values() if _is_float(v)]
    if isinstance(value, (tuple, list)):
        return [v for v in value if _is_float(v)]
    return []


def _input_floats(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """Floating-point tensor inputs of a call. Masks are left out: an additive attention mask holds -inf
    by design, and counting it would make every attention module look as if its input was non-finite."""
    out = [a for a in args if _is_float(a)]
    if kwargs:
        out += [v for k, v in kwargs.items() if _is_float(v) and "mask" not in k]
    return out


def module_path(raw: str) -> str:
    """A module (or parameter) path as the user knows it: wrapper segments removed.

    >>> module_path("base_model.model.model.multi_modal_projector.modules_to_save.default.linear_2")
    'model.multi_modal_projector.linear_2'
    """
    parts = raw.split(".")
    if "modules_to_save" in parts[:-1]:  # PEFT's trained copy: `<module>.modules_to_save.<adapter>.…`
        i = parts.index("modules_to_save")
        parts = parts[:i] + parts[i + 2 :]
    return normalize_name(".".join(parts))


@dataclass
class Event:
    """One traced scalar, read back on the host."""

    kind: int
    index: int  # module index (FWD_*, GRAD_OUT) or parameter index (GRAD_PARAM)
    micro: int  # micro-batch of the step (trace mode); 0 in a replay
    value: float | None  # abs-max; None when the call had no floating tensor there
    dtype: torch.dtype | None

    @property
    def finite(self) -> bool:
        return self.value is None or math.isfinite(self.value)


class Recorder:
    """Hooks on every module (and every trainable parameter) that record abs-max scalars on the device.

    Args:
        model: the module to trace (its own hooks are added to every sub-module, itself included).
        grads: also record the gradient arriving at each module's output in backward.
        params: also record every trainable parameter's gradient as it is accumulated.
        free_grads: drop each parameter's gradient right after it was recorded (the replay: its gradients
            are not needed, and freeing them as backward goes keeps the replay's memory at the step's).

    Forward hooks record only while a grad-enabled forward of the top model is running (training, not
    evaluation or generation; gradient checkpointing's recomputation in backward is not recorded twice).

    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
    >>> rec = Recorder(m)
    >>> rec.attach()
    >>> m(torch.randn(3, 2)).sum().backward()
    >>> rec.detach()
    >>> locate(rec.read()) is None  # everything finite
    True
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        grads: bool = True,
        params: bool = True,
        free_grads: bool = False,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.model = model
        self.grads = grads
        self.free_grads = free_grads
        self._on_error = on_error
        self.modules: list[nn.Module] = []
        self.names: list[str] = []  # normalised paths (PEFT / DDP / compile wrapper segments removed)
        self.raw_names: list[str] = []
        for raw, module in model.named_modules():
            self.modules.append(module)
            self.raw_names.append(raw)
            self.names.append(module_path(raw) or ROOT_NAME)
        self.params: list[tuple[str, nn.Parameter]] = []
        self.param_owner: list[int] = []  # module index owning each parameter
        if params:
            index = {raw: i for i, raw in enumerate(self.raw_names)}
            for name, p in model.named_parameters():
                if p.requires_grad:
                    self.params.append((name, p))
                    self.param_owner.append(index.get(name.rsplit(".", 1)[0] if "." in name else "", 0))
        self.active = True  # False: hooks return at once (the tracer is paused during a replay)
        self._handles: list[RemovableHandle] = []
        self._depth = 0  # > 0 while a grad-enabled forward of the top model runs
        self.reset()

    # -- lifecycle -------------------------------------------------------------------------------------
    def attach(self) -> None:
        if self._handles:
            return
        # One pre-hook, on the top model (arms recording for a training forward); every module gets one
        # forward hook that reads its inputs and its output together (half the hook calls of a pre/post pair).
        self._handles.append(self.model.register_forward_pre_hook(self._top_pre_hook))
        for i, module in enumerate(self.modules):
            self._handles.append(module.register_forward_hook(self._hook(i), with_kwargs=True))
        for j, (_, p) in enumerate(self.params):
            self._handles.append(p.register_post_accumulate_grad_hook(self._param_hook(j)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.active = False  # gradient hooks left on tensors of a live graph become no-ops

    def reset(self) -> None:
        """Forget what was recorded (once per optimizer step)."""
        # One packed int per event (index << 5 | dtype code << 2 | kind) and the position of its
        # (min, max) pair in the value stream (-1: no tensor): two appends per event, nothing per-event
        # on the Python heap. micro_starts[k] = the first event of micro-batch k.
        self.codes = array("q")
        self.slot = array("i")
        self.micro_starts = array("i")
        self.extra: dict[int, list[int]] = {}  # event -> further slots (a call with several float inputs)
        self._pending: list[torch.Tensor] = []
        self._chunks: list[torch.Tensor] = []
        self._count = 0
        self._seen: dict[int, tuple[weakref.ref[torch.Tensor], int, int]] = {}
        self._grad_watched: dict[int, weakref.ref[torch.Tensor]] = {}
        self._depth = 0

    # -- recording ---------------------------------------------------------------------------------------
    def _slot(self, t: torch.Tensor) -> int:
        """Reduce ``t`` to its (min, max) on the device and return where the pair is; -1 for an empty tensor.

        One ``aminmax`` kernel (NaN propagates to both; on CPU several times faster than an ord=inf norm).
        A tensor seen before, unchanged (same object, same in-place version counter), reuses its pair: a
        module's input is usually the previous module's output, and a parent often returns its last
        child's output, so most calls add no kernel at all.
        """
        key = id(t)
        hit = self._seen.get(key)
        if hit is not None and hit[0]() is t and hit[2] == t._version:
            return hit[1]
        x = t.detach()
        if type(x) is not torch.Tensor:
            x = _local(x)
        if x.numel() == 0:
            return -1
        if x.is_complex():
            x = torch.view_as_real(x)
        mn, mx = torch.aminmax(x)
        slot = self._count
        self._count += 2
        self._pending += (mn, mx)
        if len(self._pending) >= _CHUNK:
            self._flush()
        if len(self._seen) >= 256:  # only recent tensors matter; keep the table small
            self._seen.clear()
        self._seen[key] = (weakref.ref(t), slot, t._version)
        return slot

    def _push(self, kind: int, index: int, tensors: list[torch.Tensor]) -> None:
        if not tensors:
            self.codes.append(index << 5 | kind)
            self.slot.append(-1)
            return
        self.codes.append(index << 5 | (_DTYPE_CODE.get(tensors[0].dtype, _OTHER_DTYPE) + 1) << 2 | kind)
        self.slot.append(self._slot(tensors[0]))
        if len(tensors) > 1:
            self.extra[len(self.slot) - 1] = [self._slot(t) for t in tensors[1:]]

    def _flush(self) -> None:
        if self._pending:
            dev = self._pending[0].device
            # stack promotes bf16/fp16 scalars to fp32 exactly
            self._chunks.append(torch.stack([v.to(dev) for v in self._pending]))
            self._pending = []

    # Hook bodies are wrapped: in trace mode they run on every step of the user's training, and a bug in
    # gradguard must not kill it (the guard disables itself instead).
    def _top_pre_hook(self, module: nn.Module, args: Any) -> None:
        if self.active and torch.is_grad_enabled():
            self._depth += 1
            self.micro_starts.append(len(self.codes))

    def _hook(self, i: int) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            if not self.active or not self._depth:
                return
            try:
                self._push(FWD_IN, i, _input_floats(args, kwargs))
                ts = _floats(out)
                self._push(FWD_OUT, i, ts)
                if self.grads and ts and ts[0].requires_grad:
                    self._watch_grad(i, ts[0])
                if i == 0:
                    self._depth -= 1
            except Exception as exc:
                self._fail(exc)

        return hook

    def _watch_grad(self, i: int, t: torch.Tensor) -> None:
        """Record the gradient arriving at ``t`` (module ``i``'s output) when backward gets there.

        Once per tensor: a parent that returns its last child's output gets the very same gradient, so
        the child's event stands for both.
        """
        key = id(t)
        seen = self._grad_watched.get(key)
        if seen is not None and seen() is t:
            return
        if len(self._grad_watched) >= 256:
            self._grad_watched.clear()
        self._grad_watched[key] = weakref.ref(t)
        if t.grad_fn is not None:  # a node pre-hook: cheaper than Tensor.register_hook
            t.grad_fn.register_prehook(self._grad_hook(i, t.output_nr))
        else:
            t.register_hook(self._grad_hook(i, None))

    def _grad_hook(self, i: int, nr: int | None) -> Callable[[Any], None]:
        def hook(grads: Any) -> None:
            if not self.active:
                return
            try:
                g = grads if nr is None else grads[nr]
                self._push(GRAD_OUT, i, [g] if isinstance(g, torch.Tensor) else [])
            except Exception as exc:
                self._fail(exc)

        return hook

    def _param_hook(self, j: int) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            if not self.active or p.grad is None:
                return
            try:
                self._push(GRAD_PARAM, j, [p.grad])
            except Exception as exc:
                self._fail(exc)
            if self.free_grads:
                p.grad = None

        return hook

    def _fail(self, exc: BaseException) -> None:
        self.active = False
        if self._on_error is None:
            raise exc
        self._on_error(exc)

    # -- reading (fault path only) ----------------------------------------------------------------------
    def read(self) -> list[Event]:
        """Every event recorded since the last reset, with its abs-max (one host sync)."""
        self._flush()
        if self._chunks:
            dev = self._chunks[0].device
            values = torch.cat([c.to(dev) for c in self._chunks]).tolist()
        else:
            values = []

        def absmax(slot: int) -> float | None:
            if slot < 0:
                return None
            lo, hi = values[slot], values[slot + 1]
            return math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi, 0.0)

        events = []
        starts = list(self.micro_starts[1:])
        micro = 0
        for n, (code, sl) in enumerate(zip(self.codes, self.slot)):
            while starts and n >= starts[0]:
                starts.pop(0)
                micro += 1
            kind, dt, ix = code & 3, (code >> 2 & 7) - 1, code >> 5
            dtype = None if dt < 0 or dt >= len(_DTYPES) else _DTYPES[dt]
            value = absmax(sl)
            for more in self.extra.get(n, ()):
                v = absmax(more)
                if v is not None:
                    value = v if value is None or math.isnan(v) else max(value, v)
            events.append(Event(kind, ix, micro, value, dtype))
        return events

    # -- naming -----------------------------------------------------------------------------------------
    def module_name(self, i: int) -> str:
        return self.names[i]

    def class_name(self, i: int) -> str:
        return type(self.modules[i]).__name__

    def param_name(self, j: int) -> str:
        return module_path(self.params[j][0])

    def locate(self, ramp: int = 8) -> TraceSite | None:
        """The origin of the first non-finite value recorded (one host sync)."""
        return locate(self.read(), self.param_owner, ramp)


@dataclass
class TraceSite:
    """Where :func:`locate` found the first non-finite value: the module (an index into the recorder's tables),
    the phase and the frames leading to it. The fault's origin in the report is built from it."""

    phase: str  # "forward" | "backward"
    module: int
    micro: int
    value: float | None  # the first non-finite value (NaN, +/-Inf)
    parameter: int | None = None  # backward: the parameter whose gradient was first non-finite
    gradient_into: int | None = None  # backward: the module whose incoming gradient was the first non-finite
    inputs_finite: bool = True  # forward: False when no module had finite inputs and a non-finite output
    frames: list[Event] | None = None  # the events leading to it (the ramp), oldest first
    frame_inputs: list[float | None] | None = None  # forward: the input abs-max of each frame


def locate(events: list[Event], param_owner: Sequence[int] = (), ramp: int = 8) -> TraceSite | None:
    """Where the first non-finite value was born, from a recorder's events; ``None`` if all are finite.

    >>> locate([]) is None
    True
    """
    first = next((e for e in events if e.kind != FWD_IN and not e.finite), None)
    if first is None:
        return None
    if first.kind == FWD_OUT:
        return _locate_forward([e for e in events if e.micro == first.micro and e.kind <= FWD_OUT], first, ramp)
    return _locate_backward(events, events.index(first), param_owner, ramp)


def _locate_forward(events: list[Event], first: Event, ramp: int) -> TraceSite:
    # Each call's hook records its input event, then its output event: pair them, in completion order.
    calls = [(i, o) for i, o in itertools.pairwise(events) if i.kind == FWD_IN and o.kind == FWD_OUT]
    pick = next((k for k, (i, o) in enumerate(calls) if not o.finite and i.finite), None)
    inputs_finite = pick is not None
    if pick is None:  # the value entered from code outside any module: blame the first module that saw it
        pick = next(k for k, (_, o) in enumerate(calls) if o is first)
    window = calls[max(0, pick + 1 - ramp) : pick + 1]
    out = window[-1][1]
    return TraceSite(
        phase="forward",
        module=out.index,
        micro=out.micro,
        value=out.value,
        inputs_finite=inputs_finite,
        frames=[o for _, o in window],
        frame_inputs=[i.value for i, _ in window],
    )


def _locate_backward(events: list[Event], at: int, param_owner: Sequence[int], ramp: int) -> TraceSite:
    first = events[at]
    bwd = [e for e in events[: at + 1] if e.kind in (GRAD_OUT, GRAD_PARAM) and e.micro == first.micro]
    frames = bwd[-ramp:]
    if first.kind == GRAD_PARAM:
        owner = param_owner[first.index] if first.index < len(param_owner) else 0
        return TraceSite("backward", owner, first.micro, first.value, parameter=first.index, frames=frames)
    # The gradient arriving at `first`'s module is the first non-finite one: it was produced by the backward
    # of the module whose own incoming gradient was the last finite one before it.
    producer = next((e for e in reversed(bwd[:-1]) if e.kind == GRAD_OUT and e.finite), None)
    return TraceSite(
        "backward",
        producer.index if producer is not None else first.index,
        first.micro,
        first.value,
        gradient_into=first.index,
        frames=frames,
    )


# -- what the guard attaches -----------------------------------------------------------------------------


def autocast_state(device_type: str) -> tuple[bool, torch.dtype] | None:
    """Whether autocast is on for ``device_type`` and its dtype (``None`` when torch cannot tell)."""
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (AttributeError, TypeError, RuntimeError):  # torch < 2.4, or an unknown device type
        return None


def autocast_context(device_type: str, state: tuple[bool, torch.dtype] | None) -> AbstractContextManager[Any]:
    """Re-enter the autocast state a micro-batch ran under (a no-op when it ran without autocast)."""
    if not state or not state[0]:
        return nullcontext()
    return torch.autocast(device_type, dtype=state[1])


class Tracer:
    """What :class:`~gradguard.engine.guard.Guard` keeps attached for localisation.

    Always: one forward pre-hook on the top model recording, per training micro-batch, the autocast state
    it ran under (a replay outside the Trainer's ``autocast`` context must re-enter it, or an fp16 overflow
    would not reproduce). With ``full=True`` (``Guard(trace="full")``) also a :class:`Recorder` on every
    module and trainable parameter, whose events are read only when the guard has found a fault.

    >>> model = torch.nn.Linear(2, 1)
    >>> tracer = Tracer(model, full=True)
    >>> tracer.attach()
    >>> model(torch.randn(4, 2)).sum().backward()
    >>> tracer.locate() is None, len(tracer.autocast)
    (True, 1)
    >>> tracer.detach()
    """

    def __init__(
        self, model: nn.Module, *, full: bool = False, on_error: Callable[[BaseException], None] | None = None
    ) -> None:
        self.model = model
        self.full = full
        # Forward only: a gradient hook per module output costs more than all the forward hooks together
        # (the autograd engine calling back into Python), and the probes already record every parameter's
        # gradient in backward order, which localises a backward fault to a parameter (and its module).
        self.recorder = Recorder(model, grads=False, params=False, on_error=on_error) if full else None
        self.device_type = _device_type(model)
        self._on_error = on_error
        self._handle: RemovableHandle | None = None
        self.paused = False
        self.autocast: list[tuple[bool, torch.dtype] | None] = []

    def pause(self, paused: bool = True) -> None:
        """Stop (or resume) recording, e.g. while a replay runs the model again."""
        self.paused = paused
        if self.recorder is not None and self._handle is not None:
            self.recorder.active = not paused

    def attach(self) -> None:
        if self._handle is not None:
            return
        self.paused = False
        self._handle = self.model.register_forward_pre_hook(self._pre_hook)
        if self.recorder is not None:
            self.recorder.active = True
            self.recorder.attach()

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.recorder is not None:
            self.recorder.detach()
        self.reset()

    def reset(self) -> None:
        self.autocast = []
        if self.recorder is not None:
            self.recorder.reset()

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        try:
            if torch.is_grad_enabled() and not self.paused:
                self.autocast.append(autocast_state(self.device_type))
        except Exception as exc:  # never let a probe kill the forward pass
            if self._on_error is None:
                raise
            self._on_error(exc)

    def locate(self) -> TraceSite | None:
        """The origin of the first non-finite value in this step (trace mode; one host sync)."""
        return self.recorder.locate() if self.recorder is not None else None


def _device_type(model: nn.Module) -> str:
    for p in model.parameters():
        if not p.is_meta:
            return p.device.type
    return "cpu"
