"""Pinpoint the origin of a non-finite fault by replaying the failing step with tracing on.

The guard finds a fault with one host sync per step and knows the *group* it began in. This module, called
on the fault path only (by the guard while it diagnoses the step, before the poisoned update is skipped),
answers the next two questions:

1. **Which exact module?** The captured micro-batch(es) of the step are run again, forward and backward,
   with the same weights, the same batch (references the probes kept), the same RNG state (dropout masks)
   and the same autocast state, with a :class:`~gradguard.engine.trace.Recorder` on every module and every
   trainable parameter. The first module whose inputs are finite and whose output is not (forward), or
   whose incoming gradient is finite and whose outgoing gradient is not (backward), is the origin.
2. **Deterministic or transient?** If the replay reproduces the fault, the same inputs and weights produce
   it again: the cause is the data or the model. If it does not, the fault was transient: suspect the
   hardware or non-determinism (Megatron-LM's rerun state machine reasons the same way).

Micro-batches are replayed one at a time (the one the step's statistics blame first, then the others in
order) and the replay stops at the first that reproduces. Nothing the replay touches survives it: the
``.grad`` tensors are set aside (references, not copies) and put back, replay gradients are freed as soon
as they are recorded, the RNG state, BatchNorm running statistics and the probes' records of the step are
restored, and the optimizer is never called. Every traced tensor is reduced to an abs-max scalar on the
fly, so the replay needs no more memory than the step did.

With ``Guard(trace="full")`` the original step was traced as it ran (see :mod:`gradguard.engine.trace`);
its origin is reported too, and is the only one available for a transient fault.

The result is the ``fault.localization`` dict of the report; its fields are documented in
``docs/localization.md``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gradguard.engine import distributed
from gradguard.engine.diagnosis import Diagnosis
from gradguard.engine.probes import MicroBatch, Probes, find_loss, rng_state, set_rng_state
from gradguard.engine.trace import (
    GRAD_PARAM,
    Recorder,
    Tracer,
    TraceSite,
    autocast_context,
    module_path,
)

if TYPE_CHECKING:
    from gradguard.report.model import Origin

log = logging.getLogger("gradguard")

DETERMINISTIC, TRANSIENT, UNKNOWN = "deterministic", "transient", "unknown"


@dataclass
class _Attempt:
    micro_batch: int
    reproduced: bool
    original_loss: float | None
    replay_loss: float | None
    site: TraceSite | None = None
    backward: bool = False  # whether the replay got to run backward (it needs the loss from the forward)


@dataclass(frozen=True)
class _Step:
    """The step being localised: the model, the probes holding its batches and gradient norms, and what the
    original step ran with (autocast states, the fp16 loss scale)."""

    model: nn.Module
    probes: Probes
    tracer: Tracer | None = None
    scaler: Any = None


@dataclass
class _Replay:
    attempts: list[_Attempt] = field(default_factory=list)
    recorder: Recorder | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def hit(self) -> _Attempt | None:
        return next((a for a in self.attempts if a.reproduced), None)


def localize(
    model: nn.Module,
    probes: Probes,
    origin: Origin,
    *,
    tracer: Tracer | None = None,
    scaler: Any = None,
    strict: bool = False,
) -> dict[str, Any] | None:
    """Replay the faulty step with tracing on; return the ``fault.localization`` dict (or ``None``).

    Called by :class:`~gradguard.engine.guard.Guard` on a non-finite fault, after backward and before the
    optimizer step, while ``.grad`` still holds the step's gradients; ``origin`` is where the step's statistics
    say the fault began. It can also be called directly, e.g. to check a step by hand:

    >>> import torch
    >>> from gradguard import Guard
    >>> from gradguard.report.model import Origin
    >>> class Net(torch.nn.Module):  # like a transformers model, its forward returns the loss
    ...     def __init__(self) -> None:
    ...         super().__init__()
    ...         self.body = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    ...     def forward(self, x: torch.Tensor) -> torch.Tensor:
    ...         return self.body(x).square().mean()
    >>> model = Net()
    >>> guard = Guard(model, console=False)
    >>> model(torch.randn(2, 4)).backward()
    >>> loc = localize(model, guard.probes, Origin(phase="backward"))
    >>> loc["verdict"], loc["replays"][0]["reproduced"]  # everything was finite: nothing to reproduce
    ('transient', False)
    >>> _ = guard.close()
    """
    step = _Step(model, probes, tracer, scaler)
    traced: dict[str, Any] | None = None
    if tracer is not None and tracer.recorder is not None:
        site = tracer.recorder.locate()  # the original step's forward, as it ran (one host sync)
        if site is not None:
            traced = _describe(step, tracer.recorder, site, "trace")
        else:  # forward finite: the backward, from the probes' per-parameter gradient norms
            traced = _first_bad_param(step, tracer.recorder)
    reason = replay_blocker(model, probes)
    replay: _Replay | None = None
    if reason is None:
        try:
            replay = _replay(step, origin)
        except Exception as exc:  # e.g. out of memory: the report must still come out
            if strict:
                raise
            log.warning("gradguard: the replay of the step failed (%s: %s)", type(exc).__name__, exc)
            reason = f"the replay failed ({type(exc).__name__}: {exc})"
    return _result(step, replay, traced, reason)


def localized(
    diagnosis: Diagnosis,
    model: nn.Module,
    probes: Probes,
    *,
    tracer: Tracer | None = None,
    scaler: Any = None,
    strict: bool = False,
) -> Diagnosis:
    """``diagnosis`` with the replay's localisation when it is a non-finite fault not born in the data; other
    faults come back as they were. Localisation is a bonus: a replay that fails never costs the report."""
    origin = diagnosis.origin
    if not diagnosis.kind.startswith("nonfinite") or origin.phase == "data":
        return diagnosis
    try:
        found = localize(model, probes, origin, tracer=tracer, scaler=scaler, strict=strict)
    except Exception as exc:
        log.warning("gradguard: could not localise the fault (%s: %s)", type(exc).__name__, exc)
        if strict:
            raise
        return diagnosis
    return dataclasses.replace(diagnosis, localization=found)


# -- the replay -------------------------------------------------------------------------------------------


def replay_blocker(model: nn.Module, probes: Probes) -> str | None:
    """Why this step cannot be replayed, or ``None`` when it can."""
    if not probes.micro:
        return "no training forward of the model was seen in this step"
    if not any(m.args or m.kwargs for m in probes.micro):
        return "the step's batches were not captured"
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        return "DeepSpeed ZeRO partitions the parameters; a replay would disturb its gradient bookkeeping"
    if distributed.world() > 1:
        if any(type(p).__name__ == "DTensor" or hasattr(p, "_is_flat_param") for p in params):
            return "the parameters are sharded (FSDP): a replay would need every rank to run it in lockstep"
        if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
            return "SyncBatchNorm communicates in forward: a replay would need every rank to run it in lockstep"
    return None


def replay_model(model: nn.Module) -> nn.Module:
    """The module a replay runs: DDP / DataParallel / ``torch.compile`` wrappers removed.

    Running the wrapped module directly keeps the replay local (no DDP gradient all-reduce) and eager.
    """
    while True:
        if type(model).__name__ in ("DistributedDataParallel", "DataParallel") and isinstance(
            getattr(model, "module", None), nn.Module
        ):
            model = model.module  # type: ignore[assignment]
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _replay_order(micro: list[MicroBatch], origin: Origin, losses: list[float | None]) -> list[int]:
    """The micro-batch the step's statistics blame first (its output or loss went non-finite), then the rest."""
    first = origin.micro_batch
    if first is None:
        first = next((i for i, v in enumerate(losses) if v is not None and not math.isfinite(v)), None)
    order = list(range(len(micro)))
    if first is not None and 0 <= first < len(micro):
        order.remove(first)
        order.insert(0, first)
    return order


def _replay(step: _Step, origin: Origin) -> _Replay:
    probes, tracer = step.probes, step.tracer
    micro = list(probes.micro)
    original = [m.loss for m in micro]
    known = [t for t in original if t is not None]
    values = iter(torch.stack([t.float().cpu() for t in known]).tolist() if known else [])
    losses: list[float | None] = [next(values) if t is not None else None for t in original]
    model = replay_model(step.model)
    device_type = tracer.device_type if tracer is not None else _device_type(model)
    autocast = tracer.autocast if tracer is not None and len(tracer.autocast) == len(micro) else None
    scale = _loss_scale(step.scaler)
    out = _Replay()
    if any(not m.rng for m in micro):
        out.notes.append("the RNG state was not captured: dropout masks may differ from the original step")
    if autocast is None and tracer is not None:
        out.notes.append("the autocast state of the step is unknown: the replay ran in the model's own precision")
    rec = Recorder(model, params=True, free_grads=True)
    out.recorder = rec
    with _preserved(step):
        rec.attach()
        try:
            for k in _replay_order(micro, origin, losses):
                mb = micro[k]
                if not (mb.args or mb.kwargs):
                    continue
                rec.reset()
                if mb.rng:
                    set_rng_state(mb.rng)  # the RNG state at this forward's start: the same dropout masks
                found, loss, backward = _replay_one(
                    model, mb, rec, device_type, autocast[k] if autocast else None, scale
                )
                reproduced = found is not None or (loss is not None and not math.isfinite(loss))
                out.attempts.append(_Attempt(k, reproduced, losses[k], loss, found, backward))
                if reproduced:
                    break
        finally:
            rec.detach()
    return out


def _replay_one(
    model: nn.Module,
    mb: MicroBatch,
    rec: Recorder,
    device_type: str,
    autocast: tuple[bool, torch.dtype] | None,
    scale: torch.Tensor | None,
) -> tuple[TraceSite | None, float | None, bool]:
    """Forward (and, if it stayed finite, backward) of one micro-batch: the origin found, the loss, and
    whether backward ran."""
    with torch.enable_grad(), autocast_context(device_type, autocast):
        output = model(*mb.args, **mb.kwargs)
    loss = find_loss(output)
    del output  # only the loss keeps the graph alive from here on
    found = rec.locate()
    value = float(loss.detach().float().item()) if loss is not None else None
    backward = found is None and loss is not None and value is not None and math.isfinite(value)
    if backward and loss is not None:
        (loss * scale if scale is not None else loss).backward()  # frees the graph as it goes
        found = rec.locate()
    del loss
    return found, value, backward


def _loss_scale(scaler: Any) -> torch.Tensor | None:
    """The fp16 GradScaler's scale: the step's backward ran on the scaled loss, so the replay's does too."""
    scale = getattr(scaler, "_scale", None) if scaler is not None else None
    return scale if isinstance(scale, torch.Tensor) else None


@contextmanager
def _preserved(step: _Step) -> Iterator[None]:
    """Run a replay and put back everything it could change: ``.grad``, RNG, running stats, records."""
    probes, tracer = step.probes, step.tracer
    params = list(step.model.parameters())
    grads = [p.grad for p in params]  # references: the replay never writes into these tensors
    rng = rng_state()
    recorded = dict(vars(probes))  # reset() only rebinds attributes, so these objects stay intact
    stats = [(t, t.clone()) for t in _running_stats(step.model)]
    if tracer is not None:
        tracer.pause(True)
    probes.reset()  # the replay's forward must not be recorded as a new micro-batch of this step
    try:
        for p in params:
            p.grad = None
        yield
    finally:
        for p, g in zip(params, grads):
            p.grad = g
        set_rng_state(rng)
        vars(probes).update(recorded)
        with torch.no_grad():
            for t, saved in stats:
                t.copy_(saved)
        if tracer is not None:
            tracer.pause(False)


def _running_stats(model: nn.Module) -> list[torch.Tensor]:
    """Buffers a training-mode forward updates in place (BatchNorm's running mean / var / count)."""
    out: list[torch.Tensor] = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            out += [b for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    return out


def _device_type(model: nn.Module) -> str:
    return next((p.device.type for p in model.parameters() if not p.is_meta), "cpu")


# -- describing what was found ------------------------------------------------------------------------------


def _value_name(v: float | None) -> str | None:
    if v is None or math.isfinite(v):
        return None
    return "nan" if math.isnan(v) else "inf"


def _dtype_fields(value: float | None, dtype: torch.dtype | None) -> dict[str, Any]:
    """The dtype and how close a finite abs-max came to its maximum (1.0 = at the edge of overflow)."""
    if dtype is None:
        return {"dtype": None, "dtype_max_fraction": None}
    fraction = None
    if value is not None and math.isfinite(value) and dtype.is_floating_point:
        fraction = value / torch.finfo(dtype).max
    return {"dtype": str(dtype).removeprefix("torch."), "dtype_max_fraction": fraction}


def _module_info(step: _Step, rec: Recorder, i: int) -> dict[str, Any]:
    """Group, role and trainability of a module: those of its parameters, or of its nearest ancestor's."""
    by_raw = dict(zip(rec.raw_names, rec.modules))
    raw = rec.raw_names[i]
    params: list[nn.Parameter] = []
    while True:
        module = by_raw.get(raw)
        params = list(module.parameters()) if module is not None else []
        if params or not raw:
            break
        raw = raw.rsplit(".", 1)[0] if "." in raw else ""
    gmap = step.probes.gmap
    group = role = None
    if gmap is not None:
        info = next((gmap.by_param[id(p)] for p in params if id(p) in gmap.by_param), None)
        if info is not None:
            group = info.group
            role = gmap.groups[group].role
    return {"group": group, "role": role, "trainable": any(p.requires_grad for p in params) if params else None}


def _describe(step: _Step, rec: Recorder, o: TraceSite, source: str) -> dict[str, Any]:
    """The localisation fields for an origin found by a recorder."""
    module = rec.modules[o.module]
    d: dict[str, Any] = {
        "source": source,
        "module": rec.names[o.module],
        "class": type(module).__name__,
        **_module_info(step, rec, o.module),
        "phase": o.phase,
        "micro_batch": o.micro,
        "value": _value_name(o.value),
        "parameter": rec.param_name(o.parameter) if o.parameter is not None else None,
    }
    frames: list[dict[str, Any]] = []
    if o.phase == "forward":
        d["inputs_finite"] = o.inputs_finite
        # A module that turns finite inputs into a non-finite output may hold a non-finite weight itself.
        bad = [n for n, p in module.named_parameters(recurse=False) if not bool(torch.isfinite(p).all())]
        if bad:
            d["parameter"] = rec.names[o.module] + "." + bad[0]
            d["nonfinite_weights"] = True
        for e, x in zip(o.frames or [], o.frame_inputs or []):
            frames.append(
                {
                    "module": rec.names[e.index],
                    "class": rec.class_name(e.index),
                    "input_absmax": x,
                    "output_absmax": e.value,
                    **_dtype_fields(e.value, e.dtype),
                }
            )
    else:
        d["gradient_into"] = rec.names[o.gradient_into] if o.gradient_into is not None else None
        for e in o.frames or []:
            param = e.kind == GRAD_PARAM
            owner = rec.param_owner[e.index] if param else e.index
            frames.append(
                {
                    "module": rec.names[owner],
                    "class": rec.class_name(owner),
                    "gradient": "parameter" if param else "output",
                    "parameter": rec.param_name(e.index) if param else None,
                    "absmax": e.value,
                    **_dtype_fields(e.value, e.dtype),
                }
            )
    d["frames"] = frames
    return d


def _first_bad_param(step: _Step, rec: Recorder, ramp: int = 4) -> dict[str, Any] | None:
    """Trace mode's backward origin: the first parameter, in the order backward produced the gradients,
    whose gradient norm is not finite (the probes record them anyway; read with one host sync)."""
    probes = step.probes
    in_order = probes.norms_in_order()
    order, values = [i for i, _ in in_order], [v for _, v in in_order]
    at = next((k for k, v in enumerate(values) if not math.isfinite(v)), None)
    if at is None:
        return None
    index = {raw: i for i, raw in enumerate(rec.raw_names)}

    def owner(i: int) -> int:
        name = probes.params[i][0]
        return index.get(name.rsplit(".", 1)[0] if "." in name else "", 0)

    bad = order[at]
    d = _describe(step, rec, TraceSite("backward", owner(bad), 0, values[at]), "trace")
    d["micro_batch"] = None  # gradients accumulate over micro-batches: which one is not known here
    d["parameter"] = module_path(probes.params[bad][0])
    d["frames"] = [
        {
            "module": rec.names[owner(i)],
            "class": rec.class_name(owner(i)),
            "gradient": "parameter",
            "parameter": module_path(probes.params[i][0]),
            "norm": v,
        }
        for i, v in zip(order[max(0, at + 1 - ramp) : at + 1], values[max(0, at + 1 - ramp) : at + 1])
    ]
    return d


def _where(d: dict[str, Any]) -> str:
    trainable = {True: "trainable", False: "frozen", None: "trainability unknown"}[d.get("trainable")]
    group = f"group {d['group']}, role {d['role']}, " if d.get("group") else ""
    return f"`{d['module']}` ({d['class']}; {group}{trainable})"


def _sentence(d: dict[str, Any]) -> str:
    """One sentence saying where the first non-finite value was born."""
    value = {"nan": "NaN", "inf": "Inf"}.get(d.get("value") or "", "non-finite value")
    if d["phase"] == "forward":
        if d.get("nonfinite_weights"):
            return f"the weight `{d['parameter']}` is not finite, so the forward output of {_where(d)} is {value}"
        how = "its inputs were finite" if d.get("inputs_finite", True) else "its input was already non-finite"
        text = f"the first {value} appeared in the forward output of {_where(d)}; {how}"
        frames = d.get("frames") or []
        last_finite = frames[-1]["input_absmax"] if frames else None
        if value == "Inf" and frames and last_finite is not None and math.isfinite(last_finite):
            text += f" (input abs-max {last_finite:.3g}, {frames[-1]['dtype']}: an overflow)"
        return text
    if d.get("parameter"):
        return f"the first {value} gradient is the one of parameter `{d['parameter']}` of {_where(d)}"
    into = f" (it arrived at the output of `{d['gradient_into']}`)" if d.get("gradient_into") else ""
    return (
        f"the first {value} gradient was produced in the backward of {_where(d)}: the gradient arriving at "
        f"its output was finite, the one it passed on was not{into}"
    )


_FIELDS = ("source", "module", "class", "group", "role", "trainable", "phase", "micro_batch", "value", "parameter")
_NO_REPLAY = "use GradGuard(trace='full') / Guard(trace='full') to localise faults that cannot be replayed"


def _result(step: _Step, replay: _Replay | None, traced: dict[str, Any] | None, reason: str | None) -> dict[str, Any]:
    """The ``fault.localization`` dict: where the replay (or the trace) found the origin, and the verdict."""
    notes = list(replay.notes) if replay is not None else []
    attempts = replay.attempts if replay is not None else []
    base: dict[str, Any] = {**dict.fromkeys(_FIELDS), "frames": []}
    hit = replay.hit if replay is not None else None
    if hit is not None and replay is not None and replay.recorder is not None:
        verdict = DETERMINISTIC
        message, advice = _reproduced(step, replay.recorder, hit, base)
    else:
        verdict, message, advice = _not_reproduced(attempts, reason)
    if traced is not None:
        if base["module"] is None:
            base.update(traced)
            message += f"; in the original step (traced): {_sentence(traced)}"
        elif traced["module"] != base["module"]:
            notes.append(f"the trace of the original step points at `{traced['module']}` ({traced['phase']})")
    replays = [
        {"micro_batch": a.micro_batch, "reproduced": a.reproduced, "original_loss": a.original_loss,
         "replay_loss": a.replay_loss}
        for a in attempts
    ]  # fmt: skip
    base.update(verdict=verdict, message=message, advice=advice, replays=replays, trace=traced, notes=notes)
    return base


def _reproduced(step: _Step, recorder: Recorder, hit: _Attempt, base: dict[str, Any]) -> tuple[str, str]:
    """A deterministic fault: fill ``base`` with the module the replay found; the message and advice."""
    if hit.site is not None:
        base.update(_describe(step, recorder, hit.site, "replay"))
        where = _sentence(base)
    else:  # every module's output was finite but the loss was not: the loss computation itself
        base.update({"source": "replay", "module": recorder.names[0], "class": recorder.class_name(0)})
        base.update(_module_info(step, recorder, 0), phase="forward", value=_value_name(hit.replay_loss))
        where = "every module's output was finite but the loss was not: the loss computation itself"
    base["micro_batch"] = hit.micro_batch
    message = f"replaying micro-batch {hit.micro_batch} reproduces the fault: {where}"
    advice = (
        "deterministic: the same batch, weights and RNG state produce it again, so the cause is the data of "
        f"micro-batch {hit.micro_batch} or the model, not the hardware. Inspect that batch and `{base['module']}`"
    )
    if base.get("value") == "inf":
        advice += (
            "; for an overflow: lower the learning rate or warm it up, prefer bf16 to fp16, clip gradients, "
            "or keep this module in fp32"
        )
    return message, advice


def _not_reproduced(attempts: list[_Attempt], reason: str | None) -> tuple[str, str, str]:
    """(verdict, message, advice) when no replay reproduced the fault, or none could run."""
    if attempts and not all(a.backward for a in attempts):
        message = (
            "not reproduced in forward, and the replay could not run backward: the model's forward returns no "
            "loss (it is computed outside the model), so a fault in the loss or in backward cannot be replayed"
        )
        return UNKNOWN, message, _NO_REPLAY
    if not attempts:
        return UNKNOWN, f"not replayed: {reason or 'nothing to replay'}", _NO_REPLAY
    n = len(attempts)
    matched = [a for a in attempts if a.original_loss is not None and a.original_loss == a.replay_loss]
    message = (
        f"the replay of the step's {n} micro-batch{'es' if n > 1 else ''} with the same batch, weights and "
        "RNG state stayed finite: the fault did not reproduce"
    )
    if matched:
        message += f" (the replayed loss matched the original bitwise for {len(matched)} of them)"
    advice = (
        "transient: suspect the hardware (a flaky GPU or memory; check `nvidia-smi -q` for ECC and Xid errors) "
        "or non-determinism. Resume from the last checkpoint; if it happens again, rerun the step on other "
        "hardware (as Megatron-LM's rerun state machine does) and keep Guard(trace='full') on to localise it "
        "in the original step"
    )
    return TRANSIENT, message, advice
