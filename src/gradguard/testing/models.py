"""Tiny random-weight transformers models for tests, demos and benchmarks.

Every factory here builds a *real* ``transformers`` model class (or, for MiniCPM-V
2.x, a faithful re-implementation of its module layout) from a tiny config with
random weights.  Nothing is ever downloaded: no hub access, no tokenizer, no
processor.  The default models have ~100k-210k parameters (``tiny_llama`` /
``tiny_qwen2`` take config overrides for bigger benchmark models), build in a few
tens of milliseconds and run a forward+backward on CPU in well under 0.1 s, so
gradguard's tests, demo and benchmarks can exercise the module layouts of many
vision-language families without network or GPU.

Public API
----------
* ``tiny_llama()``, ``tiny_qwen2()`` ... ``tiny_minicpmv2()``: model factories,
  each taking ``seed=0`` (the weights are drawn under ``torch.manual_seed(seed)``).
* :func:`make_batch`: a ready-to-use input batch *with labels* for any of these
  models (prompt and image-placeholder positions are ``-100``).
* :class:`TinyDataset`: single-sample dicts for a HF ``Trainer`` with its
  default data collator.
* :data:`FAMILIES`: one :class:`Family` record per family the installed transformers
  can build, with its factory, the role of each component (``vision`` / ``connector``
  / ``language`` / ``head`` / ``other``) at the module paths of the installed layout,
  LoRA target names and whether the ``Trainer`` needs ``remove_unused_columns=False``.
* :data:`SKIPPED` (family -> why not, e.g. ``"transformers 4.46.3 has no Gemma3Config"``)
  and :func:`available`: what this transformers cannot build, and what it can.
* :func:`group_of`: longest-prefix lookup of a parameter name in a ``roles`` map.

Works on every transformers release gradguard supports (4.46.3 to 5.x): classes are
imported per family, config differences (``PreTrainedConfig`` / ``PretrainedConfig``,
``rope_parameters`` / ``rope_scaling``, flat or nested text configs) are handled by
feature, and :attr:`Family.roles` follows the module layout actually built (before
4.52, LLaVA-style models keep their components at the top level).  See
``docs/versions.md``.

Token-id conventions (all families share ``vocab_size=256``): ``0`` pad, ``1``
BOS, ``2`` EOS; the ids from :data:`IMAGE_TOKEN_ID` (255) downwards are
reserved for image / vision special tokens; ordinary text tokens are drawn from
``[TEXT_TOKEN_LOW, TEXT_TOKEN_HIGH)``.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, cast

import torch
import transformers
from torch import nn

# Only what every transformers release in the supported range (4.46 ... 5.x) exports is imported here; each
# factory imports its own family's classes, so a family that a release lacks (Gemma 3 and InternVL before 4.50,
# MiniCPM-V 4.6 before 5.x ...) is skipped with a reason (:data:`SKIPPED`) instead of breaking this import.
from transformers import (
    GenerationMixin,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

try:  # transformers 5 spells it PreTrainedConfig; 4.x only has PretrainedConfig (5.x keeps that as an alias)
    from transformers import PreTrainedConfig
except ImportError:  # pragma: no cover - transformers 4.x
    from transformers import PretrainedConfig as PreTrainedConfig

if TYPE_CHECKING:
    from transformers import (
        Blip2ForConditionalGeneration,
        Gemma3ForConditionalGeneration,
        Idefics2ForConditionalGeneration,
        Idefics3ForConditionalGeneration,
        InternVLForConditionalGeneration,
        LlavaForConditionalGeneration,
        MllamaForConditionalGeneration,
        PaliGemmaForConditionalGeneration,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLForConditionalGeneration,
        SmolVLMForConditionalGeneration,
    )
    from transformers.models.minicpmv4_6 import MiniCPMV4_6ForConditionalGeneration

__all__ = [
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "FAMILIES",
    "IMAGE_TOKEN_ID",
    "PAD_TOKEN_ID",
    "ROLES",
    "SKIPPED",
    "TEXT_TOKEN_HIGH",
    "TEXT_TOKEN_LOW",
    "VOCAB_SIZE",
    "Family",
    "MiniCPMV2",
    "MiniCPMV2Config",
    "Resampler",
    "TinyDataset",
    "available",
    "family_of",
    "group_of",
    "make_batch",
    "tiny_blip2",
    "tiny_gemma3",
    "tiny_idefics2",
    "tiny_idefics3",
    "tiny_internvl",
    "tiny_llama",
    "tiny_llava",
    "tiny_minicpmv2",
    "tiny_minicpmv4_6",
    "tiny_mllama",
    "tiny_paligemma",
    "tiny_qwen2",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
    "tiny_smolvlm",
]

# --------------------------------------------------------------------------------------
# Shared tiny sizes and token ids
# --------------------------------------------------------------------------------------

VOCAB_SIZE = 256
PAD_TOKEN_ID = 0
BOS_TOKEN_ID = 1
EOS_TOKEN_ID = 2
IMAGE_TOKEN_ID = 255
"""Image placeholder id used by every multimodal family built here."""
VIDEO_TOKEN_ID = 254
VISION_START_TOKEN_ID = 253
VISION_END_TOKEN_ID = 252
BOI_TOKEN_ID = 251
EOI_TOKEN_ID = 250
TEXT_TOKEN_LOW = 3
TEXT_TOKEN_HIGH = 240

ROLES = ("vision", "connector", "language", "head", "other")
"""The allowed role names in :attr:`Family.roles`."""

_IMAGE_SIZE = 32
_PATCH_SIZE = 8

_TEXT: dict[str, Any] = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "pad_token_id": PAD_TOKEN_ID,
    "bos_token_id": BOS_TOKEN_ID,
    "eos_token_id": EOS_TOKEN_ID,
}
"""Common tiny decoder sizes (Llama/Qwen2-style field names)."""

_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": _IMAGE_SIZE,
    "patch_size": _PATCH_SIZE,
}
"""Common tiny ViT sizes (SigLIP/CLIP-style field names): 32x32 image, 8x8 patches."""


def _text(**overrides: Any) -> dict[str, Any]:
    return {**_TEXT, **overrides}


def _vision(**overrides: Any) -> dict[str, Any]:
    return {**_VISION, **overrides}


# transformers 5 spells RoPE settings `rope_parameters` (theta inside); 4.x spells them `rope_scaling` + `rope_theta`.
_ROPE_PARAMETERS = hasattr(PreTrainedConfig, "convert_rope_params_to_dict")


def _rope(**params: Any) -> dict[str, Any]:
    """Default RoPE (plus ``params``, e.g. Qwen2-VL's ``mrope_section``) as config kwargs of the installed version."""
    params = {"rope_type": "default", "rope_theta": 10000.0, **params}
    if _ROPE_PARAMETERS:
        return {"rope_parameters": params}
    theta = params.pop("rope_theta")
    return {"rope_scaling": params, "rope_theta": theta}


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------
# Family record and role lookup
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Family:
    """Static description of one model family built by this module.

    Attributes:
        name: Short family key (also the key in :data:`FAMILIES`).
        build: Factory ``build(seed=0, **kw) -> PreTrainedModel``.
        class_name: The class ``build`` returns (``LlavaForConditionalGeneration`` ...).
        layout: Module/parameter path prefix -> role, in the transformers 5.x layout
            (VLM components under ``model.``, ``lm_head`` at the top).  Use :attr:`roles`,
            which is this layout or its 4.x form, whichever the installed transformers builds.
        legacy_paths: ``layout`` path -> the same component's path in the older layout
            (transformers < 4.52 put LLaVA's ``vision_tower``, ``multi_modal_projector`` and
            ``language_model`` at the top level, with ``lm_head`` inside ``language_model``).
            Empty when the family's layout never changed.
        lora_targets: Target module names for LoRA on the language model.  These are
            plain names, so in families whose vision tower uses the same
            projection names (SigLIP/CLIP/Idefics/InternViT/Mllama ``q_proj`` /
            ``v_proj``) PEFT adapts those too, as it would on the real checkpoints;
            use :attr:`language_lora_regex` for language-model-only LoRA.
        needs_remove_unused_columns: ``True`` when a HF ``Trainer`` on
            :class:`TinyDataset` needs ``TrainingArguments(remove_unused_columns=False)``
            (no family built here needs it: every forward names its inputs).
        no_grad: Parameter-name prefixes (in ``layout``'s spelling) that, by the family's
            design, get no gradient from the LM loss (e.g. LLaVA's vision ``post_layernorm``:
            image features are read from ``hidden_states`` before it).  Use :attr:`no_grad_params`.
        requires: What the installed transformers must have to build the family: top-level
            names (``"Gemma3ForConditionalGeneration"``) or modules (``"transformers.models.x"``).
    """

    name: str
    build: Callable[..., PreTrainedModel]
    class_name: str
    layout: Mapping[str, str]
    lora_targets: list[str]
    legacy_paths: Mapping[str, str] = field(default_factory=dict)
    needs_remove_unused_columns: bool = False
    no_grad: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "layout", MappingProxyType(dict(self.layout)))
        object.__setattr__(self, "legacy_paths", MappingProxyType(dict(self.legacy_paths)))
        object.__setattr__(self, "lora_targets", list(self.lora_targets))
        if set(self.legacy_paths) - set(self.layout):  # pragma: no cover - static data
            raise AssertionError(f"{self.name}: legacy_paths names paths outside layout")

    @property
    def missing(self) -> str | None:
        """Why the installed transformers cannot build this family, or ``None`` when it can."""
        lacking = [req for req in self.requires if not _has(req)]
        if not lacking:
            return None
        return f"transformers {transformers.__version__} has no {', '.join(lacking)}"

    @property
    def roles(self) -> Mapping[str, str]:
        """Path prefix (in the *bare*, un-wrapped model) -> role, for the layout the installed transformers builds.

        Paths may be nested (e.g. ``model.visual`` and ``model.visual.merger``); a parameter belongs
        to the group with the **longest matching prefix** (see :func:`group_of`).  Every parameter
        of the model falls under exactly one group.  Decided once per process from the parameter
        names of a model actually built (on the meta device, so it costs no memory and leaves the
        global RNG alone): the 5.x ``layout`` where it fits, else its ``legacy_paths`` form.
        """
        return _resolved(self)[0]

    @property
    def no_grad_params(self) -> tuple[str, ...]:
        """:attr:`no_grad` in the installed layout's spelling."""
        return _resolved(self)[1]

    def paths(self, role: str) -> list[str]:
        """The :attr:`roles` paths that have role ``role``."""
        return [path for path, r in self.roles.items() if r == role]

    @property
    def language_lora_regex(self) -> str:
        """A PEFT ``target_modules`` regex hitting :attr:`lora_targets` *only* inside the language model.

        ``LoraConfig(target_modules=family.language_lora_regex)`` leaves the vision
        tower alone even where it reuses the names (PEFT full-matches the regex
        against module names of the bare model).
        """
        prefixes = "|".join(re.escape(p) for p in self.paths("language"))
        names = "|".join(re.escape(n) for n in self.lora_targets)
        return rf"(?:{prefixes})\..*\.(?:{names})"


def _has(requirement: str) -> bool:
    """Whether the installed transformers has ``requirement`` (a top-level name or a module path)."""
    if "." in requirement:
        try:
            importlib.import_module(requirement)
        except ImportError:
            return False
        return True
    # `dir()` of transformers' lazy module lists every exported name without importing its module.
    return requirement in dir(transformers)


_RESOLVED: dict[str, tuple[Mapping[str, str], tuple[str, ...]]] = {}


def _rename(path: str, renames: Mapping[str, str]) -> str:
    """``path`` with its longest ``renames`` prefix replaced."""
    best = group_of(path, renames)
    return path if best is None else renames[best] + path[len(best) :]


def _locate(path: str, roles: Mapping[str, str], names: list[str]) -> list[str]:
    """The module paths that ``path`` (a component path + a tail) names in a model with parameters ``names``.

    Wrapper segments between the component and the tail may differ between releases (4.x's CLIP tower
    has ``vision_tower.vision_model.post_layernorm``, 5.x's ``vision_tower.post_layernorm``).
    """
    if any(n.startswith(path + ".") for n in names):
        return [path]
    component = group_of(path, roles)
    if component is None or component == path:
        return []
    tail = "." + path[len(component) + 1 :] + "."
    found = {n[: n.index(tail, len(component)) + len(tail) - 1] for n in names if tail in n[len(component) :]}
    return sorted(found)


def _resolved(family: Family) -> tuple[Mapping[str, str], tuple[str, ...]]:
    """(roles, no_grad_params) of ``family`` in the layout the installed transformers builds."""
    if family.name in _RESOLVED:
        return _RESOLVED[family.name]
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        names = [n for n, _ in family.build().named_parameters(remove_duplicate=False)]

    def fits(paths: Mapping[str, str]) -> bool:
        return all(any(n == p or n.startswith(p + ".") for n in names) for p in paths) and all(
            group_of(n, paths) is not None for n in names
        )

    layouts = [{}, family.legacy_paths] if family.legacy_paths else [{}]
    for renames in layouts:  # the 5.x layout first, then the older one
        roles = {_rename(p, renames): r for p, r in family.layout.items()}
        if fits(roles):
            no_grad = tuple(q for p in family.no_grad for q in _locate(_rename(p, renames), roles, names))
            _RESOLVED[family.name] = (MappingProxyType(roles), no_grad)
            return _RESOLVED[family.name]
    tops = sorted({n.split(".")[0] for n in names})
    raise AssertionError(  # a new transformers moved the family's modules: teach `legacy_paths` the new layout
        f"{family.name}: no known layout fits transformers {transformers.__version__}'s "
        f"{family.class_name} (top-level children {tops})"
    )


def group_of(param_name: str, roles: Mapping[str, str]) -> str | None:
    """Return the ``roles`` key that owns ``param_name`` (longest dotted prefix), or ``None``.

    A path ``p`` matches ``param_name`` when ``param_name == p`` or
    ``param_name.startswith(p + ".")``.  PEFT-wrapped names are *not* normalised
    here; strip ``base_model.model.`` first if needed.
    """
    best: str | None = None
    for path in roles:
        if (param_name == path or param_name.startswith(path + ".")) and (best is None or len(path) > len(best)):
            best = path
    return best


# --------------------------------------------------------------------------------------
# Text-only factories
# --------------------------------------------------------------------------------------


def tiny_llama(seed: int = 0, **config_overrides: Any) -> LlamaForCausalLM:
    """Tiny ``LlamaForCausalLM`` (vocab 256, hidden 64, 2 layers, 4 heads / 2 kv heads).

    ``config_overrides`` go straight to :class:`~transformers.LlamaConfig`
    (e.g. ``hidden_size=128, num_hidden_layers=4`` for benchmarks).
    """
    _seeded(seed)
    return LlamaForCausalLM(LlamaConfig(**_text(**config_overrides)))


def tiny_qwen2(seed: int = 0, **config_overrides: Any) -> Qwen2ForCausalLM:
    """Tiny ``Qwen2ForCausalLM`` (same sizes as :func:`tiny_llama`); overrides go to ``Qwen2Config``."""
    _seeded(seed)
    return Qwen2ForCausalLM(Qwen2Config(**_text(**config_overrides)))


# --------------------------------------------------------------------------------------
# Vision-language factories (transformers' own classes)
# --------------------------------------------------------------------------------------


def tiny_llava(seed: int = 0, vision: str = "clip") -> LlavaForConditionalGeneration:
    """Tiny ``LlavaForConditionalGeneration``: CLIP (or ``vision="siglip"``) tower + Llama.

    32x32 images, 8x8 patches -> 16 image tokens per image (CLS dropped for CLIP).
    """
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    _seeded(seed)
    if vision == "clip":
        vision_config: PreTrainedConfig = CLIPVisionConfig(**_vision(projection_dim=32))
    elif vision == "siglip":
        vision_config = SiglipVisionConfig(**_vision(vision_use_head=False))
    else:
        raise ValueError(f"vision must be 'clip' or 'siglip', got {vision!r}")
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=LlamaConfig(**_text()),
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=(_IMAGE_SIZE // _PATCH_SIZE) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default" if vision == "clip" else "full",
    )
    return LlavaForConditionalGeneration(config)


def tiny_minicpmv4_6(seed: int = 0) -> MiniCPMV4_6ForConditionalGeneration:
    """Tiny ``MiniCPMV4_6ForConditionalGeneration`` (NaViT SigLIP + window merger + Qwen3.5 text).

    Images are 8x8 patches of 4x4 pixels; the ViT window merger (after layer 0)
    and the 2x2 merger downsample 16x -> 4 image tokens per image.
    """
    from transformers.models.minicpmv4_6 import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    _seeded(seed)
    config = MiniCPMV4_6Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 4,
        },
        text_config={
            "model_type": "qwen3_5_text",
            **_text(),
            "head_dim": 16,
            "linear_key_head_dim": 16,
            "linear_value_head_dim": 16,
            "linear_num_key_heads": 2,
            "linear_num_value_heads": 4,
            "layer_types": ["linear_attention", "full_attention"],
        },
        insert_layer_id=0,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
    )
    return MiniCPMV4_6ForConditionalGeneration(config)


def tiny_idefics2(seed: int = 0) -> Idefics2ForConditionalGeneration:
    """Tiny ``Idefics2ForConditionalGeneration`` (SigLIP-like ViT + perceiver resampler + Mistral).

    One 32x32 image per sample, 8 perceiver latents -> 8 image tokens.
    """
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    _seeded(seed)
    config = Idefics2Config(
        vision_config=_vision(),
        perceiver_config={
            "hidden_size": _TEXT["hidden_size"],
            "resampler_n_latents": 8,
            "resampler_depth": 1,
            "resampler_n_heads": 2,
            "resampler_head_dim": 16,
            "num_key_value_heads": 1,
        },
        text_config={"model_type": "mistral", **_text()},
        image_token_id=IMAGE_TOKEN_ID,
    )
    return Idefics2ForConditionalGeneration(config)


def tiny_idefics3(seed: int = 0) -> Idefics3ForConditionalGeneration:
    """Tiny ``Idefics3ForConditionalGeneration`` (ViT + pixel-shuffle connector + Llama).

    32x32 image, 8x8 patches, ``scale_factor=2`` -> 4 image tokens per image.
    """
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    _seeded(seed)
    config = Idefics3Config(
        vision_config=_vision(),
        text_config={"model_type": "llama", **_text()},
        image_token_id=IMAGE_TOKEN_ID,
        scale_factor=2,
    )
    return Idefics3ForConditionalGeneration(config)


def tiny_smolvlm(seed: int = 0) -> SmolVLMForConditionalGeneration:
    """Tiny ``SmolVLMForConditionalGeneration`` (Idefics3 layout): 4 image tokens per image."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

    _seeded(seed)
    config = SmolVLMConfig(
        vision_config=_vision(),
        text_config={"model_type": "llama", **_text()},
        image_token_id=IMAGE_TOKEN_ID,
        scale_factor=2,
    )
    return SmolVLMForConditionalGeneration(config)


def _qwen_vl_text() -> dict[str, Any]:
    # M-RoPE sections must sum to head_dim // 2 (= 8 here).
    return _text(**_rope(mrope_section=[2, 3, 3]))


def _with_text(config_cls: Any, text: dict[str, Any], **kwargs: Any) -> PreTrainedConfig:
    """``config_cls(text_config=text, **kwargs)``, or the text fields flat where the config has no
    ``text_config`` (Qwen2-VL before transformers 4.52 kept its decoder's fields at the top level)."""
    if "text_config" in (getattr(config_cls, "sub_configs", None) or {}):
        return config_cls(text_config=text, **kwargs)
    return config_cls(**text, **kwargs)


def tiny_qwen2_vl(seed: int = 0) -> Qwen2VLForConditionalGeneration:
    """Tiny ``Qwen2VLForConditionalGeneration``.

    16x16 images, 4x4 patches, temporal patch 2, 2x2 spatial merge ->
    16 patches (``image_grid_thw = [1, 4, 4]``) and 4 image tokens per image.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    _seeded(seed)
    config = _with_text(
        Qwen2VLConfig,
        _qwen_vl_text(),
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": _TEXT["hidden_size"],
            "mlp_ratio": 2,
            "num_heads": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_TOKEN_ID,
        vision_end_token_id=VISION_END_TOKEN_ID,
    )
    return Qwen2VLForConditionalGeneration(cast(Any, config))


def tiny_qwen2_5_vl(seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Tiny ``Qwen2_5_VLForConditionalGeneration`` (same geometry as :func:`tiny_qwen2_vl`)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    _seeded(seed)
    config = _with_text(
        Qwen2_5_VLConfig,
        _qwen_vl_text(),
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "out_hidden_size": _TEXT["hidden_size"],
            "num_heads": 2,
            "patch_size": 4,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 8,
            "fullatt_block_indexes": [1],
        },
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_TOKEN_ID,
        vision_end_token_id=VISION_END_TOKEN_ID,
    )
    return Qwen2_5_VLForConditionalGeneration(cast(Any, config))


def tiny_blip2(seed: int = 0) -> Blip2ForConditionalGeneration:
    """Tiny ``Blip2ForConditionalGeneration`` (ViT + Q-Former + OPT): 8 query tokens per image."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        OPTConfig,
    )

    _seeded(seed)
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=_IMAGE_SIZE,
            patch_size=_PATCH_SIZE,
            initializer_range=0.02,  # default 1e-10 leaves near-zero position/class embeddings
        ).to_dict(),  # 4.x's Blip2Config takes its sub-configs as dicts only (5.x takes either)
        qformer_config=Blip2QFormerConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            encoder_hidden_size=32,
            cross_attention_frequency=1,
            max_position_embeddings=64,
        ).to_dict(),
        text_config=OPTConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=128,
            num_attention_heads=4,
            max_position_embeddings=256,
            word_embed_proj_dim=64,
            pad_token_id=PAD_TOKEN_ID,
            bos_token_id=BOS_TOKEN_ID,
            eos_token_id=EOS_TOKEN_ID,
        ).to_dict(),
        num_query_tokens=8,
        image_token_index=IMAGE_TOKEN_ID,
    )
    model = Blip2ForConditionalGeneration(config)
    # transformers zero-inits `query_tokens`; LayerNorm of an all-zero query then amplifies gradients
    # ~1e6x (grad norm ~1e18 at step 0).  The original BLIP-2 init is N(0, 0.02).
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)
    return model


def tiny_paligemma(seed: int = 0) -> PaliGemmaForConditionalGeneration:
    """Tiny ``PaliGemmaForConditionalGeneration`` (SigLIP + linear projector + Gemma): 16 image tokens."""
    from transformers import GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration

    _seeded(seed)
    text = _text(head_dim=16)
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**_vision(vision_use_head=False, projection_dim=text["hidden_size"])),
        text_config=GemmaConfig(**text),
        image_token_index=IMAGE_TOKEN_ID,
        vocab_size=VOCAB_SIZE,
        projection_dim=text["hidden_size"],
        hidden_size=text["hidden_size"],
    )
    return PaliGemmaForConditionalGeneration(config)


def tiny_gemma3(seed: int = 0) -> Gemma3ForConditionalGeneration:
    """Tiny ``Gemma3ForConditionalGeneration`` (SigLIP + pooled projector + Gemma3): 4 image tokens."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig

    _seeded(seed)
    config = Gemma3Config(
        vision_config=SiglipVisionConfig(**_vision(vision_use_head=False)),
        text_config=Gemma3TextConfig(
            **_text(head_dim=16, sliding_window=16),
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "full_attention"],
        ),
        mm_tokens_per_image=4,
        boi_token_index=BOI_TOKEN_ID,
        eoi_token_index=EOI_TOKEN_ID,
        image_token_index=IMAGE_TOKEN_ID,
    )
    model = Gemma3ForConditionalGeneration(config)
    # transformers zero-inits the projector, so image tokens enter the LLM as zero vectors and its first
    # RMSNorm amplifies their gradient ~1e3x; a small random projector is better conditioned.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
    return model


def tiny_internvl(seed: int = 0) -> InternVLForConditionalGeneration:
    """Tiny ``InternVLForConditionalGeneration`` (InternViT + pixel-shuffle MLP + Qwen2): 4 image tokens."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    _seeded(seed)
    config = InternVLConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": [_IMAGE_SIZE, _IMAGE_SIZE],
            "patch_size": [_PATCH_SIZE, _PATCH_SIZE],
        },
        text_config={"model_type": "qwen2", **_text()},
        image_token_id=IMAGE_TOKEN_ID,
        image_seq_length=4,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    return InternVLForConditionalGeneration(config)


def tiny_mllama(seed: int = 0) -> MllamaForConditionalGeneration:
    """Tiny ``MllamaForConditionalGeneration`` (tiled ViT + cross-attention Llama).

    One 32x32 image per sample with a single tile; one ``<|image|>`` token; text
    layer 1 is a cross-attention layer.
    """
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    _seeded(seed)
    config = MllamaConfig(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_global_layers": 1,
            "attention_heads": 2,
            "vision_output_dim": 64,
            "image_size": _IMAGE_SIZE,
            "patch_size": _PATCH_SIZE,
            "max_num_tiles": 1,
            "supported_aspect_ratios": [[1, 1]],
            "intermediate_layers_indices": [0],
        },
        text_config={
            **_text(**_rope()),  # 4.x's Mllama text config has no default RoPE settings
            "num_hidden_layers": 3,
            "cross_attention_layers": [1],
        },
        image_token_index=IMAGE_TOKEN_ID,
    )
    model = MllamaForConditionalGeneration(config)
    # transformers zero-inits the tanh gates (cross-attention gates and the vision positional-embedding
    # gates), which makes every vision/projector gradient exactly zero at step 0; open them halfway.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in {"gate", "cross_attn_attn_gate", "cross_attn_mlp_gate"}:
                param.fill_(0.5)
    return model


# --------------------------------------------------------------------------------------
# MiniCPM-V 2.x re-implementation (vpm / resampler / llm)
# --------------------------------------------------------------------------------------


class _TorchInit:
    """transformers 4.x stand-in for ``transformers.initialization`` (5.x): plain in-place torch inits.

    5.x's versions skip tensors that ``from_pretrained`` already loaded; 4.x only calls ``_init_weights`` on
    modules it did not load, so the plain ones are right there.
    """

    trunc_normal_ = staticmethod(nn.init.trunc_normal_)
    normal_ = staticmethod(nn.init.normal_)

    @staticmethod
    @torch.no_grad()
    def copy_(tensor: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return tensor.copy_(other)


def _hf_init() -> Any:
    """``transformers.initialization`` where it exists (5.x), else :class:`_TorchInit`."""
    try:
        return importlib.import_module("transformers.initialization")
    except ImportError:  # transformers 4.x
        return _TorchInit


def _sincos_2d(embed_dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table of shape ``(grid*grid, embed_dim)``."""
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4, got {embed_dim}")
    quarter = embed_dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    coords = torch.arange(grid, dtype=torch.float32)
    ys, xs = torch.meshgrid(coords, coords, indexing="ij")
    out_y = ys.reshape(-1, 1) * omega
    out_x = xs.reshape(-1, 1) * omega
    return torch.cat([out_y.sin(), out_y.cos(), out_x.sin(), out_x.cos()], dim=1)


class Resampler(nn.Module):
    """Perceiver-style resampler shaped like MiniCPM-V 2.x's.

    ``num_queries`` learnable queries cross-attend (one ``nn.MultiheadAttention``)
    to the projected vision tokens; the result is normalised and multiplied by
    ``proj``.  Children: ``query`` (parameter), ``kv_proj``, ``attn``, ``ln_q``,
    ``ln_kv``, ``ln_post``, ``proj`` (parameter); ``pos_embed`` is a fixed
    (non-persistent) 2-D sin-cos buffer added to the keys.
    """

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int, grid_size: int) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.embed_dim = embed_dim
        self.grid_size = grid_size
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = nn.Linear(kv_dim, embed_dim, bias=False)
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_kv = nn.LayerNorm(embed_dim, eps=1e-6)
        self.ln_post = nn.LayerNorm(embed_dim, eps=1e-6)
        self.proj = nn.Parameter((embed_dim**-0.5) * torch.randn(embed_dim, embed_dim))
        self.pos_embed: torch.Tensor
        self.register_buffer("pos_embed", _sincos_2d(embed_dim, grid_size), persistent=False)
        nn.init.trunc_normal_(self.query, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map vision tokens ``(B, L, kv_dim)`` to ``(B, num_queries, embed_dim)``."""
        batch = x.shape[0]
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)  # L, B, D
        pos = self.pos_embed[: x.shape[0]].to(x.dtype).unsqueeze(1)  # L, 1, D
        q = self.ln_q(self.query).unsqueeze(1).expand(-1, batch, -1)  # Q, B, D
        out = self.attn(q, x + pos, x, need_weights=False)[0]
        return self.ln_post(out.permute(1, 0, 2)) @ self.proj


def _subconfig(cls: type[PreTrainedConfig], value: Any, default: dict[str, Any]) -> PreTrainedConfig:
    """``value`` as a ``cls`` config: a config is kept, a dict (as ``from_pretrained`` passes it) is built."""
    if value is None:
        value = default
    if isinstance(value, PreTrainedConfig):
        return value
    return cls(**{k: v for k, v in dict(value).items() if k != "model_type"})


class MiniCPMV2Config(PreTrainedConfig):
    """Config for :class:`MiniCPMV2`: a SigLIP ``vision_config``, a Qwen2 ``text_config``
    and the resampler geometry.

    Defaults are the tiny sizes used by :func:`tiny_minicpmv2`.  Written with an explicit
    ``__init__``, the way remote-code configs (MiniCPM-V's own among them) are: transformers 4.x
    configs are plain classes and 5.x turns config classes into dataclasses but keeps a subclass's
    own ``__init__``, so the one definition works, and round-trips through ``save_pretrained`` /
    ``from_pretrained``, on both.

    >>> MiniCPMV2Config(num_query=4).text_config.hidden_size
    64
    """

    model_type = "gradguard_minicpmv2"
    # transformers 4.x reads `sub_configs` (to_dict, attention-implementation propagation); in 5.x it is a
    # read-only view of `sub_configs_defaults`, which a class attribute of the same name simply overrides.
    sub_configs = {"vision_config": SiglipVisionConfig, "text_config": Qwen2Config}  # noqa: RUF012

    def __init__(
        self,
        vision_config: dict[str, Any] | PreTrainedConfig | None = None,
        text_config: dict[str, Any] | PreTrainedConfig | None = None,
        num_query: int = 8,
        resampler_heads: int = 4,
        image_token_id: int = IMAGE_TOKEN_ID,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        self.vision_config = _subconfig(SiglipVisionConfig, vision_config, _vision(vision_use_head=False))
        self.text_config = _subconfig(Qwen2Config, text_config, _text())
        self.num_query = num_query
        self.resampler_heads = resampler_heads
        self.image_token_id = image_token_id
        super().__init__(**{"tie_word_embeddings": tie_word_embeddings, **kwargs})

    @property
    def hidden_size(self) -> int:
        """The language model's hidden size (what PEFT / DeepSpeed helpers look up)."""
        return cast(Qwen2Config, self.text_config).hidden_size

    @property
    def vocab_size(self) -> int:
        """The language model's vocabulary size."""
        return cast(Qwen2Config, self.text_config).vocab_size


class MiniCPMV2(PreTrainedModel, GenerationMixin):
    """MiniCPM-V 2.x-shaped VLM with the remote code's top-level children.

    * ``vpm`` — the SigLIP vision transformer (vision tower: ``vpm.encoder.layers.N``),
    * ``resampler`` — :class:`Resampler` (connector),
    * ``llm`` — ``Qwen2ForCausalLM`` (language model + ``lm_head``).

    ``forward`` embeds ``input_ids`` with the LLM's embeddings, overwrites the
    ``config.image_token_id`` positions (exactly ``config.num_query`` per sample)
    with the resampled image tokens and returns the LLM's
    :class:`~transformers.modeling_outputs.CausalLMOutputWithPast`.
    """

    config_class = MiniCPMV2Config
    config: MiniCPMV2Config
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ["image", "text"]  # noqa: RUF012 (PreTrainedModel declares it per instance)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["SiglipEncoderLayer", "Qwen2DecoderLayer", "Resampler"]  # noqa: RUF012

    def __init__(self, config: MiniCPMV2Config) -> None:
        super().__init__(config)
        vision_config = cast(SiglipVisionConfig, config.vision_config)
        text_config = cast(Qwen2Config, config.text_config)
        vpm = SiglipVisionModel(vision_config)
        # MiniCPM-V's `vpm` is the bare SigLIP transformer (`vpm.embeddings`, `vpm.encoder.layers.N`,
        # `vpm.post_layernorm`): transformers 5 flattened SiglipVisionModel into that; 4.x wraps it in
        # `.vision_model`, so unwrap it there. One layout (and state-dict keys) on every release.
        self.vpm = getattr(vpm, "vision_model", vpm)
        grid = cast(int, vision_config.image_size) // cast(int, vision_config.patch_size)
        self.resampler = Resampler(
            num_queries=config.num_query,
            embed_dim=text_config.hidden_size,
            num_heads=config.resampler_heads,
            kv_dim=vision_config.hidden_size,
            grid_size=grid,
        )
        self.llm = Qwen2ForCausalLM(text_config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, Resampler):
            hf_init = _hf_init()
            hf_init.trunc_normal_(module.query, std=0.02)
            hf_init.normal_(module.proj, std=module.embed_dim**-0.5)
            # non-persistent buffer: rebuilt here because from_pretrained materialises the model from meta
            hf_init.copy_(module.pos_embed, _sincos_2d(module.embed_dim, module.grid_size))
        else:
            super()._init_weights(module)

    def get_input_embeddings(self) -> nn.Module:
        """The LLM's token embedding."""
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        """Replace the LLM's token embedding."""
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        """The LLM's ``lm_head``."""
        return self.llm.get_output_embeddings()

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encode ``(B, 3, H, W)`` images into ``(B, num_query, hidden)`` LLM-space tokens."""
        pixel_values = pixel_values.to(self.vpm.embeddings.patch_embedding.weight.dtype)
        vision = self.vpm(pixel_values=pixel_values).last_hidden_state
        return self.resampler(vision)

    def forward(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **loss_kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Run vision -> resampler -> LLM; returns the LLM's output (with ``.loss`` if ``labels``).

        The var-keyword is spelled ``loss_kwargs`` because transformers 4.46's Trainer passes
        ``num_items_in_batch`` only to a forward with a ``**loss_kwargs`` (4.57 and 5.x accept any
        ``**kwargs``): the step's loss is then token-weighted the same way on every release.
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            image_embeds = self.get_image_features(pixel_values).to(embeds.dtype)
            mask = input_ids == self.config.image_token_id
            n_tokens, n_features = int(mask.sum()), image_embeds.shape[0] * image_embeds.shape[1]
            if n_tokens != n_features:
                raise ValueError(f"{n_tokens} image placeholder tokens but {n_features} resampled image tokens")
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), image_embeds.reshape(-1, embeds.shape[-1]))
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **loss_kwargs)


def tiny_minicpmv2(seed: int = 0) -> MiniCPMV2:
    """Tiny :class:`MiniCPMV2` (SigLIP ``vpm`` + resampler + Qwen2 ``llm``): 8 image tokens."""
    _seeded(seed)
    return MiniCPMV2(MiniCPMV2Config())


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------

Sample = dict[str, torch.Tensor]


def _unwrap(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and not isinstance(model, PreTrainedModel):
        return get_base()
    return model


def _text_sample(gen: torch.Generator, seq_len: int, image_tokens: list[int]) -> tuple[Sample, int]:
    """``[BOS] + image_tokens + prompt + answer``; returns the sample and the prompt end index."""
    n_text = seq_len - 1 - len(image_tokens)
    if n_text < 2:
        raise ValueError(f"seq_len={seq_len} too short for {len(image_tokens)} image tokens")
    text = torch.randint(TEXT_TOKEN_LOW, TEXT_TOKEN_HIGH, (n_text,), generator=gen)
    ids = torch.cat([torch.tensor([BOS_TOKEN_ID, *image_tokens], dtype=torch.long), text])
    prompt_end = 1 + len(image_tokens) + n_text // 2
    labels = ids.clone()
    labels[:prompt_end] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, prompt_end


def _pixels(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _image_tokens(model: PreTrainedModel) -> int:
    """Number of LLM placeholder tokens per image for ``model``'s family (one image per sample)."""
    cfg: Any = model.config
    name = _family_name(model)
    if name == "minicpmv2":
        return cfg.num_query
    if name == "llava":
        return cfg.image_seq_length
    if name == "idefics2":
        return cfg.perceiver_config.resampler_n_latents
    if name in ("idefics3", "smolvlm"):
        v = cfg.vision_config
        return (v.image_size // v.patch_size) ** 2 // cfg.scale_factor**2
    if name in ("qwen2_vl", "qwen2_5_vl"):
        return 4  # 4x4 patch grid merged 2x2
    if name == "blip2":
        return cfg.num_query_tokens
    if name == "paligemma":
        v = cfg.vision_config
        return (v.image_size // v.patch_size) ** 2
    if name == "gemma3":
        return cfg.mm_tokens_per_image
    if name == "internvl":
        return cfg.image_seq_length
    if name == "minicpmv4_6":
        return _MINICPMV46_GRID**2 // 16
    if name == "mllama":
        return 1
    return 0


_MINICPMV46_GRID = 8  # 8x8 patches per image


def _sample(model: PreTrainedModel, gen: torch.Generator, seq_len: int) -> Sample:
    """One sample in *default-collator* form (tensors without the batch dimension)."""
    n_img = _image_tokens(model)
    sample, prompt_end = _text_sample(gen, seq_len, [IMAGE_TOKEN_ID] * n_img)
    cfg: Any = model.config
    name = _family_name(model)
    if name in ("llama", "qwen2"):
        return sample
    if name in ("minicpmv2", "llava", "blip2", "internvl"):
        v = cfg.vision_config
        size = v.image_size[0] if isinstance(v.image_size, list | tuple) else v.image_size
        sample["pixel_values"] = _pixels(gen, 3, size, size)
    elif name == "paligemma":
        sample["pixel_values"] = _pixels(gen, 3, _IMAGE_SIZE, _IMAGE_SIZE)
        # 0 = prefix (image + prompt, bidirectional), 1 = suffix (answer, causal).
        tt = torch.zeros_like(sample["input_ids"])
        tt[prompt_end:] = 1
        sample["token_type_ids"] = tt
    elif name == "gemma3":
        sample["pixel_values"] = _pixels(gen, 3, _IMAGE_SIZE, _IMAGE_SIZE)
        sample["token_type_ids"] = (sample["input_ids"] == IMAGE_TOKEN_ID).long()
    elif name in ("idefics2", "idefics3", "smolvlm"):
        sample["pixel_values"] = _pixels(gen, 1, 3, _IMAGE_SIZE, _IMAGE_SIZE)
        sample["pixel_attention_mask"] = torch.ones(1, _IMAGE_SIZE, _IMAGE_SIZE, dtype=torch.long)
    elif name in ("qwen2_vl", "qwen2_5_vl"):
        v = cfg.vision_config
        n_patches = 16
        sample["pixel_values"] = _pixels(gen, n_patches, 3 * v.temporal_patch_size * v.patch_size**2)
        sample["image_grid_thw"] = torch.tensor([1, 4, 4], dtype=torch.long)
        if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # 5.x; 4.x finds image tokens by id
            sample["mm_token_type_ids"] = (sample["input_ids"] == IMAGE_TOKEN_ID).long()
    elif name == "minicpmv4_6":
        p = cfg.vision_config.patch_size
        g = _MINICPMV46_GRID
        # One image as NaViT patches laid side by side: (3, p, g*g*p).
        sample["pixel_values"] = _pixels(gen, 3, p, g * g * p)
        sample["target_sizes"] = torch.tensor([g, g], dtype=torch.int32)
    elif name == "mllama":
        v = cfg.vision_config
        sample["pixel_values"] = _pixels(gen, 1, 1, 3, v.image_size, v.image_size)  # images, tiles, C, H, W
        sample["aspect_ratio_ids"] = torch.ones(1, dtype=torch.long)
        sample["aspect_ratio_mask"] = torch.ones(1, 1, dtype=torch.long)
        # every text token after the <|image|> token attends to the image's single tile
        cross = torch.zeros(seq_len, 1, 1, dtype=torch.long)
        cross[1:] = 1
        sample["cross_attention_mask"] = cross
    else:
        raise TypeError(f"no batch recipe for {type(model).__name__}")
    return sample


def _collate(model: PreTrainedModel, samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Collate samples into the format the family's *processor* would produce."""
    batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
    name = _family_name(model)
    if name in ("qwen2_vl", "qwen2_5_vl"):
        batch["pixel_values"] = torch.cat([s["pixel_values"] for s in samples])  # (sum patches, D)
    elif name == "minicpmv4_6":
        batch["pixel_values"] = torch.cat([s["pixel_values"] for s in samples], dim=-1).unsqueeze(0)
    return batch


def _for_default_collator(model: PreTrainedModel, sample: Sample) -> Sample:
    """Turn a sample into one that :func:`transformers.default_data_collator` batches correctly.

    MiniCPM-V 4.6 packs *all* images of a batch into ``pixel_values[0]``
    (``(1, 3, p, sum(h*w)*p)``) and only reads ``pixel_values[:1]``; stacking
    per-sample tensors can't produce that.  Its dataset samples therefore carry a
    single ``(3, p, p)`` patch: the vision embeddings broadcast that one patch
    embedding over every ``(h, w)`` position listed in the stacked
    ``target_sizes``, so every image token still flows through the whole vision
    tower, merger and LLM (all parameters get gradients), at the price of the
    image content being one repeated patch.
    """
    if _family_name(model) == "minicpmv4_6":
        p = cast(Any, model.config).vision_config.patch_size
        sample = dict(sample)
        sample["pixel_values"] = sample["pixel_values"][:, :, :p].contiguous()
    return sample


def _generator(seed: int) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def family_of(model: nn.Module) -> Family:
    """The :class:`Family` record for ``model`` (a bare model or a ``PeftModel`` around one)."""
    return FAMILIES[_family_name(_unwrap(model))]


def _family_name(model: nn.Module) -> str:
    """The family key of a bare model built here (by class, so no family's class needs importing)."""
    cls = type(model)
    name = _BY_CLASS.get(cls.__name__)
    # transformers' own classes, or this module's MiniCPMV2: a user's subclass is not the family
    if name is None or not (cls.__module__.startswith("transformers.") or cls is MiniCPMV2):
        raise TypeError(f"{cls.__name__} is not a gradguard.testing.models family")
    return name


def make_batch(model: nn.Module, batch_size: int = 2, seq_len: int = 24, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random input batch (with ``labels``) valid for ``model``'s family.

    Layout per row: ``[BOS] + image placeholders + prompt + answer``; ``labels``
    equal ``input_ids`` on the answer and ``-100`` on BOS, image placeholders
    and prompt.  Image inputs follow the family's processor format
    (``pixel_values`` plus e.g. ``image_grid_thw`` / ``mm_token_type_ids`` for
    Qwen2-VL, ``pixel_attention_mask`` for Idefics, ``target_sizes`` with packed
    ``pixel_values`` for MiniCPM-V 4.6, ``aspect_ratio_*`` and
    ``cross_attention_mask`` for Mllama, ``token_type_ids`` for PaliGemma/Gemma3).

    ``model`` may be a ``PeftModel``; the base model decides the family.
    """
    bare = _unwrap(model)
    if not isinstance(bare, PreTrainedModel):
        raise TypeError(f"expected a transformers model, got {type(model).__name__}")
    gen = _generator(seed)
    return _collate(bare, [_sample(bare, gen, seq_len) for _ in range(batch_size)])


class TinyDataset(torch.utils.data.Dataset):
    """``n`` random single-sample dicts for a HF ``Trainer`` with ``default_data_collator``.

    Samples are drawn in blocks of ``batch_size`` from the same generator as
    :func:`make_batch` (block ``b`` uses ``seed + b``), so for most families the
    first ``batch_size`` samples stacked equal ``make_batch(model, batch_size,
    seq_len, seed)``.  Any ``per_device_train_batch_size`` works.  Families with
    :attr:`Family.needs_remove_unused_columns` need
    ``TrainingArguments(remove_unused_columns=False)``.

    Format notes: Qwen2-VL/2.5-VL samples carry ``pixel_values`` of shape
    ``(num_patches, patch_dim)`` and ``image_grid_thw`` of shape ``(3,)``: the
    stacked ``(B, num_patches, patch_dim)`` is flattened by the vision patch
    embedding, which is what the processor's concatenation gives.  MiniCPM-V 4.6
    samples carry a single image patch (see ``_for_default_collator``).
    """

    def __init__(self, model: nn.Module, n: int = 16, batch_size: int = 1, seq_len: int = 24, seed: int = 0) -> None:
        bare = _unwrap(model)
        if not isinstance(bare, PreTrainedModel):
            raise TypeError(f"expected a transformers model, got {type(model).__name__}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.samples: list[Sample] = []
        block = 0
        while len(self.samples) < n:
            gen = _generator(seed + block)
            for _ in range(min(batch_size, n - len(self.samples))):
                self.samples.append(_for_default_collator(bare, _sample(bare, gen, seq_len)))
            block += 1

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return dict(self.samples[index])


# --------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------

_LM_ROLES = {"model": "language", "lm_head": "head"}
_QV = ["q_proj", "v_proj"]
_VLM = {  # LLaVA-style: `<vision>`, `multi_modal_projector` and `language_model` under `model.`
    "model.multi_modal_projector": "connector",
    "model.language_model": "language",
    "lm_head": "head",
}


def _vlm(vision: str) -> dict[str, str]:
    return {f"model.{vision}": "vision", **_VLM}


def _top_level(vision: str) -> dict[str, str]:
    """transformers < 4.52: the components at the top level; ``language_model`` a ``*ForCausalLM``."""
    return {
        f"model.{vision}": vision,
        "model.multi_modal_projector": "multi_modal_projector",
        "model.language_model": "language_model.model",
        "lm_head": "language_model.lm_head",
    }


_IDEFICS = {
    "model.vision_model": "vision",
    "model.connector": "connector",
    "model.text_model": "language",
    "lm_head": "head",
}
_QWEN_VL = {
    "model.visual": "vision",
    "model.visual.merger": "connector",
    "model.language_model": "language",
    "lm_head": "head",
}
# transformers < 4.52: `visual` at the top level and the text decoder as `model`
_QWEN_VL_TOP_LEVEL = {"model.visual": "visual", "model.language_model": "model"}

_DEFINITIONS: list[Family] = [
    Family("llama", tiny_llama, "LlamaForCausalLM", _LM_ROLES, _QV),
    Family("qwen2", tiny_qwen2, "Qwen2ForCausalLM", _LM_ROLES, _QV),
    Family(
        "minicpmv2",
        tiny_minicpmv2,
        "MiniCPMV2",
        {"vpm": "vision", "resampler": "connector", "llm.model": "language", "llm.lm_head": "head"},
        _QV,
    ),
    Family(
        "llava",
        tiny_llava,
        "LlavaForConditionalGeneration",
        _vlm("vision_tower"),
        _QV,
        legacy_paths=_top_level("vision_tower"),
        no_grad=("model.vision_tower.post_layernorm",),
    ),
    Family(
        "minicpmv4_6",
        tiny_minicpmv4_6,
        "MiniCPMV4_6ForConditionalGeneration",
        {
            "model.vision_tower": "vision",
            "model.merger": "connector",
            "model.language_model": "language",
            "lm_head": "head",
        },
        _QV,
        requires=("transformers.models.minicpmv4_6",),
    ),
    Family("idefics2", tiny_idefics2, "Idefics2ForConditionalGeneration", _IDEFICS, _QV),
    Family("idefics3", tiny_idefics3, "Idefics3ForConditionalGeneration", _IDEFICS, _QV),
    Family("smolvlm", tiny_smolvlm, "SmolVLMForConditionalGeneration", _IDEFICS, _QV, requires=("SmolVLMConfig",)),
    Family(
        "qwen2_vl", tiny_qwen2_vl, "Qwen2VLForConditionalGeneration", _QWEN_VL, _QV, legacy_paths=_QWEN_VL_TOP_LEVEL
    ),
    Family(
        "qwen2_5_vl",
        tiny_qwen2_5_vl,
        "Qwen2_5_VLForConditionalGeneration",
        _QWEN_VL,
        _QV,
        legacy_paths=_QWEN_VL_TOP_LEVEL,
        requires=("Qwen2_5_VLConfig",),
    ),
    Family(
        "blip2",
        tiny_blip2,
        "Blip2ForConditionalGeneration",
        {
            "vision_model": "vision",
            "query_tokens": "connector",
            "qformer": "connector",
            "language_projection": "connector",
            "language_model.model": "language",
            "language_model.lm_head": "head",
        },
        _QV,
    ),
    Family(
        "paligemma",
        tiny_paligemma,
        "PaliGemmaForConditionalGeneration",
        _vlm("vision_tower"),
        _QV,
        legacy_paths=_top_level("vision_tower"),
    ),
    Family(
        "gemma3",
        tiny_gemma3,
        "Gemma3ForConditionalGeneration",
        _vlm("vision_tower"),
        _QV,
        legacy_paths=_top_level("vision_tower"),
        requires=("Gemma3Config",),
    ),
    Family(
        "internvl",
        tiny_internvl,
        "InternVLForConditionalGeneration",
        _vlm("vision_tower"),
        _QV,
        requires=("InternVLConfig",),
    ),
    Family(
        "mllama",
        tiny_mllama,
        "MllamaForConditionalGeneration",
        _vlm("vision_model"),
        _QV,
        legacy_paths=_top_level("vision_model"),
    ),
]

FAMILIES: dict[str, Family] = {f.name: f for f in _DEFINITIONS if f.missing is None}
"""Every family the installed transformers can build, keyed by :attr:`Family.name`.

Roles use the longest-prefix rule of :func:`group_of`: Qwen2-VL's ``model.visual.merger``
(the patch merger living inside the vision module) is the connector, the rest of
``model.visual`` is vision.  MiniCPM-V 4.6's ``vit_merger`` (a window-attention
downsampler *between* ViT layers) stays in ``model.vision_tower``; its connector is
``model.merger``.  BLIP-2's connector is ``query_tokens`` + ``qformer`` +
``language_projection``.  Tied heads (PaliGemma, Gemma3, BLIP-2's OPT) share the
embedding tensor, so ``lm_head`` only shows up in
``named_parameters(remove_duplicate=False)``.  No family needs
``remove_unused_columns=False``.  The families an older transformers lacks are in
:data:`SKIPPED`, with the reason.
"""

SKIPPED: Mapping[str, str] = MappingProxyType(
    {f.name: cast(str, f.missing) for f in _DEFINITIONS if f.missing is not None}
)
"""Family name -> why the installed transformers cannot build it (e.g. no Gemma 3 before 4.50)."""

_BY_CLASS = {f.class_name: f.name for f in _DEFINITIONS}


def available() -> list[str]:
    """The names of the families the installed transformers can build (the keys of :data:`FAMILIES`), sorted.

    >>> "minicpmv2" in available() and "llava" in available()
    True
    """
    return sorted(FAMILIES)


def _check_roles() -> None:
    for fam in _DEFINITIONS:
        bad = {r for r in fam.layout.values() if r not in ROLES}
        if bad:  # pragma: no cover - static data
            raise AssertionError(f"{fam.name}: unknown roles {bad}")


_check_roles()
