"""Probes: hooks that collect, never decide.

Everything a hook records stays on the device as 0-d tensors; :meth:`Probes.collect` turns one optimizer
step's worth into a single packed tensor, so the guard reads it with one host sync.

- gradients: ``register_post_accumulate_grad_hook`` on every trainable parameter. It fires during
  backward, before clipping (clipping with a NaN total norm turns every gradient into NaN, hiding the
  origin), and also on FSDP2's DTensor parameters (where ``register_hook`` does not fire). In one
  process (``batched``) a hook only notes the parameter, and one ``torch._foreach_norm`` at the end of
  each backward takes every norm: on a GPU that is one fused kernel instead of a launch per tensor.
  Across ranks each hook takes its own norm at once, before the gradient reduction can touch the
  gradient (DDP's bucket views are reduced in place, asynchronously): the norms stay this rank's own.
- the raw loss, supervised-token count and input finiteness: one forward hook (with kwargs) on the top
  model, reading ``outputs.loss`` before the Trainer's bookkeeping can filter it.
- forward finiteness per group: a forward hook on each group's root module, reducing the primary output
  to its abs-max (NaN/Inf propagate through max; no temporary the size of the activation). A head's
  output is judged when the forward ends: when it is the ``logits`` the returned loss was computed from,
  the loss's own check covers it and the logits (often the step's largest activation) are not read.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd import Variable
from torch.utils.hooks import RemovableHandle

from gradguard.core.groups import GroupMap
from gradguard.engine.distributed import shard_weight

IGNORE_INDEX = -100
_FUSED = (torch.float32, torch.bfloat16, torch.float16)  # gradient dtypes whose norms are batched (in fp32)
MAX_MICRO_BATCHES = 1024  # per optimizer step; far above any real gradient accumulation


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 / tensor parallel), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _absmax(t: torch.Tensor) -> torch.Tensor:
    """abs-max as fp32 0-d tensor; NaN if any element is NaN. No activation-sized temporary."""
    t = _local(t.detach())
    if t.numel() == 0:
        return torch.zeros((), device=t.device)
    if t.is_complex():
        t = torch.view_as_real(t)
    # One fused min/max pass: ~10x faster on CPU than vector_norm(ord=inf) (2.7 ms vs 0.26 ms on a
    # 4x128x2000 fp32 logits tensor, 1 thread), NaN/Inf propagate the same way (benchmarks/run.py).
    lo, hi = torch.aminmax(t)
    return torch.maximum(hi, -lo).float()


def grad_norm(g: torch.Tensor) -> torch.Tensor:
    """L2 norm of a gradient as a fp32 0-d tensor (sparse, complex, DTensor and fp16 aware)."""
    g = _local(g.detach())
    if g.is_sparse:
        g = g.coalesce().values()
    if g.dtype == torch.float16:  # a norm above 65504 would overflow to inf in fp16 itself
        return torch.linalg.vector_norm(g, dtype=torch.float32)
    return torch.linalg.vector_norm(g).float()


def primary_tensor(out: Any) -> torch.Tensor | None:
    """The tensor a module's output is mostly about: itself, the first of a tuple, ``last_hidden_state``…"""
    if isinstance(out, torch.Tensor):
        return out if out.is_floating_point() or out.is_complex() else None
    if isinstance(out, dict):  # ModelOutput is a dict
        for key in ("last_hidden_state", "logits", "hidden_states", "image_embeds"):
            v = out.get(key)
            if isinstance(v, torch.Tensor):
                return primary_tensor(v)
        values = list(out.values())
    elif isinstance(out, (tuple, list)):
        values = list(out)
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        values = [getattr(out, f.name) for f in dataclasses.fields(out)]
    else:
        return None
    for v in values:
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()):
            return v
    return None


def find_loss(out: Any) -> torch.Tensor | None:
    """``outputs.loss`` for a ModelOutput/dict, or the output itself when it is a scalar tensor."""
    if isinstance(out, torch.Tensor):
        return out if out.dim() == 0 and out.is_floating_point() else None
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.is_floating_point() else None


def _output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a model's output, one level deep (itself, a tuple or list, a dict or ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    return [v for v in values if isinstance(v, torch.Tensor)]


def _logits(out: Any) -> torch.Tensor | None:
    logits = out.get("logits") if isinstance(out, dict) else getattr(out, "logits", None)
    return logits if isinstance(logits, torch.Tensor) else None


def rng_state() -> dict[str, Any]:
    """CPU and CUDA generator states (host-side copies; no device sync)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def own_mean_loss(
    model: nn.Module, loss: torch.Tensor, labels: torch.Tensor, shift_labels: Any, items: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """This micro-batch's own mean loss (and its token count), from a loss normalised by ``num_items_in_batch``.

    With gradient accumulation (and across ranks) the Trainer passes the token count of the whole
    optimizer step, and the model returns its summed loss divided by it: each micro-batch's value is
    only its share. Rescaled by the tokens it predicts (``labels[..., 1:]`` for causal LMs, which shift
    labels, as the Trainer counts them), it is the number users know. On the device, no sync.
    """
    config = getattr(model, "config", None)
    if isinstance(shift_labels, torch.Tensor):
        targets = shift_labels
    elif labels.dim() >= 2 and not getattr(config, "is_encoder_decoder", False):
        targets = labels[..., 1:]
    else:
        targets = labels
    own = (targets != IGNORE_INDEX).sum().to(loss.device).float()
    if isinstance(items, torch.Tensor):
        total = items.to(loss.device, non_blocking=True).float().reshape(())
    else:  # a Python number: filled on the device, no host-to-device copy to wait for
        total = torch.full((), float(items), device=loss.device)
    return torch.where(own > 0, loss * total / own.clamp(min=1), loss), own


@dataclass
class MicroBatch:
    """What one forward call of the top model recorded (device tensors, no host sync)."""

    index: int
    loss: torch.Tensor | None = None
    supervised: torch.Tensor | None = None  # count of labels != -100
    loss_weight: torch.Tensor | None = None  # tokens the loss averages over, when the Trainer said so
    inputs: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (key, abs-max)
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)
    vocab: int | None = None  # width of the logits a cross-entropy over integer labels ran over (its chance level)
    # Whether its backward ran (a hook on its loss, or output, fired). A forward without a backward (an evaluation
    # in train mode without torch.no_grad) is not a training micro-batch. None: nothing to watch (no tensor of it
    # requires grad), counted as before.
    backward: bool | None = False


class Probes:
    """Installs and removes gradguard's hooks, and accumulates one optimizer step's observations."""

    def __init__(
        self,
        model: nn.Module,
        gmap: GroupMap,
        *,
        capture_batches: bool = True,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self.model = model
        self.gmap = gmap
        self.capture_batches = capture_batches
        self._on_error = on_error
        self._handles: list[RemovableHandle] = []
        self.group_names = list(gmap.groups)
        # Trainable parameters, in a fixed order; their group and module index for on-device reductions.
        self.params: list[tuple[str, nn.Parameter]] = []
        self.paths: list[str] = []  # each parameter's path as the user knows it (wrapper segments removed)
        self.param_group: list[int] = []
        self.param_module: list[int] = []
        self.modules: list[str] = []
        module_ix: dict[str, int] = {}
        group_ix = {g: i for i, g in enumerate(self.group_names)}
        for info in gmap.by_param.values():
            if not info.param.requires_grad:
                continue
            mod = info.path.rsplit(".", 1)[0] if "." in info.path else info.path
            self.params.append((info.name, info.param))
            self.paths.append(info.path)
            self.param_group.append(group_ix[info.group])
            self.param_module.append(module_ix.setdefault(mod, len(module_ix)))
        self.modules = list(module_ix)
        # One process, whole gradients: norms batched per backward (see the module docstring). The guard
        # turns it off across ranks and under DeepSpeed, whose hooks move gradients into its partitions.
        self.batched = True
        # Parameters whose gradient is split across ranks (FSDP2 / tensor-parallel DTensors; DeepSpeed ZeRO
        # partitions, registered by gradguard.engine.zero): a hook sees only this rank's piece,
        # so the guard sums the weighted squared norms over the ranks (see policy.shard_weight).
        self.shard_weights: dict[int, float] = {}
        for i, (_, p) in enumerate(self.params):
            w = shard_weight(p)
            if w is not None:
                self.shard_weights[i] = w
        self._shard_cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hooked_groups: set[int] = set()  # groups whose root module has a forward hook (see attach)
        self.never_fired = set(range(len(self.params)))  # trainable tensors that never got a gradient yet
        self.on_crash: Callable[[Exception], None] | None = None  # told when the model's forward raises
        self.reset()

    # -- lifecycle -----------------------------------------------------------------------------------
    def attach(self) -> None:
        if self._handles:
            return
        for i, (_, p) in enumerate(self.params):
            self._handles.append(p.register_post_accumulate_grad_hook(self._grad_hook(i)))
        self._handles.append(self.model.register_forward_pre_hook(self._pre_hook))
        self._handles.append(self.model.register_forward_hook(self._top_hook, with_kwargs=True))
        # Also called when the forward raises: how a crashed run is told from a finished one.
        self._handles.append(self.model.register_forward_hook(self._crash_hook, always_call=True))
        for gi, name in enumerate(self.group_names):
            defer = self.gmap.groups[name].role == "head"
            for module in self.gmap.roots.get(name, []):
                if module is self.model:
                    continue
                self._handles.append(module.register_forward_hook(self._group_hook(gi, defer)))
                self.hooked_groups.add(gi)

    def own(self, handle: Any) -> None:
        """Keep ``handle`` (anything with ``remove()``) to be removed with the hooks on :meth:`detach`."""
        self._handles.append(handle)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.reset()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def reset(self) -> None:
        """Forget the current step (after it was collected, or when a step is abandoned)."""
        self.grad_slots: list[torch.Tensor | None] = [None] * len(self.params)
        self.grad_order: list[int] = []  # param indices in the order their grads were accumulated
        self._unnormed: list[int] = []  # batched: gradients of this backward whose norm is not taken yet
        self._norms_queued_for = -1  # the backward (autograd graph task) whose end takes them
        self.group_outputs: list[tuple[int, int, torch.Tensor | None]] = []  # (group, micro-batch, abs-max)
        self._deferred: list[tuple[int, torch.Tensor]] = []  # (index in group_outputs, a head's output)
        self.micro: list[MicroBatch] = []
        self.ran: set[tuple[int, int]] = set()  # (group, micro-batch): the group's forward ran in a training forward
        self._pending_rng: dict[str, Any] = {}
        self._loss_upto = 0  # micro-batches already paired with a loss handed over by add_loss()
        self._in_forward = False  # inside a training forward of the top model

    # -- hooks (collect only; an exception is contained by the guard) --------------------------------
    def _grad_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            try:
                g = param.grad
                if g is None:
                    return
                self.grad_order.append(i)
                if not self.batched:
                    self.grad_slots[i] = grad_norm(g)
                    return
                task = torch._C._current_graph_task_id()
                if task != self._norms_queued_for:  # the first gradient of this backward: norms at its end
                    Variable._execution_engine.queue_callback(self._end_of_backward)
                    self._norms_queued_for = task
                self._unnormed.append(i)
            except Exception as exc:  # never let a probe kill the backward pass
                self._fail(exc)

        return hook

    def _end_of_backward(self) -> None:
        try:  # runs inside the autograd engine: an exception here would end the user's backward
            self.take_norms()
        except Exception as exc:
            self._fail(exc)

    def take_norms(self) -> None:
        """The norms of the gradients noted since the last call (pre-clip: it runs when backward ends, or at the
        latest in the step's check). One ``_foreach_norm`` per (device, dtype), as torch's own
        ``clip_grad_norm_`` groups them: the fused kernel takes one device and one dtype per call, so a fp32
        LoRA beside a bf16 tower stays on the fast path."""
        pending, self._unnormed = self._unnormed, []  # rebind, never mutate: replays snapshot attributes
        by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i in dict.fromkeys(pending):
            g = self.params[i][1].grad
            if g is None:
                continue
            if type(g) is torch.Tensor and not g.is_sparse and g.dtype in _FUSED:
                by_kind.setdefault((g.device, g.dtype), []).append(i)
            else:  # sparse, float64, complex, tensor subclasses
                self.grad_slots[i] = grad_norm(g)
        for ix in by_kind.values():
            grads = [self.params[i][1].grad for i in ix]
            norms = torch._foreach_norm(grads, 2, dtype=torch.float32)  # type: ignore[arg-type]
            for i, n in zip(ix, norms):
                self.grad_slots[i] = n

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        # RNG state at the start of each forward, so a replay sees the same dropout masks.
        try:
            self._in_forward = torch.is_grad_enabled()
            if self._in_forward and self.capture_batches:
                self._pending_rng = rng_state()
        except Exception as exc:
            self._fail(exc)

    def _crash_hook(self, module: nn.Module, args: Any, out: Any) -> None:
        self._in_forward = False
        error = sys.exc_info()[1]  # torch calls an always_call hook from its `except` when the forward raised
        if out is None and isinstance(error, Exception) and self.on_crash is not None:
            self.on_crash(error)

    def _top_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        try:
            if not torch.is_grad_enabled():
                return  # evaluation / generation: not a training micro-batch
            mb = MicroBatch(index=len(self.micro))
            loss = find_loss(out)
            self.settle(_logits(out) if loss is not None else None)
            # Every tensor of its output: a trainer may compute its own loss (from the logits, or TRL's fused
            # log-probs) and never backpropagate through this one.
            self._watch_backward(mb, loss, *_output_tensors(out))
            if loss is not None:
                mb.loss = loss.detach().float()
            labels = kwargs.get("labels")
            if isinstance(labels, torch.Tensor):
                mb.supervised = (labels != IGNORE_INDEX).sum()
                logits = _logits(out)
                if logits is not None and not labels.is_floating_point() and logits.dim() >= 2:
                    mb.vocab = int(logits.shape[-1])
                items = kwargs.get("num_items_in_batch")
                if items is not None and mb.loss is not None:
                    mb.loss, mb.loss_weight = own_mean_loss(module, mb.loss, labels, kwargs.get("shift_labels"), items)
            for key, value in [*kwargs.items(), *((f"arg{i}", a) for i, a in enumerate(args))]:
                if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
                    mb.inputs.append((key, _absmax(value)))
            if self.capture_batches:
                mb.args, mb.kwargs, mb.rng = args, kwargs, self._pending_rng
            if len(self.micro) >= MAX_MICRO_BATCHES:
                # Nobody is calling Guard.check(): keep memory bounded rather than grow forever.
                self.reset()
                mb.index = 0
            self.micro.append(mb)
        except Exception as exc:
            self._fail(exc)

    def _watch_backward(self, mb: MicroBatch, *tensors: torch.Tensor | None) -> None:
        """Mark ``mb`` when backward flows through any of ``tensors`` (its loss, its output): a tensor hook that
        returns nothing, so the gradients are untouched."""
        watched = [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]
        if not watched:
            mb.backward = None  # nothing to watch: counted, as before
            return

        def seen(grad: torch.Tensor) -> None:
            mb.backward = True

        for t in watched:
            t.register_hook(seen)

    def _group_hook(self, gi: int, defer: bool = False) -> Callable[[nn.Module, Any, Any], None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            grad = torch.is_grad_enabled()
            if not (grad or self._in_forward):
                return  # evaluation / generation
            try:
                # It ran in a training forward, even under an inner no_grad (then it cannot get a gradient).
                self.ran.add((gi, len(self.micro)))
                if not grad:
                    return
                t = primary_tensor(out)
                if t is None:
                    return
                if defer:  # a head: judged by settle() once the forward has returned (or at check time)
                    self._deferred.append((len(self.group_outputs), t))
                    self.group_outputs.append((gi, len(self.micro), None))
                else:
                    self.group_outputs.append((gi, len(self.micro), _absmax(t)))
            except Exception as exc:
                self._fail(exc)

        return hook

    def settle(self, covered: torch.Tensor | None = None) -> None:
        """Reduce the heads' deferred outputs, in place; drop the one that is ``covered`` (the logits a
        finite-checked loss was computed from: the loss's check covers them)."""
        if not self._deferred:
            return
        deferred, self._deferred = self._deferred, []  # rebind, never mutate: replays snapshot attributes
        dropped = set()
        for i, t in deferred:
            if t is covered:
                dropped.add(i)
            else:
                gi, micro, _ = self.group_outputs[i]
                self.group_outputs[i] = (gi, micro, _absmax(t))
        if dropped:
            self.group_outputs = [e for i, e in enumerate(self.group_outputs) if i not in dropped]

    def add_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss computed outside the model's forward (``Guard.record_loss``), on the device.

        It belongs to the latest forward of the model since the last call, unless that forward returned a loss
        of its own (the raw, unscaled one wins); with no forward of the model since (Lightning calls
        ``training_step``, not the model's ``forward``), it is a micro-batch of its own.
        """
        self.settle()  # a head's output, when no forward of the guarded model returned (Lightning)
        value = loss.detach().float().reshape(())  # stays on the device: no host sync here
        if len(self.micro) >= MAX_MICRO_BATCHES:
            self.reset()  # nobody calls check(): bound memory, as the forward hook does
        if len(self.micro) > self._loss_upto:
            mb = self.micro[-1]
            if mb.loss is None:
                mb.loss = value
        else:
            mb = MicroBatch(index=len(self.micro), loss=value)
            self.micro.append(mb)
        if not mb.backward:  # the loss handed over is the one backward runs on
            self._watch_backward(mb, loss)
        self._loss_upto = len(self.micro)

    def _fail(self, exc: BaseException) -> None:
        if self._on_error is None:
            raise exc
        self._on_error(exc)

    # -- per-step reduction (on device) ----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where a step's statistics are gathered: the first trainable parameter's device."""
        for _, p in self.params:
            if not p.is_meta:
                return p.device
        return torch.device("cpu")

    def local_norms(self, device: torch.device) -> torch.Tensor:
        """This rank's per-parameter gradient norms (0 where no gradient arrived), on ``device``."""
        if self._unnormed:  # a backward whose end-of-backward callback did not run
            self.take_norms()
        zero = torch.zeros((), device=device)
        if not self.params:
            return zero[None][:0]
        slots = [s if s is not None else zero for s in self.grad_slots]
        try:
            return torch.stack(slots).to(device)
        except RuntimeError:  # gradients on several devices (a model split across GPUs)
            return torch.stack([s.to(device) for s in slots])

    def set_shard_weights(self, weights: dict[int, float]) -> None:
        """Declare which parameters' gradients are split across ranks (index into ``params`` -> weight)."""
        self.shard_weights = dict(weights)
        self._shard_cache.clear()

    def shard_index(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, weights) of the sharded parameters, cached on ``device`` (no per-step host copy)."""
        if device not in self._shard_cache:
            ix = sorted(self.shard_weights)
            self._shard_cache[device] = (
                torch.tensor(ix, device=device, dtype=torch.long),
                torch.tensor([self.shard_weights[i] for i in ix], device=device, dtype=torch.float32),
            )
        return self._shard_cache[device]

    def reduce_grads(self, norms: Sequence[float]) -> list[list[float]]:
        """Per-group ``[sum of squared norms, tensors with a non-finite norm, tensors with a non-zero norm]`` from
        the per-parameter gradient norms, once they are on the host (they ride in the step's one read). A few
        Python additions per tensor cost less than the device ops that would do it on the device: a dispatch
        each, and on a GPU a kernel launch each."""
        rows = [[0.0, 0, 0] for _ in self.group_names]
        for g, n in zip(self.param_group, norms):
            row = rows[g]
            row[0] += n * n
            row[1] += not math.isfinite(n)
            row[2] += n != 0
        return rows

    def module_norms(self, norms: torch.Tensor) -> torch.Tensor:
        """Per-module gradient norms from per-parameter ones (``[steps x params]`` -> ``[steps x modules]``): the
        fault path's evidence only, so a healthy step pays nothing for it."""
        owner = torch.tensor(self.param_module, device=norms.device, dtype=torch.long)
        sumsq = torch.zeros(norms.shape[0], len(self.modules), device=norms.device)
        return sumsq.index_add_(1, owner, norms.square()).sqrt()

    def norms_in_order(self) -> list[tuple[int, float]]:
        """(parameter index, gradient norm) in the order backward produced the gradients: one host read, for
        the fault path only."""
        if self._unnormed:
            self.take_norms()
        order = [i for i in dict.fromkeys(self.grad_order) if self.grad_slots[i] is not None]
        if not order:
            return []
        device = self.grad_slots[order[0]].device  # type: ignore[union-attr]
        values = torch.stack([self.grad_slots[i].to(device) for i in order]).tolist()  # type: ignore[union-attr]
        return list(zip(order, values))

    def first_nonfinite_grad(self) -> tuple[str, str] | None:
        """(group, parameter name) of the first gradient, in backward order, whose norm is not finite."""
        bad = next((i for i, v in self.norms_in_order() if not math.isfinite(v)), None)
        return None if bad is None else (self.group_names[self.param_group[bad]], self.params[bad][0])

    def set_grad_norms(self, norms: dict[int, torch.Tensor], shard_weights: dict[int, float] | None = None) -> None:
        """Gradient norms read by someone else than the hooks (DeepSpeed's partitions, read right before its
        optimizer step); ``shard_weights``: which of them are this rank's piece of a split gradient (see
        :meth:`set_shard_weights`). Parameters the hooks did not see arrive count as produced last."""
        for i, n in norms.items():
            self.grad_slots[i] = n
        if shard_weights is not None and shard_weights != self.shard_weights:
            self.set_shard_weights(shard_weights)
        seen = set(self.grad_order)
        self.grad_order += [i for i in reversed(range(len(self.params))) if i in norms and i not in seen]

    @property
    def idle(self) -> bool:
        """No backward since the last reset: no gradient arrived and no micro-batch's backward ran (no step)."""
        return not self.grad_order and not self._unnormed and all(m.backward is False for m in self.micro)

    def prune(self) -> None:
        """Forget the forwards whose backward did not run (an evaluation in train mode, without no_grad): they
        are not training micro-batches, and their loss must not mix into the step's."""
        dropped = [m.index for m in self.micro if m.backward is False]
        if not dropped:
            return
        self.settle()

        def moved(i: int) -> int:
            return i - sum(d < i for d in dropped)

        self.micro = [m for m in self.micro if m.backward is not False]
        for i, m in enumerate(self.micro):
            m.index = i
        self.group_outputs = [(g, moved(m), v) for g, m, v in self.group_outputs if m not in dropped]
        self.ran = {(g, moved(m)) for g, m in self.ran if m not in dropped}
        self._loss_upto = len(self.micro)

    def ran_per_group(self) -> list[bool | None]:
        """Per group: whether its forward ran this step (None: no hook can tell, e.g. a group of loose
        parameters such as BLIP-2's query tokens)."""
        ran = {g for g, _ in self.ran}
        return [(gi in ran) if gi in self.hooked_groups else None for gi in range(len(self.group_names))]

    def unfired(self, fired: list[int]) -> dict[int, list[str]]:
        """Per group that got some gradient this step (``fired``: :meth:`fired_per_group`): its trainable tensors
        that never got one in this run."""
        self.never_fired = {i for i in self.never_fired if self.grad_slots[i] is None}
        out: dict[int, list[str]] = {}
        for i in sorted(self.never_fired):
            if fired[self.param_group[i]]:
                out.setdefault(self.param_group[i], []).append(self.paths[i])
        return out

    def fired_per_group(self) -> list[int]:
        counts = [0] * len(self.group_names)
        for i, s in enumerate(self.grad_slots):
            if s is not None:
                counts[self.param_group[i]] += 1
        return counts

    def trainable_tensors_per_group(self) -> list[int]:
        counts = [0] * len(self.group_names)
        for gi in self.param_group:
            counts[gi] += 1
        return counts
