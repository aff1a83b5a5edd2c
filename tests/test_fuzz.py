"""Fuzzing bad inputs: random module trees and parameter set-ups through the audit, the groups and a guarded
training loop (``Guard(strict=True)``: any exception inside gradguard fails the test).

Trees mix nested containers (``ModuleList`` / ``ModuleDict`` / ``Sequential``), names that look like
wrapper or adapter segments (``base_layer``, ``lora_A``, ``modules_to_save``, ``_orig_mod``, ``module``) or
roles (``vision_tower``, ``resampler``, ``lm_head``), shared modules and tied parameters, mixed
``requires_grad``, float64 / bf16 / fp16 / complex parameters, integer parameters and buffers, sparse
gradients (``nn.Embedding(sparse=True)``), meta-device parameters, submodules that return tuples, dicts,
dataclasses or ``None``, and models without parameters.

Invariants: no crash; every parameter in exactly one group; the counts add up; ``.ok`` agrees with the
findings; no error finding on a healthy trainable model; every hook removed; every report schema-valid.

``max_examples`` is set so that this file runs in about 10 s on a CI machine (see ``EXAMPLES``).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reliability_bitwise import validate_report
from test_reliability_hygiene import hooks
from torch import nn

from gradguard import Guard, Report, TrainingHealthError, audit_requires_grad, build_groups
from gradguard.codes import rule
from gradguard.engine import shutdown

D = 4  # every leaf maps (B, D) floats to (B, D) floats, so any tree of them runs
# Examples per test in CI (derandomised there, so CI runs the same cases every time): about 10 s in all.
# GRADGUARD_FUZZ_SCALE=10 runs ten times as many (and, outside CI, new random ones each time).
_SCALE = float(os.environ.get("GRADGUARD_FUZZ_SCALE", "1"))
EXAMPLES = {k: int(n * _SCALE) for k, n in {"structure": 250, "train": 200, "meta": 60}.items()}
FUZZ = settings(
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)

NAMES = [
    "vision_tower", "vpm", "visual", "resampler", "merger", "multi_modal_projector", "llm", "language_model",
    "lm_head", "head", "layers", "mlp", "block", "encoder", "proj", "0",
    "base_layer", "lora_A", "lora_B", "modules_to_save", "original_module", "default", "module", "_orig_mod",
    "base_model", "model",
]  # fmt: skip


# -- leaves ---------------------------------------------------------------------------------------------------
@dataclass
class Hidden:
    hidden: torch.Tensor
    extra: int = 0


def unwrap(out: Any, x: torch.Tensor) -> torch.Tensor:
    """The next input from whatever a submodule returned (``None``: it was a side branch)."""
    if out is None:
        return x
    if isinstance(out, tuple):
        return out[0]
    if isinstance(out, dict):
        return out["hidden"]
    if isinstance(out, Hidden):
        return out.hidden
    return out


class Cast(nn.Module):
    """A Linear stored in another dtype (float64, bf16, fp16), computing in it."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.to(self.lin.weight.dtype)).float()


class EmbedAdd(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, D, sparse=sparse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.embed(torch.arange(x.shape[0]) % 5)


class ComplexLeaf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(D, dtype=torch.cfloat) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (x.to(torch.cfloat) * self.w).real


class IntLeaf(nn.Module):
    """Integer state: a buffer and a parameter (torch allows integer parameters only without grad)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("counts", torch.arange(D))
        self.seen = nn.Parameter(torch.zeros(D, dtype=torch.long), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0 * self.counts + 0 * self.seen


class Returns(nn.Module):
    """A Linear whose output comes back as a tuple, a dict, a dataclass, or not at all (``None``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.lin = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> Any:
        h = self.lin(x)
        if self.how == "tuple":
            return h, None, "aux"
        if self.how == "dict":
            return {"hidden": h, "mask": torch.ones(1, dtype=torch.bool)}
        if self.how == "dataclass":
            return Hidden(h)
        return None  # a side branch: its parameters get no gradient


class Node(nn.Module):
    def __init__(self, kind: str, children: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        if kind == "list":
            self.body: nn.Module = nn.ModuleList([c for _, c in children])
        elif kind == "dict":
            self.body = nn.ModuleDict(OrderedDict(children))
        else:
            self.body = nn.Sequential(OrderedDict(children))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = self.body.values() if isinstance(self.body, nn.ModuleDict) else self.body
        for m in mods:  # type: ignore[union-attr]
            x = unwrap(m(x), x)
        return x


class Root(nn.Module):
    """The model: a tree under a (fuzzed) attribute name, maybe a 0-d parameter of its own."""

    def __init__(self, body: nn.Module, output: str, name: str = "body", scalar: bool = False) -> None:
        super().__init__()
        self.name = name
        self.add_module(name, body)
        self.scale = nn.Parameter(torch.ones(())) if scalar else None
        self.output = output

    @property
    def body(self) -> nn.Module:
        return self.get_submodule(self.name)

    def forward(self, x: torch.Tensor) -> Any:
        h = unwrap(self.body(x), x)
        if self.scale is not None:
            h = h * self.scale
        loss = h.float().pow(2).mean()
        if self.output == "scalar":
            return loss
        if self.output == "dict":
            return {"loss": loss, "hidden": h}
        if self.output == "dataclass":
            return Hidden(h, extra=1), loss  # no .loss: the loop computes the loss itself
        return (loss, h)


def loss_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["loss"]
    return out[1] if isinstance(out[0], Hidden) else out[0]


LEAVES: dict[str, Any] = {
    "linear": lambda: nn.Linear(D, D),
    "linear_nobias": lambda: nn.Linear(D, D, bias=False),
    "layernorm": lambda: nn.LayerNorm(D),
    "float64": lambda: Cast(torch.float64),
    "bf16": lambda: Cast(torch.bfloat16),
    "fp16": lambda: Cast(torch.float16),
    "embed": lambda: EmbedAdd(sparse=False),
    "embed_sparse": lambda: EmbedAdd(sparse=True),
    "complex": ComplexLeaf,
    "int": IntLeaf,
    "tuple": lambda: Returns("tuple"),
    "dict": lambda: Returns("dict"),
    "dataclass": lambda: Returns("dataclass"),
    "none": lambda: Returns("none"),
    "relu": nn.ReLU,
    "identity": nn.Identity,
}


# -- specs (plain data, built after seeding, so that every example replays exactly) --------------------------
def _named(children: list[Any], names: list[str]) -> list[tuple[str, Any]]:
    out, seen = [], set()
    for i, (child, name) in enumerate(zip(children, names)):
        key = name if name not in seen else f"{name}_{i}"
        seen.add(key)
        out.append((key, child))
    return out


leaf_specs = st.sampled_from(sorted(LEAVES))
tree_specs = st.recursive(
    leaf_specs,
    lambda kids: st.builds(
        lambda kind, children, names: ("node", kind, _named(children, names)),
        st.sampled_from(["list", "dict", "seq"]),
        st.lists(kids, min_size=1, max_size=4),
        st.lists(st.sampled_from(NAMES), min_size=4, max_size=4),
    ),
    max_leaves=10,
)


@dataclass
class ModelSpec:
    tree: Any
    output: str
    name: str
    scalar: bool
    tie: bool
    share: bool
    frozen: list[bool]  # per parameter (cycled); True = frozen
    meta: bool


model_specs = st.builds(
    ModelSpec,
    tree=tree_specs,
    output=st.sampled_from(["scalar", "dict", "dataclass", "tuple"]),
    name=st.sampled_from(NAMES),
    scalar=st.booleans(),
    tie=st.booleans(),
    share=st.booleans(),
    frozen=st.lists(st.booleans(), min_size=1, max_size=12),
    meta=st.booleans(),
)


def build(spec: Any) -> nn.Module:
    if isinstance(spec, str):
        return LEAVES[spec]()
    _, kind, children = spec
    return Node(kind, [(name, build(child)) for name, child in children])


def make_model(spec: ModelSpec, *, allow_meta: bool) -> nn.Module:
    torch.manual_seed(0)
    body = build(spec.tree)
    model = Root(body, spec.output, spec.name, spec.scalar)
    linears = [m for m in model.modules() if type(m) is nn.Linear and m.weight.dtype == torch.float32]
    if spec.tie and len(linears) >= 2:
        linears[-1].weight = linears[0].weight  # tied: one tensor under two names
    if spec.share and isinstance(body, Node):
        first = next(iter(body.body.children()))
        if isinstance(body.body, nn.ModuleList):
            body.body.append(first)  # the same module twice in the forward path
        else:
            body.body.add_module("shared_again", first)
    for i, p in enumerate(dict.fromkeys(model.parameters())):
        if p.is_floating_point() or p.is_complex():
            p.requires_grad_(not spec.frozen[i % len(spec.frozen)])
    if spec.meta and allow_meta:
        target = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
        if target is not None:
            target.to("meta")
    return model


def unique_params(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


# -- properties -----------------------------------------------------------------------------------------------
def check_structure(model: nn.Module) -> None:
    gmap = build_groups(model)
    params = unique_params(model)
    # every parameter (shared ones once) in exactly one group
    placed = [id(info.param) for g in gmap for info in g.params]
    assert len(placed) == len(set(placed)) == len(params)
    assert set(placed) == {id(p) for p in params}
    assert all(g.name == info.group for g in gmap for info in g.params)

    trainable_ids = [p for p in params if p.requires_grad]
    opt = torch.optim.SGD(trainable_ids, lr=0.1) if trainable_ids else None
    audit = audit_requires_grad(model, optimizer=opt)
    # the counts add up, per group and in total: every parameter once, except a frozen original that a
    # modules_to_save copy (a parameter under `modules_to_save.`) stands in for
    stand_ins = {(g.name, i.path) for g in gmap for i in g.params if i.adapter and ".modules_to_save." in f".{i.name}"}
    hidden = sum(
        i.param.numel()
        for g in gmap
        for i in g.params
        if not i.adapter and (g.name, i.path) in stand_ins and not i.param.requires_grad
    )
    total = sum(p.numel() for p in params)
    assert sum(s.params + s.adapter_params for s in audit.groups) == total - hidden
    assert sum(s.trainable + s.adapter_trainable for s in audit.groups) == sum(p.numel() for p in trainable_ids)
    for s in audit.groups:
        assert 0 <= s.adapter_trainable <= s.adapter_params
        assert s.trainable + s.frozen == s.params and s.frozen >= 0
        if opt is not None:  # the optimizer holds exactly the trainable parameters
            assert s.in_optimizer == s.trainable + s.adapter_trainable
    # findings are real rules, and .ok agrees with them
    for f in audit.findings:
        assert rule(f.code).kind == f.kind
    errors = [f for f in audit.findings if f.severity == "error"]
    assert audit.ok == (not errors)
    if trainable_ids:
        assert not errors, errors  # a trainable model, its optimizer complete, no stated intent: nothing wrong
    else:
        assert [f.kind for f in errors] == ["no_trainable_params"]
    json.dumps(audit.to_dict(), allow_nan=False)
    validate_report(json.loads(audit.to_report().to_json()))


@pytest.mark.parametrize("case", ["no-params", "only-buffers", "all-frozen"])
def test_degenerate_models(case: str) -> None:
    model: nn.Module = nn.Sequential(nn.ReLU(), nn.Identity())
    if case == "only-buffers":
        model = IntLeaf()
        model.seen.requires_grad_(False)
    elif case == "all-frozen":
        model = nn.Sequential(nn.Linear(D, D)).requires_grad_(False)
    check_structure(model)
    before = hooks(model)
    with pytest.raises(TrainingHealthError, match="before step 1") as stopped:  # stop: nothing can train
        Guard(model, strict=True, console=False)
    report = Report.from_dict(stopped.value.report)
    assert report.fault is not None and report.fault.kind == "no_trainable_params"
    assert not report.ok and hooks(model) == before
    assert not [g for g in shutdown.open_guards() if g.model is model]
    validate_report(json.loads(report.to_json()))
    guard = Guard(model, strict=True, console=False, on_fault="warn")  # recorded; the loop may go on
    assert guard.fault is not None and guard.check() is True
    guard.close()


@settings(FUZZ, max_examples=EXAMPLES["structure"])
@given(model_specs)
def test_fuzz_groups_and_audit(spec: ModelSpec) -> None:
    check_structure(make_model(spec, allow_meta=True))


@settings(FUZZ, max_examples=EXAMPLES["meta"])
@given(model_specs)
def test_fuzz_guard_starts_and_closes_on_meta_models(spec: ModelSpec) -> None:
    """A model (partly) on the meta device: the guard starts, reports, and removes its hooks."""
    model = make_model(spec, allow_meta=True)
    model.to("meta")
    before = hooks(model)
    report = Guard(model, strict=True, console=False, on_fault="warn").close()
    assert hooks(model) == before
    validate_report(json.loads(report.to_json()))
    if any(p.requires_grad for p in model.parameters()):
        assert "meta_params" in [f.kind for f in report.findings]


@settings(FUZZ, max_examples=EXAMPLES["train"])
@given(model_specs)
def test_fuzz_guarded_training(spec: ModelSpec) -> None:
    model = make_model(spec, allow_meta=False)
    check_structure(model)
    before = hooks(model)
    trainable = [p for p in unique_params(model) if p.requires_grad]
    opt = torch.optim.SGD(trainable or [torch.zeros(1, requires_grad=True)], lr=0.01)
    if not trainable:  # nothing can train: stopped before the first step, nothing left attached
        with pytest.raises(TrainingHealthError, match="no_trainable_params before step 1"):
            Guard(model, None, strict=True, console=False)
        assert hooks(model) == before and not [g for g in shutdown.open_guards() if g.model is model]
        return
    guard = Guard(model, opt, strict=True, console=False)
    x = torch.randn(3, D, generator=torch.Generator().manual_seed(0))
    went_on = []
    for _ in range(4):
        loss = loss_of(model(x))
        if loss.requires_grad:  # every trainable parameter may sit in a side branch or be frozen
            loss.backward()
        went_on.append(guard.check())
        opt.step()
        opt.zero_grad()
    report = guard.close()
    assert hooks(model) == before, "hooks left behind"
    assert guard not in shutdown.open_guards()
    validate_report(json.loads(report.to_json()))
    errors = [f for f in report.findings if f.severity == "error"]
    assert report.ok == (not errors and report.fault is None)
    # healthy: finite, supervised by construction; side branches and frozen paths only warn
    assert not errors and report.status == "healthy" and all(went_on), report.findings
    # Arbitrary losses on arbitrary structures: the sizes of their updates say nothing of health.
    quiet = ("dead_gradient", "fp16_trainable", "partial_freeze", "unused_params", "idle_group", "update_too_large")
    assert not [f for f in report.findings if f.kind not in quiet]
