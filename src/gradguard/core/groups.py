"""Module groups and roles: which part of the model every parameter belongs to, and the names users write.

A *group* is a module path the user recognises (``vpm``, ``resampler``, ``llm``,
``model.vision_tower``, ``model.multi_modal_projector``, ``lm_head``) and a *role* says what that part
does (``vision``, ``connector``, ``language``, ``head``, ``other``). Everything gradguard reports is
aggregated to this level.

Names are normalised first, so that the same model reads the same bare, LoRA-wrapped, compiled, DDP-
or FSDP-wrapped: PEFT's ``base_model.model.`` / ``.base_layer`` / ``.modules_to_save.default`` /
``.original_module``, torch.compile's ``_orig_mod.``, DDP's ``module.``, FSDP's and activation
checkpointing's wrapper segments are removed. Adapter parameters (LoRA A/B, ``modules_to_save``
copies, …) belong to their host module's group and are counted apart from the base parameters.

Roles come from names first and from the static module graph for the rest (see ``docs/groups.md``):

1. *Names* (the fast path for known families), top-down: the outermost module whose attribute name
   says vision tower, connector, language model or head becomes a group; a component of a *different*
   role nested inside (Qwen2-VL's ``visual.merger``, the ``lm_head`` inside MiniCPM-V's ``llm``) becomes
   a group of its own. A name that contradicts the structure is ignored: a ``head`` or ``transformer``
   inside a vision encoder is part of that encoder.
2. *Structure* for every part no name claimed: the subtree holding a convolution over image channels
   (the patch embedding: the module consuming the image) is vision; the subtree holding the token
   embedding is language; a module holding both is a container and is split into its children; a
   Linear of vocabulary width is the head; a part between a vision and a language sibling, or mapping
   into the language width next to them, is the connector.

Every entry point that takes a name the user writes (``expect_trainable``, ``groups=``,
``track_requires_grad``, the CLI's ``--expect``, ``smoke_test``) resolves it with one rule,
:meth:`GroupMap.match`: a group's name, a role, a glob, or a module path / dotted suffix of one on segment
boundaries with wrapper segments ignored.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Iterator, Mapping
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
# Class-name hints (for modules whose attribute name says nothing and whose structure neither).
_CLASS_HINTS: tuple[tuple[Role, re.Pattern[str]], ...] = (
    ("connector", re.compile(r"(Projector|Resampler|Merger|Connector|QFormer|Perceiver)", re.I)),
    ("vision", re.compile(r"(Vision|Visual|ViT|Siglip|CLIPVision|ImageEncoder)", re.I)),
)
# The weakest hint (any ``…Model`` class): only after structure had its say.
_CLASS_LANGUAGE = re.compile(r"(ForCausalLM|TextModel|DecoderModel|LMHeadModel|Model)$")
# A patch embedding that is not a convolution (a Linear over flattened patches) still names itself.
_PATCH_EMBED = re.compile(r"^patch_?embed(ding)?s?$")
# A convolution over this many input channels or fewer reads pixels (RGB, RGBA, grey): the image input.
_MAX_IMAGE_CHANNELS = 4

# A component of another role nested inside a group becomes a group of its own only in these cases
# (enclosing role, nested role): Qwen2-VL's `visual.merger`, the `lm_head` inside MiniCPM-V's `llm`.
_SPLITS = frozenset({("vision", "connector"), ("language", "head")})

_GLOB_CHARS = re.compile(r"[*?\[]")
# The segment transformers 5 puts VLM components under (`model.vision_tower`; top-level in 4.x).
_BASE_SEGMENT = "model"


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


def is_glob(name: str) -> bool:
    """Whether a name the user wrote is a glob (``*``, ``?`` or ``[...]``) rather than a name.

    >>> is_glob("model.vision_tower"), is_glob("vision_*")
    (False, True)
    """
    return bool(_GLOB_CHARS.search(name))


def _suffix_regex(pattern: str) -> re.Pattern[str]:
    """A glob that matches a path or any dotted suffix of it (on segment boundaries)."""
    return re.compile(r"(?:.*\.)?" + fnmatch.translate(pattern), re.S)


def _is_suffix(path: str, name: str) -> bool:
    """``name`` is ``path`` or its last segments (``vision_tower`` of ``model.vision_tower``)."""
    return path == name or path.endswith("." + name)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


@dataclass(frozen=True)
class ParamInfo:
    """One parameter as gradguard sees it (a view over ``model.named_parameters()``)."""

    name: str  # the model's own name (what named_parameters() yields)
    path: str  # normalised name, with adapter segments removed (the host module's param path)
    group: str
    adapter: bool
    param: nn.Parameter = field(repr=False, compare=False)


def is_saved_copy(info: ParamInfo) -> bool:
    """Whether the parameter belongs to a PEFT ``modules_to_save`` copy (``resampler.modules_to_save.default.…``):
    the module's trained weights, with the frozen original kept beside them."""
    return info.adapter and ".modules_to_save." in f".{info.name}"


@dataclass
class Group:
    """A part of the model the user recognises, with its role and the parameters it owns.

    ``alias`` is the short name the user wrote for it (``vision_tower`` for ``model.vision_tower``), when
    an ``expect_trainable`` entry selected it under another name; reports show both.
    """

    name: str
    role: Role
    params: list[ParamInfo] = field(default_factory=list, repr=False)
    alias: str | None = None

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
    ``roots`` maps each group name to the module(s) that hold it, for forward probes; ``modules`` maps
    every normalised module path to its module, for resolving the names users write.
    """

    groups: dict[str, Group]
    by_param: dict[int, ParamInfo]
    roots: dict[str, list[nn.Module]] = field(default_factory=dict, repr=False)
    shared: dict[str, list[str]] = field(default_factory=dict)  # first name -> other names of a shared param
    modules: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups.values())

    def __len__(self) -> int:
        return len(self.groups)

    def group_of(self, param: torch.Tensor) -> Group | None:
        info = self.by_param.get(id(param))
        return self.groups[info.group] if info else None

    def match(self, selector: str, what: str = "name") -> list[Group]:
        """The groups a name the user wrote selects: the one rule of every entry point.

        In order: a role (``"vision"``: every group of that role); a group's name; the same with wrapper
        segments removed (``base_model.model.model.vision_tower``); a glob over group names and their
        dotted suffixes (``"vision_*"``), else over module paths; a module path (a group, a container of
        groups, or a module inside one); a dotted suffix of a group's name on segment boundaries
        (``vision_tower`` for ``model.vision_tower``); a dotted suffix of a module path. A name that matches
        nothing and starts with ``model.`` (transformers 5's layout) is tried without it, so that
        ``model.vision_tower`` also names a top-level ``vision_tower`` (transformers 4.x's layout).

        A module that is a group selects that group only (``llm`` is the language model, not also
        ``llm.lm_head``); a container selects every group under it (``model`` in a transformers-5 VLM);
        a module inside a group selects its group. A name that names different groups in different places
        is a :class:`~gradguard.errors.ConfigurationError` listing them (``what`` says what the name was,
        for the message); a name that matches nothing returns ``[]`` (see :meth:`resolve`).

        >>> from torch import nn
        >>> vlm = nn.Module()
        >>> vlm.model = nn.ModuleDict({"vision_tower": nn.Conv2d(3, 4, 2), "language_model": nn.Embedding(9, 4)})
        >>> gmap = build_groups(vlm)
        >>> [g.name for g in gmap.match("vision_tower")], [g.name for g in gmap.match("model")]
        (['model.vision_tower'], ['model.vision_tower', 'model.language_model'])
        >>> [g.name for g in gmap.match("base_model.model.model.vision_tower")]
        ['model.vision_tower']
        """
        if selector in ROLES:
            return [g for g in self.groups.values() if g.role == selector]
        if selector in self.groups:
            return [self.groups[selector]]
        name = normalize_name(selector)
        hits = self._match_name(name, selector, what)
        # transformers 5 moved the components of VLMs under `model.`; a name written for it still names them
        # where they sit at the top level (transformers 4.x), as long as this model has no such path.
        while not hits and name.startswith(_BASE_SEGMENT + "."):
            name = name[len(_BASE_SEGMENT) + 1 :]
            hits = self._match_name(name, selector, what)
        return hits

    def _match_name(self, name: str, selector: str, what: str) -> list[Group]:
        if name in self.groups:
            return [self.groups[name]]
        if not name:
            return []
        if is_glob(name):
            rx = _suffix_regex(name)
            hits = [g for n, g in self.groups.items() if rx.match(n)]
            if hits:
                return hits
            found: dict[str, Group] = {}
            for path in self.modules:
                if path and rx.match(path):
                    found.update((g.name, g) for g in self._groups_under(path))
            return list(found.values())
        if name in self.modules or any(info.path == name for info in self.by_param.values()):
            return self._groups_under(name)
        by_name = [g for n, g in self.groups.items() if _is_suffix(n, name)]
        if len(by_name) == 1:
            return by_name
        if len(by_name) > 1:
            raise ConfigurationError(self._ambiguous(selector, what, [(g.name, [g]) for g in by_name]))
        places = [(p, self._groups_under(p)) for p in self.modules if p.endswith("." + name)]
        places = [(p, gs) for p, gs in places if gs]
        distinct = {tuple(g.name for g in gs) for _, gs in places}
        if len(distinct) > 1:
            raise ConfigurationError(self._ambiguous(selector, what, places))
        return places[0][1] if places else []

    def resolve(self, selector: str, what: str = "name") -> list[Group]:
        """:meth:`match`, with a :class:`~gradguard.errors.ConfigurationError` when nothing matches.

        The error lists the closest group names, short names and roles, and this model's groups.

        >>> from gradguard.testing.models import tiny_llava
        >>> gmap = build_groups(tiny_llava())
        >>> [g.name for g in gmap.resolve("multi_modal_projector")]
        ['model.multi_modal_projector']
        >>> try:
        ...     gmap.resolve("vision_towr", what="expect_trainable entry")
        ... except ValueError as exc:
        ...     print(str(exc)[:96])
        expect_trainable entry 'vision_towr' matches no module group. Did you mean 'vision_tower', ...
        """
        if not isinstance(selector, str) or not selector.strip():
            raise ConfigurationError(f"{what} must be a non-empty string, got {selector!r}")
        hits = self.match(selector, what)
        if hits:
            return hits
        if selector in ROLES:
            problem = f"is a role, but no group of this model has the role {selector!r}"
        else:
            problem = "matches no module group"
        close = difflib.get_close_matches(normalize_name(selector), self._short_names(), n=3)
        suggestion = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        groups = ", ".join(f"{g.name} ({g.role})" for g in self) or "(none)"
        raise ConfigurationError(
            f"{what} {selector!r} {problem}.{suggestion} Groups in this model: {groups}; roles: "
            f"{', '.join(ROLES)}. Use a group name or the last part of one ('vision_tower' for "
            "'model.vision_tower'), a role, a module path or a glob; or define groups with "
            "groups={'pattern*': 'name'}."
        )

    def _short_names(self) -> list[str]:
        """Every name that selects a group on its own: group names, their dotted suffixes, roles.

        >>> from torch import nn
        >>> gmap = build_groups(nn.ModuleDict({"model": nn.ModuleDict({"vision_tower": nn.Conv2d(3, 4, 2)})}))
        >>> gmap._short_names()
        ['model.vision_tower', 'vision_tower', 'vision', 'connector', 'language', 'head', 'other']
        """
        names: dict[str, None] = {}
        for n in self.groups:
            parts = n.split(".")
            for i in range(len(parts)):
                names.setdefault(".".join(parts[i:]))
        return [*names, *ROLES]

    def _groups_under(self, path: str) -> list[Group]:
        """The groups a module path selects: itself if it is a group, else the groups owning its params."""
        if path in self.groups:
            return [self.groups[path]]
        found: dict[str, Group] = {}
        for info in self.by_param.values():
            if _under(info.path, path):
                found.setdefault(info.group, self.groups[info.group])
        # A tied module (``lm_head`` sharing the embedding's weight) selects the group holding that tensor.
        for first, others in self.shared.items():
            if any(_under(_host_path(o), path) for o in others):
                owner = next((i for i in self.by_param.values() if i.name == first), None)
                if owner is not None:
                    found.setdefault(owner.group, self.groups[owner.group])
        return list(found.values())

    def _ambiguous(self, selector: str, what: str, places: list[tuple[str, list[Group]]]) -> str:
        by_groups: dict[tuple[str, ...], list[str]] = {}
        for path, gs in places:
            by_groups.setdefault(tuple(g.name for g in gs), []).append(path)
        lines = []
        for names, paths in by_groups.items():
            roles = ", ".join(f"{n} ({self.groups[n].role})" for n in names)
            more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
            lines.append(roles if paths == [names[0]] else f"{paths[0]}{more} in {roles}")
        shown = "; ".join(lines[:8]) + (f"; and {len(lines) - 8} more" if len(lines) > 8 else "")
        example = next(iter(by_groups.values()))[0]
        return (
            f"{what} {selector!r} is ambiguous: it names different groups of this model: {shown}. Write more "
            f"of the path to pick one (e.g. {example!r}), or a glob (e.g. '*{normalize_name(selector)}') or a "
            "role to select several."
        )


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


def _class_hint(module: nn.Module | None) -> Role | None:
    if module is None:
        return None
    cls = type(module).__name__
    for role, pattern in _CLASS_HINTS:
        if pattern.search(cls):
            return role
    return None


def _class_role(module: nn.Module | None) -> Role:
    """Role of a module from its class alone (the last resort). A bare Linear says nothing: ``other``."""
    if module is None:
        return "other"
    hint = _class_hint(module)
    if hint is not None:
        return hint
    if _CLASS_LANGUAGE.search(type(module).__name__) or isinstance(module, nn.Embedding):
        return "language"
    return "other"


def _prefixes(path: str) -> Iterator[str]:
    """``a.b.c`` -> ``a.b.c``, ``a.b``, ``a``, ``""`` (the root)."""
    while path:
        yield path
        path = path.rsplit(".", 1)[0] if "." in path else ""
    yield ""


@dataclass
class _Structure:
    """What the static module graph says, read from module types and sizes (never from parameter data).

    ``anchors`` maps a module path to the roles its subtree is anchored to: ``vision`` where a
    convolution over image channels (or a patch embedding) lives below, ``language`` where the token
    embedding does.
    """

    modules: dict[str, nn.Module]
    children: dict[str, list[str]]
    anchors: dict[str, set[Role]]
    token_path: str | None
    vocab: int | None  # the token embedding's num_embeddings: the logits' width
    width: int | None  # the token embedding's embedding_dim: what a connector maps into
    logits: list[str]  # Linear modules of vocabulary width: the logits producers
    linears: list[str]  # every Linear, in registration order

    @classmethod
    def scan(cls, model: nn.Module, raw_modules: Mapping[str, nn.Module]) -> _Structure:
        modules: dict[str, nn.Module] = {}
        children: dict[str, list[str]] = {}
        where: dict[int, str] = {}  # id(module) -> normalised path (first seen)
        images: list[str] = []
        embeddings: list[tuple[str, nn.Embedding]] = []
        linears: list[tuple[str, nn.Linear]] = []
        for raw, mod in raw_modules.items():
            if raw and any(_ADAPTER_SEGMENT.match(s) for s in raw.split(".")):
                continue
            if raw.count(".") < 4 and _wraps_the_model(raw):
                continue
            path = normalize_name(raw)
            if path not in modules:
                modules[path] = mod
                if path:
                    children.setdefault(path.rsplit(".", 1)[0] if "." in path else "", []).append(path)
            where.setdefault(id(mod), path)
            if isinstance(mod, (nn.Conv2d, nn.Conv3d)) and mod.in_channels <= _MAX_IMAGE_CHANNELS:
                images.append(path)
            elif isinstance(mod, nn.Embedding):
                embeddings.append((path, mod))
            elif isinstance(mod, nn.Linear):
                linears.append((path, mod))
            elif path and _PATCH_EMBED.match(path.rsplit(".", 1)[-1]):
                images.append(path)
        token = _token_embedding(model, embeddings, images, where)
        anchors: dict[str, set[Role]] = {}
        for path in images:
            for p in _prefixes(path):
                anchors.setdefault(p, set()).add("vision")
        token_path = vocab = width = None
        if token is not None:
            token_path, emb = token
            vocab, width = emb.num_embeddings, emb.embedding_dim
            for p in _prefixes(token_path):
                anchors.setdefault(p, set()).add("language")
        logits = [p for p, lin in linears if vocab is not None and lin.out_features == vocab]
        # The model's own word for its logits producer (a head wider than the vocabulary it embeds, as
        # Mllama's, whose embedding has 8 extra rows for image tokens).
        output = _getter(model, "get_output_embeddings")
        if output is not None and where.get(id(output)) and where[id(output)] not in logits:
            logits.append(where[id(output)])
        return cls(modules, children, anchors, token_path, vocab, width, logits, [p for p, _ in linears])

    def anchor(self, path: str) -> set[Role]:
        return self.anchors.get(path, set())

    def component_role(self, path: str) -> Role | None:
        """The single anchor role of the nearest anchored proper ancestor below the root, if any."""
        p = path
        while "." in p:
            p = p.rsplit(".", 1)[0]
            roles = self.anchors.get(p)
            if roles:
                return next(iter(roles)) if len(roles) == 1 else None
        return None

    def ends_in_logits(self, path: str) -> bool:
        """Whether the last Linear of a module (its output, for a feed-forward stack) produces the logits."""
        last = next((p for p in reversed(self.linears) if _under(p, path)), None)
        return last is not None and last in self.logits

    def has_params(self, path: str) -> bool:
        return any(True for _ in self.modules[path].parameters())

    def maps_into_language(self, path: str) -> bool:
        """Whether a module holds a Linear / convolution whose output is the language model's width."""
        if self.width is None:
            return False
        for m in self.modules[path].modules():
            out = getattr(m, "out_features", None) if isinstance(m, nn.Linear) else None
            if out is None and isinstance(m, (nn.Conv1d, nn.Conv2d)):
                out = m.out_channels
            if out == self.width:
                return True
        return False


def _wraps_the_model(raw: str) -> bool:
    """A wrapper around the whole model (PEFT's `base_model` and `base_model.model`, DDP's `module`)."""
    return normalize_name(raw + ".x") == "x" or normalize_name(raw + ".model.x") == "x"


def _getter(model: nn.Module, name: str) -> nn.Module | None:
    """A module from a transformers-style getter (``get_input_embeddings``), or None where there is none."""
    getter = getattr(model, name, None)
    if not callable(getter):
        return None
    try:
        found = getter()
    except Exception:  # a custom model's getter that does not apply: structure decides alone
        return None
    return found if isinstance(found, nn.Module) else None


def _token_embedding(
    model: nn.Module,
    embeddings: list[tuple[str, nn.Embedding]],
    images: list[str],
    where: Mapping[int, str],
) -> tuple[str, nn.Embedding] | None:
    """The embedding of the token ids: the model's own ``get_input_embeddings()`` when it has one,
    else the largest ``nn.Embedding`` that is not a vision position embedding (one next to a patch
    convolution)."""
    found = _getter(model, "get_input_embeddings")
    if found is not None:
        emb = found if isinstance(found, nn.Embedding) else None
        emb = emb or next((m for m in found.modules() if isinstance(m, nn.Embedding)), None)
        path = where.get(id(emb)) if emb is not None else None
        if emb is not None and path is not None:
            return path, emb
    image_parents = {p.rsplit(".", 1)[0] if "." in p else "" for p in images}
    best: tuple[str, nn.Embedding] | None = None
    for path, emb in embeddings:
        parent, _, leaf = path.rpartition(".")
        if parent in image_parents and _role_hint(leaf) is None:
            continue
        if best is None or emb.num_embeddings > best[1].num_embeddings:
            best = (path, emb)
    return best


def _name_candidates(struct: _Structure) -> dict[str, Role]:
    """Group roots from attribute names, outermost first, where the structure does not contradict them."""
    candidates: dict[str, Role] = {}
    for path in sorted(struct.modules, key=lambda p: p.count(".") if p else -1):
        if not path:
            continue
        role = _role_hint(path.rsplit(".", 1)[-1])
        if role is None:
            continue
        enclosing = _longest_prefix(path, candidates)
        if enclosing is not None and (candidates[enclosing], role) not in _SPLITS:
            continue  # e.g. SigLIP's inner `.vision_model` or pooling `.head`: part of the enclosing tower
        if role in ("language", "head") and _inside_vision(struct, path):
            continue  # a ViT's `transformer` or pooling `head`, in an encoder no name claimed
        candidates[path] = role
    return candidates


def _inside_vision(struct: _Structure, path: str) -> bool:
    """Whether a module sits in (or is) a vision component and holds no token embedding of its own."""
    own = struct.anchor(path)
    return own != {"language"} and "vision" in (struct.component_role(path), *own)


def _structural_units(struct: _Structure, candidates: Mapping[str, Role]) -> dict[str, Role]:
    """Group roots with roles from structure, for every part of the model no name claimed.

    Walks down from the root: a child that holds both a vision and a language part (by structure or by
    name) is a container and is split into its children; any other child with parameters is a unit.
    """
    present: dict[str, set[Role]] = {p: set(roles) for p, roles in struct.anchors.items()}
    for path, role in candidates.items():
        if role in ("vision", "language"):
            for p in _prefixes(path):
                present.setdefault(p, set()).add(role)
    units: dict[str, Role] = {}
    stack = [""]
    while stack:
        parent = stack.pop()
        kids = struct.children.get(parent, [])
        level = [candidates.get(k) or _anchor_role(present.get(k, set())) for k in kids]
        for i, kid in enumerate(kids):
            if kid in candidates:
                continue
            roles = present.get(kid, set())
            if {"vision", "language"} <= roles:
                stack.append(kid)
                continue
            if not struct.has_params(kid):
                continue
            units[kid] = _anchor_role(roles) or _unit_role(struct, kid, i, level)
    # Names win inside a unit too (a unit holds what no name claimed); a logits Linear inside a language
    # part is its head.
    merged = {**candidates, **units}
    for path in struct.logits:
        enclosing = _longest_prefix(path, merged)
        if enclosing is None or (enclosing != path and merged[enclosing] == "language"):
            merged[path] = "head"
    return merged


def _anchor_role(roles: set[Role]) -> Role | None:
    return "vision" if "vision" in roles else "language" if "language" in roles else None


def _unit_role(struct: _Structure, path: str, index: int, level: list[Role | None]) -> Role:
    """Role of a part with neither the image input nor the token embedding below it."""
    module = struct.modules[path]
    if path in struct.logits:
        return "head"  # it produces the logits (an unnamed top-level Linear is a head only then)
    multimodal = "vision" in level and "language" in level
    if multimodal:
        first, last = sorted((level.index("vision"), level.index("language")))
        if first < index < last:
            return "connector"  # between the vision and the language part, whatever it is called
    if struct.ends_in_logits(path):
        return "head"  # a head block (norm, dense, then the logits Linear)
    hint = _class_hint(module)
    if hint is not None:
        return hint
    if multimodal and struct.maps_into_language(path):
        return "connector"  # next to the vision and the language part, it maps into the language width
    return _class_role(module)


def build_groups(model: nn.Module, overrides: Mapping[str, str] | None = None) -> GroupMap:
    """Map every parameter of ``model`` to a group with a role.

    ``overrides`` maps a pattern to a group name, optionally with a role after a colon
    (``"vision_stack:vision"``); a target that is a role alone (``"vision"``) names the group and gives it
    that role. A pattern is a glob over parameter paths (``"vpm.*"``, ``"resampler*"``) or a module
    name; both match a path or any dotted suffix of it, with wrapper segments ignored, so
    ``"vision_tower.*"`` works on transformers 4.x and 5.x layouts alike. The first matching pattern wins
    and takes precedence over detection. A pattern that matches no parameter is a
    :class:`~gradguard.errors.ConfigurationError`.

    >>> from torch import nn
    >>> m = nn.ModuleDict({"vision_tower": nn.Linear(2, 2), "lm_head": nn.Linear(2, 2)})
    >>> [(g.name, g.role) for g in build_groups(m)]
    [('vision_tower', 'vision'), ('lm_head', 'head')]
    >>> [(g.name, g.role) for g in build_groups(m, {"vision_tower": "encoder:other"})]
    [('encoder', 'other'), ('lm_head', 'head')]
    """
    if not isinstance(model, nn.Module):
        raise ConfigurationError(
            f"expected a torch.nn.Module, got {type(model).__name__}: pass the model itself "
            "(for a Trainer, `trainer.model`)"
        )
    raw_modules = dict(model.named_modules(remove_duplicate=False))
    struct = _Structure.scan(model, raw_modules)
    candidates = _structural_units(struct, _name_candidates(struct))
    norm_modules = struct.modules

    compiled = _compile_overrides(overrides, struct)
    used = [False] * len(compiled)
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
        gname, role = _assign(path, candidates, norm_modules, compiled, used)
        info = ParamInfo(name=name, path=path, group=gname, adapter=adapter, param=param)
        by_param[id(param)] = info
        group = groups.get(gname)
        if group is None:
            group = groups[gname] = Group(gname, role)
            module = norm_modules.get(gname)
            if module is not None:
                roots[gname] = [module]
        group.params.append(info)
    unused = [c.pattern for c, hit in zip(compiled, used) if not hit]
    if unused:
        raise ConfigurationError(_unused_override_message(unused[0], struct, by_param.values()))
    return GroupMap(groups=groups, by_param=by_param, roots=roots, shared=shared, modules=norm_modules)


@dataclass(frozen=True)
class _Override:
    pattern: str  # as the user wrote it
    regex: re.Pattern[str]
    name: str
    role: Role | None


def _compile_overrides(overrides: Mapping[str, str] | None, struct: _Structure) -> list[_Override]:
    if overrides is None:
        return []
    if not isinstance(overrides, Mapping):
        raise ConfigurationError(
            "groups must be a dict of {pattern: group name}, e.g. {'vision_encoder.*': 'vision'}; "
            f"got {type(overrides).__name__}"
        )
    out = []
    for pattern, target in overrides.items():
        if not isinstance(pattern, str) or not pattern.strip() or not isinstance(target, str) or not target:
            raise ConfigurationError(
                f"groups entries must map a non-empty pattern to a group name, got {pattern!r}: {target!r}"
            )
        name, role = _parse_override(target)
        norm = normalize_name(pattern)
        regex, found = _override_regex(pattern, norm, struct)
        # As in GroupMap.match: a pattern written for transformers 5's `model.` also fits 4.x's top level.
        if not found and norm.startswith(_BASE_SEGMENT + "."):
            retry, found = _override_regex(pattern, norm[len(_BASE_SEGMENT) + 1 :], struct)
            regex = retry if found else regex
        out.append(_Override(pattern, regex, name, role))
    return out


def _override_regex(pattern: str, norm: str, struct: _Structure) -> tuple[re.Pattern[str], bool]:
    """The regex a ``groups=`` pattern matches parameter paths with, and whether it names any module.

    A glob matches a path or any dotted suffix of it; a name is the module it names by the rule of
    GroupMap.match (its exact path, else the one module whose path ends with it) and all below it, or
    else a parameter's exact path (``query_tokens``).
    """
    if is_glob(norm):
        regex = _suffix_regex(norm)
        return regex, any(regex.match(p) for p in struct.modules if p)
    path = norm if norm in struct.modules else None
    if path is None:
        hits = [p for p in struct.modules if p.endswith("." + norm)]
        if len(hits) > 1:
            shown = ", ".join(hits[:6]) + (f" and {len(hits) - 6} more" if len(hits) > 6 else "")
            raise ConfigurationError(
                f"groups= pattern {pattern!r} is ambiguous: it names {len(hits)} modules ({shown}). Write more "
                f"of the path (e.g. {hits[0]!r}), or a glob (e.g. '*{norm}.*') to take them all."
            )
        path = hits[0] if hits else None
    return re.compile(re.escape(path or norm) + r"(?:\..*)?", re.S), path is not None


def _unused_override_message(pattern: str, struct: _Structure, infos: Iterable[ParamInfo]) -> str:
    top = [p for p in struct.children.get("", [])]
    names = {p.rsplit(".", 1)[-1] for p in struct.modules if p} | {i.path for i in infos}
    close = difflib.get_close_matches(normalize_name(pattern).rstrip(".*"), sorted(names), n=3)
    suggestion = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return (
        f"groups= pattern {pattern!r} matches no parameter of this model.{suggestion} Patterns are module names "
        "or globs over parameter paths, matched against the path or its last segments with wrappers removed "
        f"(e.g. 'vision_tower' or 'vision_tower.*'). Top-level modules: {', '.join(top) or '(none)'}."
    )


def _parse_override(target: str) -> tuple[str, Role | None]:
    if ":" in target:
        name, role = target.rsplit(":", 1)
        if role not in ROLES:
            raise ConfigurationError(
                f"unknown role {role!r} in group override {target!r}; use one of {', '.join(ROLES)}"
            )
        return name, role
    if target in ROLES:
        return target, target  # {"vision_encoder.*": "vision"}: these are the vision part
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
    overrides: list[_Override],
    used: list[bool],
) -> tuple[str, Role]:
    module_path = path.rsplit(".", 1)[0] if "." in path else ""
    for i, o in enumerate(overrides):
        if o.regex.match(path) or (module_path and o.regex.match(module_path)):
            used[i] = True
            # Without an explicit role, the group keeps the role detection gives these parameters.
            return o.name, o.role or _assign(path, candidates, modules, [], [])[1]
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
