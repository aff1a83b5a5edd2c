"""The static audit: what will and will not train, checked before a single step runs.

Pure functions from (model, optimizer, intent) to findings: no hooks, no side effects, no reads of
parameter data (so a 70B model on the meta device is audited in milliseconds).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from gradguard.core.groups import ROLES, Group, GroupMap, ParamInfo, build_groups, is_glob, is_saved_copy, param_numel
from gradguard.errors import ConfigurationError
from gradguard.report.format import fmt_count
from gradguard.report.model import Fault, Finding, GroupSummary, Origin, Report


@dataclass
class Audit:
    """The result of :func:`audit_requires_grad`: per-group counts and findings.

    ``print(audit)`` shows a table, one row per module group; ``assert audit.ok, audit`` fails a CI job
    with that table when there is an error finding.
    """

    groups: list[GroupSummary]
    findings: list[Finding]
    group_map: GroupMap | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def to_report(self) -> Report:
        # A "fault" report always carries its fault (the schema says so): the first error, at step 0.
        first = next((f for f in self.findings if f.severity == "error"), None)
        fault = None
        if first is not None:
            group = next((g for g in self.groups if g.name == first.group), None)
            origin = Origin("static", first.group, first.group, group.role if group else None)
            fault = Fault(0, first.kind, first.code, first.message, origin, weights_intact=True)
        return Report(
            status="healthy" if fault is None else "fault",
            fault=fault,
            findings=list(self.findings),
            groups=list(self.groups),
        )

    def to_dict(self) -> dict[str, Any]:
        d = self.to_report().to_dict()
        return {"ok": self.ok, "groups": d["groups"], "findings": d["findings"]}

    def __rich__(self) -> Any:
        from gradguard.report.render import audit_renderable

        return audit_renderable(self)

    def __str__(self) -> str:
        from gradguard.report.render import render_text

        return render_text(self)


def counted_params(group: Group) -> tuple[list[ParamInfo], list[ParamInfo]]:
    """``(base, adapters)`` as the report counts them.

    A ``modules_to_save`` module is trained in full through a copy, while PEFT keeps the frozen original beside
    it (to switch the adapter off). The copy *is* the module's weights as far as training goes: it counts as
    the module's base parameters, in place of the original, and not as an adapter. So ``params`` counts a
    module's weights once, ``trainable + frozen == params``, and adapters are the added (LoRA-style) weights.
    """
    copies = [p for p in group.adapters if is_saved_copy(p)]
    shadowed = {p.path for p in copies}
    # Only a frozen original steps aside: one someone made trainable is training weights, and is counted.
    base = [p for p in group.base if p.path not in shadowed or p.param.requires_grad] + copies
    adapters = [p for p in group.adapters if not is_saved_copy(p)]
    return base, adapters


def summarize(group: Group, optimizer_ids: set[int] | None = None) -> GroupSummary:
    """A group's counts for the report: ``params = trainable + frozen`` over its base weights; adapters apart.

    >>> from peft import LoraConfig, get_peft_model
    >>> from gradguard.core.groups import build_groups
    >>> from gradguard.testing.models import tiny_minicpmv2
    >>> lora = LoraConfig(target_modules=r"llm\\..*\\.(q_proj|v_proj)", modules_to_save=["resampler"])
    >>> gmap = build_groups(get_peft_model(tiny_minicpmv2(), lora))
    >>> s = summarize(gmap.groups["resampler"])  # trained in full, through PEFT's copy
    >>> s.params == s.trainable and s.frozen == 0 and s.adapter_params == 0, s.state
    (True, 'trainable')
    >>> s = summarize(gmap.groups["llm"])  # frozen, with LoRA adapters
    >>> s.trainable, s.frozen == s.params, s.adapter_params == s.adapter_trainable > 0, s.state
    (0, True, True, 'adapters')
    """
    base, adapters = counted_params(group)
    n_base = sum(param_numel(p.param) for p in base)
    base_train = sum(param_numel(p.param) for p in base if p.param.requires_grad)
    n_adapt = sum(param_numel(p.param) for p in adapters)
    adapt_train = sum(param_numel(p.param) for p in adapters if p.param.requires_grad)
    state: Literal["trainable", "frozen", "partial", "adapters"]
    if base and base_train == n_base:
        state = "trainable"
    elif base_train:
        state = "partial"
    elif adapt_train:
        state = "adapters"
    else:
        state = "frozen"
    in_opt = None
    if optimizer_ids is not None:
        in_opt = sum(
            param_numel(p.param) for p in group.params if p.param.requires_grad and id(p.param) in optimizer_ids
        )
    return GroupSummary(
        name=group.name,
        role=group.role,
        params=n_base,
        trainable=base_train,
        frozen=n_base - base_train,
        adapter_params=n_adapt,
        adapter_trainable=adapt_train,
        tensors=len(base) + len(adapters),
        state=state,
        dtypes=sorted({str(p.param.dtype).removeprefix("torch.") for p in group.params}),
        in_optimizer=in_opt,
        alias=group.alias,
    )


def optimizer_param_ids(optimizer: Any) -> set[int]:
    groups = getattr(optimizer, "param_groups", None)
    if groups is None:
        raise ConfigurationError(
            f"optimizer must be a torch.optim.Optimizer (something with .param_groups), got {type(optimizer).__name__}"
        )
    ids = {id(p) for g in groups for p in g["params"]}
    # DeepSpeed's ZeRO and bf16 optimizers step flat fp32 partitions: their param_groups hold those, and the
    # model's own parameters are listed in bit16_groups (ZeRO-1/2), fp16_groups (ZeRO-3) or bf16_groups.
    # Accelerate wraps them (``.optimizer``), and they wrap the torch optimizer in turn.
    inner, depth = optimizer, 0
    while inner is not None and depth < 4:
        for attr in ("bit16_groups", "fp16_groups", "bf16_groups"):
            lists = getattr(inner, attr, None)
            if type(inner).__module__.startswith("deepspeed") and isinstance(lists, list):
                ids |= {id(p) for group in lists for p in group if isinstance(p, torch.Tensor)}
        inner, depth = getattr(inner, "optimizer", None), depth + 1
    return ids


def resolve_intent(
    gmap: GroupMap, expect_trainable: str | Iterable[str] | None, what: str = "expect_trainable entry"
) -> dict[str, list[Group]]:
    """Map each ``expect_trainable`` entry to the groups it selects, by the rule of :meth:`GroupMap.match`.

    An entry that matches nothing, or names different groups in different places, is a
    :class:`~gradguard.errors.ConfigurationError` listing the candidates.

    >>> from gradguard.core.groups import build_groups
    >>> from gradguard.testing.models import tiny_llava
    >>> intent = resolve_intent(build_groups(tiny_llava()), ["vision_tower", "connector"])
    >>> {sel: [g.name for g in hits] for sel, hits in intent.items()}
    {'vision_tower': ['model.vision_tower'], 'connector': ['model.multi_modal_projector']}
    """
    if expect_trainable is None:
        return {}
    if isinstance(expect_trainable, str):
        expect_trainable = [expect_trainable]
    if not isinstance(expect_trainable, Iterable):
        raise ConfigurationError(
            "expect_trainable must be a list of group names, roles or globs, e.g. ['vpm', 'resampler'] or "
            f"['vision', 'connector']; got {type(expect_trainable).__name__}"
        )
    resolved: dict[str, list[Group]] = {}
    for sel in expect_trainable:
        if not isinstance(sel, str) or not sel:
            raise ConfigurationError(f"expect_trainable entries must be non-empty strings, got {sel!r}")
        resolved[sel] = gmap.resolve(sel, what)
    return resolved


def _note_aliases(intent: Mapping[str, list[Group]]) -> None:
    """Remember the short name a user wrote for a group (``vision_tower`` for ``model.vision_tower``).

    Only a name that picked out one group is an alias: a role or a glob says what, not which.
    """
    for sel, hits in intent.items():
        if len(hits) == 1 and sel != hits[0].name and sel not in ROLES and not is_glob(sel):
            hits[0].alias = hits[0].alias or sel


def is_peft_model(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") or any(hasattr(m, "adapter_layer_names") for m in model.modules())


def audit_requires_grad(
    model: nn.Module,
    expect_trainable: str | Sequence[str] | None = None,
    optimizer: torch.optim.Optimizer | Any | None = None,
    groups: Mapping[str, str] | None = None,
) -> Audit:
    r"""Check what will train, per module group, before training starts.

    ``expect_trainable`` lists what must have trainable parameters: group names (``"vpm"``,
    ``"model.vision_tower"``), their short names (``"vision_tower"``, on transformers 4.x and 5.x layouts
    alike), roles (``"vision"``, ``"connector"``), module paths or globs, resolved by the one rule of
    :meth:`~gradguard.core.groups.GroupMap.match` (docs/groups.md); ``optimizer`` is checked for coverage
    of the trainable parameters; ``groups`` overrides group detection with ``{"pattern": "group[:role]"}``.

    >>> from gradguard.testing.models import tiny_minicpmv2
    >>> from peft import LoraConfig, get_peft_model
    >>> model = tiny_minicpmv2()
    >>> model.vpm.requires_grad_(True); model.resampler.requires_grad_(True)  # doctest: +ELLIPSIS
    Siglip...
    >>> lora = LoraConfig(target_modules=r"llm\..*\.(q_proj|v_proj)")  # LoRA on the language model only
    >>> model = get_peft_model(model, lora)
    >>> audit = audit_requires_grad(model, expect_trainable=["vpm", "resampler"])
    >>> audit.ok, [f.group for f in audit.findings if f.code == "GG001"]
    (False, ['vpm', 'resampler'])
    """
    if not isinstance(model, nn.Module):
        raise ConfigurationError(
            f"audit_requires_grad expects a torch.nn.Module, got {type(model).__name__}; pass the model "
            "(for a Trainer: trainer.model)"
        )
    gmap = build_groups(model, groups)
    intent = resolve_intent(gmap, expect_trainable)
    _note_aliases(intent)
    opt_ids = optimizer_param_ids(optimizer) if optimizer is not None else None
    summaries = {g.name: summarize(g, opt_ids) for g in gmap}
    findings = [
        *check_trainable_at_all(gmap),
        *check_intent(gmap, intent, summaries, is_peft_model(model)),
        *(check_optimizer(gmap, opt_ids) if opt_ids is not None else []),
        *check_tied_weights(model),
        *check_partial_freeze(gmap),
        *check_dtypes(gmap),
        *check_meta(gmap),
        *(check_learning_rates(gmap, optimizer) if optimizer is not None else []),
        *check_adapter_scaling(model, gmap),
    ]
    return Audit(groups=list(summaries.values()), findings=findings, group_map=gmap)


# -- rules (each a pure function returning findings) ------------------------------------------------------


def check_trainable_at_all(gmap: GroupMap) -> list[Finding]:
    if not gmap.by_param:
        return [
            Finding.of(
                "no_trainable_params",
                "the model has no parameters at all",
                "pass the model you train (for PEFT, the PeftModel returned by get_peft_model)",
            )
        ]
    if not any(info.param.requires_grad for info in gmap.by_param.values()):
        total = sum(param_numel(info.param) for info in gmap.by_param.values())
        return [
            Finding.of(
                "no_trainable_params",
                f"0 of {fmt_count(total)} params are trainable (requires_grad=False everywhere)",
                "unfreeze what you want to train (module.requires_grad_(True)), or check that LoraConfig"
                "'s target_modules match module names in this model",
            )
        ]
    return []


def _describe(s: GroupSummary) -> str:
    return (
        f"{s.name}: {fmt_count(s.trainable)} of {fmt_count(s.params)} base params trainable; "
        f"{fmt_count(s.adapter_trainable)} adapter params trainable"
    )


def check_intent(
    gmap: GroupMap, intent: dict[str, list[Group]], summaries: dict[str, GroupSummary], peft: bool
) -> list[Finding]:
    findings: list[Finding] = []
    expected: set[str] = set()
    for selector, hits in intent.items():
        for g in hits:
            if g.name in expected:
                continue
            expected.add(g.name)
            if g.trainable:
                continue
            if peft:
                leaf = g.name.rsplit(".", 1)[-1]
                hint = (
                    f"pass modules_to_save=['{leaf}'] to LoraConfig (or add its layers to target_modules), "
                    f"or call requires_grad_(True) on `{g.name}` after get_peft_model and before building "
                    "the optimizer"
                )
            else:
                hint = f"call model.{g.name}.requires_grad_(True) before building the optimizer"
            via = "" if selector == g.name else f" (selected by {selector!r})"
            findings.append(
                Finding.of(
                    "frozen_expected_trainable",
                    f"{_describe(summaries[g.name])}; expected trainable{via}",
                    hint,
                    g.name,
                    phase="static",
                )
            )
    if intent:
        for g in gmap:
            s = summaries[g.name]
            if g.name not in expected and s.trainable:
                findings.append(
                    Finding.of(
                        "trainable_expected_frozen",
                        f"{_describe(s)}; not in expect_trainable",
                        f"freeze it (model.{g.name}.requires_grad_(False)) or add {g.name!r} to expect_trainable",
                        g.name,
                        phase="static",
                    )
                )
    return findings


def check_optimizer(gmap: GroupMap, opt_ids: set[int]) -> list[Finding]:
    findings: list[Finding] = []
    for g in gmap:
        missing = [p for p in g.params if p.param.requires_grad and id(p.param) not in opt_ids]
        frozen_in = [p for p in g.params if not p.param.requires_grad and id(p.param) in opt_ids]
        if missing:
            n = sum(param_numel(p.param) for p in missing)
            findings.append(
                Finding.of(
                    "not_in_optimizer",
                    f"{g.name}: {fmt_count(n)} trainable params in {len(missing)} tensors are in no optimizer "
                    f"param group (e.g. {missing[0].name})",
                    "build the optimizer after the last requires_grad change (after get_peft_model and any "
                    "unfreezing), from [p for p in model.parameters() if p.requires_grad]",
                    g.name,
                    phase="static",
                )
            )
        if frozen_in:
            n = sum(param_numel(p.param) for p in frozen_in)
            findings.append(
                Finding.of(
                    "frozen_in_optimizer",
                    f"{g.name}: {fmt_count(n)} frozen params in {len(frozen_in)} tensors are in the optimizer "
                    f"(e.g. {frozen_in[0].name}); they will never be updated",
                    "build the optimizer from [p for p in model.parameters() if p.requires_grad], after freezing",
                    g.name,
                    phase="static",
                )
            )
    return findings


def _embedding_weights(model: nn.Module, getter: str) -> list[torch.Tensor]:
    fn = getattr(model, getter, None)
    if not callable(fn):
        return []
    try:
        module = fn()
    except (NotImplementedError, AttributeError, TypeError):
        return []
    if module is None:
        return []
    # A PEFT modules_to_save wrapper holds the frozen original and the trainable copy: the copy is
    # what trains, so report on all weights under the module.
    return [p for n, p in module.named_parameters() if n.endswith("weight")]


def check_tied_weights(model: nn.Module) -> list[Finding]:
    config = getattr(model, "config", None)
    text_config = getattr(config, "get_text_config", None)
    cfg = text_config() if callable(text_config) else config
    if not getattr(cfg, "tie_word_embeddings", False):
        return []
    inputs = _embedding_weights(model, "get_input_embeddings")
    outputs = _embedding_weights(model, "get_output_embeddings")
    if not inputs or not outputs:
        return []
    # A PEFT modules_to_save wrapper still holds the tied original; the copy next to it is what trains.
    untied = [o for o in outputs if not any(o is i for i in inputs)]
    if not untied:
        return []  # still one tensor: one requires_grad
    in_train = any(p.requires_grad for p in inputs)
    out_train = any(p.requires_grad for p in untied)
    if in_train == out_train:
        return []
    trains, frozen = ("output", "input") if out_train else ("input", "output")
    message = (
        f"the model ties input and output embeddings (tie_word_embeddings=True), but they are separate "
        f"tensors now and the {trains} embedding trains while the {frozen} embedding is frozen"
    )
    return [
        Finding.of(
            "tied_weight_mismatch",
            message,
            "train both sides (modules_to_save=['lm_head', 'embed_tokens']) or neither; or re-tie with "
            "model.tie_weights() before wrapping",
            phase="static",
        )
    ]


def check_partial_freeze(gmap: GroupMap) -> list[Finding]:
    findings = []
    for g in gmap:
        base = g.base
        if g.adapters or len(base) < 4:
            continue
        frozen = [p for p in base if not p.param.requires_grad]
        train = [p for p in base if p.param.requires_grad]
        if not frozen or not train:
            continue
        minority, word = (frozen, "frozen") if len(frozen) <= len(train) else (train, "trainable")
        if len(minority) / len(base) > 0.25:
            continue
        names = ", ".join(p.path for p in minority[:4]) + (" …" if len(minority) > 4 else "")
        findings.append(
            Finding.of(
                "partial_freeze",
                f"{g.name}: {len(minority)} of {len(base)} parameter tensors are {word} ({names})",
                "if that was not intended, set requires_grad by module rather than by name substring",
                g.name,
                phase="static",
            )
        )
    return findings


def check_dtypes(gmap: GroupMap) -> list[Finding]:
    findings = []
    for g in gmap:
        half = [p for p in g.params if p.param.requires_grad and p.param.dtype == torch.float16]
        if half:
            n = sum(param_numel(p.param) for p in half)
            findings.append(
                Finding.of(
                    "fp16_trainable",
                    f"{g.name}: {fmt_count(n)} trainable params are stored in float16",
                    "keep trainable weights in float32 and let fp16=True / autocast handle compute; or use bf16",
                    g.name,
                    phase="static",
                )
            )
    return findings


def check_meta(gmap: GroupMap) -> list[Finding]:
    meta = [p for p in gmap.by_param.values() if p.param.is_meta]
    if not meta:
        return []
    n = sum(param_numel(p.param) for p in meta)
    return [
        Finding.of(
            "meta_params",
            f"{fmt_count(n)} params in {len(meta)} tensors are on the meta device (no data yet); the audit "
            "checks structure only",
            "load or materialise the weights before training (from_pretrained, "
            "load_checkpoint_and_dispatch, or to_empty + init)",
            phase="static",
        )
    ]


def check_learning_rates(gmap: GroupMap, optimizer: Any) -> list[Finding]:
    """A learning rate of exactly 0 for a param group holding trainable tensors: they will never move."""
    findings = []
    for k, pg in enumerate(getattr(optimizer, "param_groups", None) or []):
        lr = pg.get("lr")
        # A scheduler's warm-up from 0 starts at lr 0 too: `initial_lr` (set by torch's schedulers) says where to.
        if not isinstance(lr, (int, float)) or lr != 0 or pg.get("initial_lr"):
            continue
        ids = {id(p) for p in pg.get("params", []) if getattr(p, "requires_grad", False)}
        groups = [g.name for g in gmap if any(id(p.param) in ids for p in g.params)]
        if groups:
            findings.append(
                Finding.of(
                    "no_update",
                    f"the optimizer's param group {k} has learning rate 0 and holds trainable tensors of "
                    f"{', '.join(groups)}: they will never move",
                    "set the learning rate (TrainingArguments(learning_rate=...)), or freeze what should not train",
                    groups[0] if len(groups) == 1 else None,
                    phase="static",
                )
            )
    return findings


def check_adapter_scaling(model: nn.Module, gmap: GroupMap) -> list[Finding]:
    """LoRA layers whose scaling (``lora_alpha / r``) is 0: the adapters add nothing, so they get no gradient and
    never move. Duck-typed on PEFT's ``scaling`` dict (gradguard never imports peft)."""
    zero: dict[str, set[str]] = {}
    for module in model.modules():
        scaling = getattr(module, "scaling", None)
        if not isinstance(scaling, dict) or not hasattr(module, "lora_A"):
            continue
        adapters = {name for name, value in scaling.items() if isinstance(value, (int, float)) and value == 0}
        if not adapters:
            continue
        first = next((p for p in module.parameters() if p.requires_grad), None)
        group = gmap.group_of(first) if first is not None else None
        zero.setdefault(group.name if group else "?", set()).update(adapters)
    return [
        Finding.of(
            "no_update",
            f"{name}: its LoRA adapter(s) {', '.join(sorted(adapters))} have scaling 0 (lora_alpha=0): they add "
            "nothing to the output, get no gradient and will never move",
            "set lora_alpha (commonly 2 x r, e.g. LoraConfig(r=8, lora_alpha=16))",
            None if name == "?" else name,
            phase="static",
        )
        for name, adapters in zero.items()
    ]
