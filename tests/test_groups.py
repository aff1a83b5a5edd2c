"""Groups and roles: right out of the box, bare and PEFT-wrapped, on every family we claim."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from gradguard import build_groups
from gradguard.core.groups import normalize_name
from gradguard.testing.models import FAMILIES, group_of, tiny_llama, tiny_minicpmv2

# The group names a user recognises, for the families the seed story and the docs talk about.
EXPECTED_NAMES = {
    "minicpmv2": {"vpm": "vision", "resampler": "connector", "llm": "language", "llm.lm_head": "head"},
    "llava": {
        "model.vision_tower": "vision",
        "model.multi_modal_projector": "connector",
        "model.language_model": "language",
        "lm_head": "head",
    },
    "qwen2_vl": {
        "model.visual": "vision",
        "model.visual.merger": "connector",
        "model.language_model": "language",
        "lm_head": "head",
    },
    "llama": {"model": "language", "lm_head": "head"},
}
# transformers < 4.52 builds these with the components at the top level (`FAMILIES[...].roles` follows the layout)
EXPECTED_NAMES_TOP_LEVEL = {
    "llava": {
        "vision_tower": "vision",
        "multi_modal_projector": "connector",
        "language_model": "language",
        "language_model.lm_head": "head",
    },
    "qwen2_vl": {"visual": "vision", "visual.merger": "connector", "model": "language", "lm_head": "head"},
}


def _roles_by_param(model: nn.Module) -> dict[str, str]:
    gmap = build_groups(model)
    return {info.path: gmap.groups[info.group].role for info in gmap.by_param.values()}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "lora"])
def test_roles_per_family(family: str, wrapped: bool) -> None:
    fam = FAMILIES[family]
    model = fam.build()
    if wrapped:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=fam.lora_targets))
    gmap = build_groups(model)
    # Every parameter in exactly one group, with the role the family's reference map gives its path.
    seen = set()
    for info in gmap.by_param.values():
        assert id(info.param) not in seen
        seen.add(id(info.param))
        ref = group_of(info.path, fam.roles)
        assert ref is not None, f"{info.path} is under no reference path"
        assert gmap.groups[info.group].role == fam.roles[ref], info.path
    assert {g.role for g in gmap} >= ({"language"} | ({"vision", "connector"} if len(fam.roles) > 2 else set()))
    expected = EXPECTED_NAMES if set(fam.roles) == set(fam.layout) else EXPECTED_NAMES_TOP_LEVEL
    if family in expected:
        assert {g.name: g.role for g in gmap} == expected[family]
    if wrapped:
        adapters = [p for g in gmap for p in g.adapters]
        assert adapters and all(p.param.requires_grad for p in adapters)
        assert all("lora_" in p.name for p in adapters)


def test_adapters_belong_to_their_host_group_and_are_counted_apart() -> None:
    model = get_peft_model(
        tiny_minicpmv2(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["resampler"])
    )
    gmap = build_groups(model)
    resampler = gmap.groups["resampler"]
    # The modules_to_save copy is an adapter of the resampler group; the frozen original is its base.
    assert resampler.adapters and all(p.param.requires_grad for p in resampler.adapters)
    assert resampler.base and not any(p.param.requires_grad for p in resampler.base)
    assert sum(p.param.numel() for p in resampler.adapters) == sum(p.param.numel() for p in resampler.base)
    llm = gmap.groups["llm"]
    assert {p.path.split(".")[-3] for p in llm.adapters} == {"q_proj", "v_proj"}
    assert {p.path.split(".")[-2] for p in llm.adapters} == {"lora_A", "lora_B"}


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        (
            "base_model.model.llm.model.layers.0.self_attn.q_proj.base_layer.weight",
            "llm.model.layers.0.self_attn.q_proj.weight",
        ),
        ("module._orig_mod.lm_head.weight", "lm_head.weight"),
        ("_fsdp_wrapped_module.vpm._checkpoint_wrapped_module.encoder.weight", "vpm.encoder.weight"),
        ("base_model.model.resampler.original_module.proj", "resampler.proj"),
        ("model.language_model.embed_tokens.weight", "model.language_model.embed_tokens.weight"),
    ],
)
def test_normalize_name(raw: str, clean: str) -> None:
    assert normalize_name(raw) == clean


def test_wrappers_do_not_change_groups() -> None:
    model = tiny_minicpmv2()
    bare = {g.name: g.role for g in build_groups(model)}
    compiled = torch.compile(model)  # OptimizedModule: `_orig_mod.` prefixes
    assert {g.name: g.role for g in build_groups(compiled)} == bare
    wrapped = nn.ModuleDict({"module": model})  # what DDP's `module.` prefix looks like
    assert {g.name: g.role for g in build_groups(wrapped)} == bare


def test_user_overrides_with_globs_and_roles() -> None:
    model = tiny_llama()
    gmap = build_groups(model, {"model.layers.0.*": "early_layers:other", "lm_head*": "head_override"})
    assert gmap.groups["early_layers"].role == "other"
    assert gmap.groups["head_override"].role == "head"
    assert all(p.path.startswith("model.layers.0.") for p in gmap.groups["early_layers"].params)
    with pytest.raises(ValueError, match="unknown role"):
        build_groups(model, {"model.*": "x:visionary"})


def test_shared_parameters_appear_once() -> None:
    emb = nn.Embedding(10, 4)
    model = nn.ModuleDict({"language_model": nn.ModuleDict({"embed": emb}), "lm_head": nn.Linear(4, 10, bias=False)})
    model["lm_head"].weight = emb.weight  # tied
    gmap = build_groups(model)
    assert len(gmap.by_param) == 1
    assert gmap.shared == {"language_model.embed.weight": ["lm_head.weight"]}


def test_not_a_module_is_a_clear_type_error() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        build_groups({"weight": torch.zeros(2)})  # type: ignore[arg-type]
