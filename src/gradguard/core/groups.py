"""Module groups and roles: which part of the model every parameter belongs to.

A *group* is a module path the user recognises (``vpm``, ``resampler``, ``llm``,
``model.vision_tower``, ``model.multi_modal_projector``, ``lm_head``) and a *role* says what that part
does (``vision``, ``connector``, ``language``, ``head``, ``other``). Everything gradguard reports is
aggregated to this level.

Names are normalised first, so that the same model reads the same bare, LoRA-wrapped, compiled, DDP-
or FSDP-wrapped: PEFT's ``base_model.model.`` / ``.base_layer`` / ``.modules_to_save.default`` /
``.original_module``, torch.compile's ``_orig_mod.``, DDP's ``module.``, FSDP's and activation
checkpointing's wrapper segments are removed. Adapter parameters (LoRA A/B, ``modules_to_save``
copies, …) belong to their host module's group and are counted apart from the base parameters.

Detection works on module names and class names, top-down: the outermost module that looks like a
vision tower, a connector, a language model or a head becomes a group; a component of a *different*
role nested inside (Qwen2-VL's ``visual.merger``, the ``lm_head`` inside MiniCPM-V's ``llm``) becomes a
group of its own; whatever is left falls back to the top-level child that holds it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from gradguard.errors import ConfigurationError

Role = Literal["vision", "connector", "language", "head", "other"]
ROLES: tuple[Role, ...] = ("vision", "connector", "language", "head", "other")

# Path segments added by wrappers; removed wherever they appear.
_WRAPPER_SEGMENTS = frozenset(
    {
        "_orig_mod",  # torch.compile
        "_fsdp_wrapped_module",  # FSDP1
        "_checkpoint_wrapped_module",  # torch.distributed activation checkpointing
        "base_layer",  # PEFT tuner layer -> the wrapped base module
        "original_module",  # PEFT modules_to_save: the frozen original
    }
)
# Leading segments added by wrappers around the whole model.
_WRAPPER_PREFIXES = (("base_model", "model"), ("module",))

# Child attributes of a PEFT tuner layer that hold adapter weights, when the module does not tell us
# itself through PEFT's ``adapter_layer_names`` (we duck-type so that gradguard never imports peft).
_ADAPTER_SEGMENT = re.compile(
    r"^(lora_[A-Za-z_]+|modules_to_save|ia3_[a-z]+|vera_[a-z_]+|oft_[a-z_]+|boft_[a-z_]+|hra_[a-z_]+|"
    r"hada_[a-z_0-9]+|lokr_[a-z_0-9]+|fourierft_[a-z_]+|trainable_tokens_[a-z_]+|prompt_encoder)$"
)

# Name-based role hints for a module's last path segment (lower-cased). Order matters: first match.
_NAME_HINTS: tuple[tuple[Role, re.Pattern[str]], ...] = (
    (
        "connector",
        re.compile(
            r"^(multi_modal_projector|mm_projector|projector|resampler|merger|connector|qformer|"
            r"query_tokens|language_projection|visual_projection|vision_proj|perceiver|"
            r"perceiver_resampler|mlp1|image_newline|adapter_proj|visual_adapter|modality_projection|"
            r"vision_projection|patch_merger|multi_modal_adapter|vision_adapter|img_projection)$"
        ),
    ),
    (
        "vision",
        re.compile(
            r"^(vision_tower|vision_model|visual|vpm|vision_encoder|image_encoder|vision|vit|"
            r"vision_backbone|image_tower|visual_encoder|vision_embed_tokens|siglip|clip)$"
        ),
    ),
    ("language", re.compile(r"^(language_model|llm|text_model|text_decoder|decoder_model|lm|transformer)$")),
    ("head", re.compile(r"^(lm_head|embed_out|output_layer|score|classifier|cls|qa_outputs|heads?)$")),
)
# Class-name hints (for modules whose attribute name says nothing, e.g. a fallback child).
_CLASS_HINTS: tuple[tuple[Role, re.Pattern[str]], ...] = (
    ("connector", re.compile(r"(Projector|Resampler|Merger|Connector|QFormer|Perceiver)", re.I)),
    ("vision", re.compile(r"(Vision|Visual|ViT|Siglip|CLIPVision|ImageEncoder)", re.I)),
    ("language", re.compile(r"(ForCausalLM|TextModel|DecoderModel|LMHeadModel|Model)$")),
)


# A component of another role nested inside a group becomes a group of its own only in these cases
# (enclosing role, nested role): Qwen2-VL's `visual.merger`, the `lm_head` inside MiniCPM-V's `llm`.
_SPLITS = frozenset({("vision", "connector"), ("language", "head")})


def param_numel(param: torch.Tensor) -> int:
    """Number of elements of the full parameter, also when it is sharded.

    DeepSpeed ZeRO-3 empties ``param.data`` on every rank and keeps the full size in ``param.ds_numel``;
    an FSDP2 / tensor-parallel DTensor already reports its full (global) size.

    >>> param_numel(torch.zeros(2, 3))
    6
    """
    ds_numel = getattr(param, "ds_numel", None)
    return int(ds_numel) if isinstance(ds_numel, int) else param.numel()


def normalize_name(name: str) -> str:
    """Strip wrapper segments from a parameter or module path.

    >>> normalize_name("base_model.model.llm.model.layers.0.self_attn.q_proj.base_layer.weight")
    'llm.model.layers.0.self_attn.q_proj.weight'
    >>> normalize_name("module._orig_mod.lm_head.weight")
    'lm_head.weight'
    """
    parts = [p for p in name.split(".") if p and p not in _WRAPPER_SEGMENTS]
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if tuple(parts[: len(prefix)]) == prefix and len(parts) > len(prefix):
                parts = parts[len(prefix) :]
                changed = True
    return ".".join(parts)


@dataclass(frozen=True)
class ParamInfo:
    """One parameter as gradguard sees it (a view over ``model.named_parameters()``)."""

    name: str  # the model's own name (what named_parameters() yields)
    path: str  # normalised name, with adapter segments removed (the host module's param path)
    group: str
    adapter: bool
    param: nn.Parameter = field(repr=False, compare=False)


@dataclass
class Group:
    """A part of the model the user recognises, with its role and the parameters it owns."""

    name: str
    role: Role
    params: list[ParamInfo] = field(default_factory=list, repr=False)

    @property
    def base(self) -> list[ParamInfo]:
        return [p for p in self.params if not p.adapter]

    @property
    def adapters(self) -> list[ParamInfo]:
        return [p for p in self.params if p.adapter]

    @property
    def trainable(self) -> bool:
        """True when any parameter of the group (base or adapter) requires grad."""
        return any(p.param.requires_grad for p in self.params)


@dataclass
class GroupMap:
    """Every parameter of a model mapped to exactly one :class:`Group`.

    ``groups`` keeps the model's own order (first parameter seen first); ``by_param`` maps a
    parameter's ``id`` to its :class:`ParamInfo` (shared parameters appear once, under the first name).
    ``roots`` maps each group name to the module(s) that hold it, for forward probes.
    """

    groups: dict[str, Group]
    by_param: dict[int, ParamInfo]
    roots: dict[str, list[nn.Module]] = field(default_factory=dict, repr=False)
    shared: dict[str, list[str]] = field(default_factory=dict)  # first name -> other names of a shared param

    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups.values())

    def __len__(self) -> int:
        return len(self.groups)

    def group_of(self, param: torch.Tensor) -> Group | None:
        info = self.by_param.get(id(param))
        return self.groups[info.group] if info else None

    def match(self, selector: str) -> list[Group]:
        """Groups selected by a group name, a role, or a glob over group names."""
        if selector in ROLES:
            return [g for g in self.groups.values() if g.role == selector]
        if selector in self.groups:
            return [self.groups[selector]]
        hits = [g for n, g in self.groups.items() if fnmatch.fnmatchcase(n, selector)]
        if hits:
            return hits
        # A name that is a parent or child path of a group ("llm" for "llm.model", or "vpm.encoder").
        return [g for n, g in self.groups.items() if n.startswith(selector + ".") or selector.startswith(n + ".")]


def _is_adapter_param(modules: Mapping[str, nn.Module], name: str) -> bool:
    """Whether a (raw) parameter name lives under an adapter child of a PEFT tuner layer."""
    parts = name.split(".")
    for i, seg in enumerate(parts[:-1]):
        if _ADAPTER_SEGMENT.match(seg):
            owner = modules.get(".".join(parts[:i]))
            names = getattr(owner, "adapter_layer_names", None)
            if names is None or seg in names or seg == "modules_to_save":
                return True
    return False


def _host_path(name: str) -> str:
    """Normalised param path without the adapter's name.

    ``q_proj.lora_A.default.weight`` -> ``q_proj.lora_A.weight`` (the host module stays a prefix);
    ``resampler.modules_to_save.default.proj`` -> ``resampler.proj`` (the copy reads as its original).
    """
    parts = name.split(".")
    for i, seg in enumerate(parts[:-1]):
        if _ADAPTER_SEGMENT.match(seg):
            parts = parts[:i] + parts[i + 2 :] if seg == "modules_to_save" else parts[: i + 1] + parts[i + 2 :]
            break
    return normalize_name(".".join(parts))


def _role_hint(segment: str) -> Role | None:
    seg = segment.lower()
    for role, pattern in _NAME_HINTS:
        if pattern.match(seg):
            return role
    return None


def _class_role(module: nn.Module | None) -> Role:
    if module is None:
        return "other"
    cls = type(module).__name__
    for role, pattern in _CLASS_HINTS:
        if pattern.search(cls):
            return role
    if isinstance(module, nn.Embedding):
        return "language"
    if isinstance(module, nn.Linear):
        return "head"
    return "other"


def build_groups(model: nn.Module, overrides: Mapping[str, str] | None = None) -> GroupMap:
    """Map every parameter of ``model`` to a group with a role.

    ``overrides`` maps a glob over normalised parameter paths (``"vpm.*"``, ``"resampler*"``) to a
    group name, optionally with a role after a colon (``"vision_stack:vision"``); the first matching
    pattern wins and takes precedence over detection.

    >>> from torch import nn
    >>> m = nn.ModuleDict({"vision_tower": nn.Linear(2, 2), "lm_head": nn.Linear(2, 2)})
    >>> [(g.name, g.role) for g in build_groups(m)]
    [('vision_tower', 'vision'), ('lm_head', 'head')]
    """
    if not isinstance(model, nn.Module):
        raise ConfigurationError(
            f"expected a torch.nn.Module, got {type(model).__name__}: pass the model itself "
            "(for a Trainer, `trainer.model`)"
        )
    raw_modules = dict(model.named_modules(remove_duplicate=False))
    # Normalised module paths; several raw modules can share one (a wrapper and its wrapped module).
    norm_modules: dict[str, nn.Module] = {}
    for raw, mod in raw_modules.items():
        if any(_ADAPTER_SEGMENT.match(s) for s in raw.split(".")):
            continue
        norm_modules.setdefault(normalize_name(raw), mod)

    # 1. Candidate group roots from names, outermost first (sorted by depth).
    candidates: dict[str, Role] = {}
    for path in sorted(norm_modules, key=lambda p: p.count(".") if p else -1):
        if not path:
            continue
        role = _role_hint(path.rsplit(".", 1)[-1])
        if role is None:
            continue
        enclosing = _longest_prefix(path, candidates)
        if enclosing is not None and (candidates[enclosing], role) not in _SPLITS:
            continue  # e.g. SigLIP's inner `.vision_model` or pooling `.head`: part of the enclosing tower
        candidates[path] = role

    # 2. Assign parameters: override > longest candidate prefix > top-level fallback.
    compiled = [(pat, *_parse_override(target)) for pat, target in (overrides or {}).items()]
    groups: dict[str, Group] = {}
    by_param: dict[int, ParamInfo] = {}
    shared: dict[str, list[str]] = {}
    roots: dict[str, list[nn.Module]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = by_param.get(id(param))
        if first is not None:
            shared.setdefault(first.name, []).append(name)
            continue
        adapter = _is_adapter_param(raw_modules, name)
        path = _host_path(name)
        gname, role = _assign(path, candidates, norm_modules, compiled)
        info = ParamInfo(name=name, path=path, group=gname, adapter=adapter, param=param)
        by_param[id(param)] = info
        group = groups.get(gname)
        if group is None:
            group = groups[gname] = Group(gname, role)
            module = norm_modules.get(gname)
            if module is not None:
                roots[gname] = [module]
        group.params.append(info)
    return GroupMap(groups=groups, by_param=by_param, roots=roots, shared=shared)


def _parse_override(target: str) -> tuple[str, Role | None]:
    if ":" in target:
        name, role = target.rsplit(":", 1)
        if role not in ROLES:
            raise ConfigurationError(
                f"unknown role {role!r} in group override {target!r}; use one of {', '.join(ROLES)}"
            )
        return name, role
    return target, None


def _longest_prefix(path: str, candidates: Mapping[str, Role]) -> str | None:
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in candidates:
            return prefix
    return None


def _assign(
    path: str,
    candidates: Mapping[str, Role],
    modules: Mapping[str, nn.Module],
    overrides: list[tuple[str, str, Role | None]],
) -> tuple[str, Role]:
    for pattern, gname, role in overrides:
        if fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path.rsplit(".", 1)[0], pattern):
            # Without an explicit role, the group keeps the role detection gives these parameters.
            return gname, role or _assign(path, candidates, modules, [])[1]
    module_path = path.rsplit(".", 1)[0] if "." in path else ""
    hit = _longest_prefix(module_path, candidates) if module_path else None
    if hit is not None:
        return hit, candidates[hit]
    # A parameter that names its own role (BLIP-2's `query_tokens`, LLaVA-NeXT's `image_newline`).
    leaf_role = _role_hint(path.rsplit(".", 1)[-1])
    if leaf_role is not None:
        return path, leaf_role
    # Fallback: the top-level child holding the parameter, or the parameter itself if held by the root.
    top = path.split(".", 1)[0] if "." in path else path
    return top, _class_role(modules.get(top)) if top in modules else "other"
