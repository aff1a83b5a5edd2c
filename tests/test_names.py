"""The names users write, on the models they build: one rule for every entry point, roles from structure.

Every family of ``gradguard.testing.models``, bare and LoRA-wrapped, accepts the attribute names users see in
``print(model)``; the same script runs against a LLaVA laid out the transformers-4 way (components at the top
level) and the transformers-5 way (under ``model.``); a hand-written VLM nobody here wrote gets vision /
connector / language / head from its structure, whatever its projector is called.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import trainer_args
from peft import LoraConfig, get_peft_model
from test_reliability_bitwise import validate_report
from torch import nn
from transformers import Trainer
from transformers.modeling_outputs import CausalLMOutput

from gradguard import GradGuard, Guard, audit_requires_grad, build_groups, track_requires_grad
from gradguard.core.audit import resolve_intent
from gradguard.core.track import FrozenByWrapWarning
from gradguard.errors import ConfigurationError, TrainingHealthError
from gradguard.report.model import Report
from gradguard.report.render import to_markdown
from gradguard.testing.models import (
    FAMILIES,
    IMAGE_TOKEN_ID,
    TinyDataset,
    group_of,
    make_batch,
    tiny_llava,
    tiny_minicpmv2,
)
from gradguard.testing.smoke import smoke_test

# What users write for each family's components (the attribute names of `print(model)`), and the group each
# must resolve to. Tied heads (PaliGemma, Gemma 3, BLIP-2's OPT) share the embedding's tensor: `lm_head` is the
# group that holds it.
ATTRIBUTE_NAMES: dict[str, dict[str, str]] = {
    "llama": {"model": "model", "lm_head": "lm_head", "embed_tokens": "model"},
    "qwen2": {"model": "model", "lm_head": "lm_head", "layers": "model"},
    "minicpmv2": {"vpm": "vpm", "resampler": "resampler", "llm": "llm", "lm_head": "llm.lm_head"},
    "llava": {
        "vision_tower": "model.vision_tower",
        "multi_modal_projector": "model.multi_modal_projector",
        "language_model": "model.language_model",
        "lm_head": "lm_head",
    },
    "minicpmv4_6": {
        "vision_tower": "model.vision_tower",
        "merger": "model.merger",
        "vit_merger": "model.vision_tower",
        "language_model": "model.language_model",
        "lm_head": "lm_head",
    },
    **{
        fam: {
            "vision_model": "model.vision_model",
            "connector": "model.connector",
            "text_model": "model.text_model",
            "lm_head": "lm_head",
        }
        for fam in ("idefics2", "idefics3", "smolvlm")
    },
    **{
        fam: {
            "visual": "model.visual",
            "merger": "model.visual.merger",
            "language_model": "model.language_model",
            "lm_head": "lm_head",
        }
        for fam in ("qwen2_vl", "qwen2_5_vl")
    },
    "blip2": {
        "vision_model": "vision_model",
        "qformer": "qformer",
        "query_tokens": "query_tokens",
        "language_projection": "language_projection",
        "language_model": "language_model",
        "lm_head": "language_model",
    },
    **{
        fam: {
            "vision_tower": "model.vision_tower",
            "multi_modal_projector": "model.multi_modal_projector",
            "language_model": "model.language_model",
            "lm_head": "model.language_model",
        }
        for fam in ("paligemma", "gemma3")
    },
    "internvl": {
        "vision_tower": "model.vision_tower",
        "multi_modal_projector": "model.multi_modal_projector",
        "language_model": "model.language_model",
        "lm_head": "lm_head",
    },
    "mllama": {
        "vision_model": "model.vision_model",
        "multi_modal_projector": "model.multi_modal_projector",
        "language_model": "model.language_model",
        "lm_head": "lm_head",
    },
}


def _build(family: str, wrapped: bool) -> nn.Module:
    fam = FAMILIES[family]
    model = fam.build()
    if wrapped:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(model, LoraConfig(r=4, target_modules=fam.lora_targets))
    return model


def test_the_table_covers_every_family() -> None:
    assert set(ATTRIBUTE_NAMES) == set(FAMILIES)


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "lora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_accepts_the_names_users_write(family: str, wrapped: bool) -> None:
    model = _build(family, wrapped)
    for name, group in ATTRIBUTE_NAMES[family].items():
        # Through the audit, end to end: the entry is accepted, the group it names is the one expected (it gets
        # no GG002 "trainable, not in expect_trainable"; every other trainable group does), and the report
        # shows the short name next to the full path.
        audit = audit_requires_grad(model, expect_trainable=[name])
        summaries = {s.name: s for s in audit.groups}
        not_expected = {f.group for f in audit.findings if f.code == "GG002"}
        assert group in summaries, (name, list(summaries))
        assert group not in not_expected, (name, group)
        assert not_expected == {s.name for s in audit.groups if s.trainable} - {group}
        assert summaries[group].alias == (None if name in (group, "connector") else name)  # a role is no alias
        # And the rule itself, on the names with the wrappers users copy from `named_modules()`.
        gmap = audit.group_map
        assert gmap is not None
        for spelling in {name, group} | ({f"base_model.model.{group}"} if wrapped else set()):
            assert [g.name for g in gmap.match(spelling)] == [group], spelling


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "lora"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_reference_path_and_its_last_segment_resolve_to_the_group_holding_it(family: str, wrapped: bool) -> None:
    fam = FAMILIES[family]
    gmap = build_groups(_build(family, wrapped))
    for path in fam.roles:
        # The group that owns the parameters under this reference path (a tied head: the tensor's owner).
        owners = {info.group for info in gmap.by_param.values() if group_of(info.path, fam.roles) == path}
        if not owners:
            continue  # a tied head: its only tensor is listed under the embedding
        assert len(owners) == 1, (path, owners)
        for spelling in (path, path.rsplit(".", 1)[-1]):
            assert [g.name for g in gmap.match(spelling)] == list(owners), (path, spelling)


# -- ambiguity and parent / child -------------------------------------------------------------------------


class DualTower(nn.Module):
    """Video-LLaVA's shape: an image and a video branch, each a vision tower and a projector."""

    def __init__(self) -> None:
        super().__init__()
        parts = tiny_llava()
        self.image = nn.ModuleDict(
            {"vision_tower": parts.model.vision_tower, "projector": parts.model.multi_modal_projector}
        )
        other = tiny_llava(seed=1)
        self.video = nn.ModuleDict(
            {"vision_tower": other.model.vision_tower, "projector": other.model.multi_modal_projector}
        )
        self.language_model = parts.model.language_model
        self.lm_head = parts.lm_head


def test_a_short_name_that_names_two_groups_is_an_error_listing_both() -> None:
    model = DualTower()
    gmap = build_groups(model)
    assert {g.name: g.role for g in gmap} == {
        "image.vision_tower": "vision",
        "image.projector": "connector",
        "video.vision_tower": "vision",
        "video.projector": "connector",
        "language_model": "language",
        "lm_head": "head",
    }
    with pytest.raises(ConfigurationError) as err:
        audit_requires_grad(model, expect_trainable=["vision_tower"])
    msg = str(err.value)
    assert "expect_trainable entry 'vision_tower' is ambiguous" in msg
    assert "image.vision_tower (vision)" in msg and "video.vision_tower (vision)" in msg
    # What the message proposes works: more of the path picks one, a glob or the role selects both.
    assert [g.name for g in gmap.match("image.vision_tower")] == ["image.vision_tower"]
    assert [g.name for g in gmap.match("*vision_tower")] == ["image.vision_tower", "video.vision_tower"]
    assert [g.name for g in gmap.match("vision")] == ["image.vision_tower", "video.vision_tower"]
    assert [g.name for g in gmap.match("video")] == ["video.vision_tower", "video.projector"]  # a container


def test_a_module_name_repeated_across_groups_is_ambiguous_with_examples() -> None:
    with pytest.raises(ConfigurationError) as err:
        build_groups(tiny_llava()).match("q_proj", "expect_trainable entry")
    msg = str(err.value)
    assert "'q_proj' is ambiguous" in msg
    assert "model.vision_tower.encoder.layers.0.self_attn.q_proj and 1 more in model.vision_tower (vision)" in msg
    assert "in model.language_model (language)" in msg


def test_a_group_selects_itself_not_the_groups_nested_in_it() -> None:
    # MiniCPM-V: `llm` is the language model; its `lm_head` is a group of its own. LoRA on the language model
    # leaves lm_head frozen, and `expect_trainable=["llm"]` must not call that a fault.
    model = get_peft_model(tiny_minicpmv2(), LoraConfig(r=4, target_modules=r"llm\..*\.(q_proj|v_proj)"))
    gmap = build_groups(model)
    assert [g.name for g in gmap.match("llm")] == ["llm"]
    assert [g.name for g in gmap.match("lm_head")] == ["llm.lm_head"]
    assert [g.name for g in gmap.match("llm.model.layers.0")] == ["llm"]  # a module inside a group: its group
    assert [g.name for g in gmap.match("vpm.encoder")] == ["vpm"]
    audit = audit_requires_grad(model, expect_trainable=["llm"])
    assert audit.ok and not [f for f in audit.findings if f.code == "GG001"], audit
    # A container that is no group selects every group under it (transformers 5's `model.`).
    assert [g.name for g in build_groups(tiny_llava()).match("model")] == [
        "model.vision_tower",
        "model.multi_modal_projector",
        "model.language_model",
    ]


def test_no_match_lists_the_closest_short_names() -> None:
    with pytest.raises(
        ConfigurationError, match=r"'vision_towr' matches no module group\. Did you mean 'vision_tower'"
    ):
        audit_requires_grad(tiny_llava(), expect_trainable=["vision_towr"])
    # A role that no group has says so (a tied head is no group of its own).
    with pytest.raises(ConfigurationError, match="is a role, but no group of this model has the role 'head'"):
        audit_requires_grad(FAMILIES["paligemma"].build(), expect_trainable=["head"])


# -- transformers 4.x and 5.x layouts: the same user script -------------------------------------------------


class LlavaV4Layout(nn.Module):
    """LLaVA as transformers 4.x laid it out: ``vision_tower``, ``multi_modal_projector``, ``language_model``
    and ``lm_head`` at the top level (the parts of a tiny transformers-5 LLaVA, rehomed)."""

    def __init__(self, v5: nn.Module) -> None:
        super().__init__()
        self.vision_tower = v5.model.vision_tower
        self.multi_modal_projector = v5.model.multi_modal_projector
        self.language_model = v5.model.language_model
        self.lm_head = v5.lm_head

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> CausalLMOutput:
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            # vision_feature_layer=-1, "default" strategy: the last hidden states without CLS
            hidden = self.vision_tower(pixel_values, output_hidden_states=True).hidden_states[-1][:, 1:]
            image = self.multi_modal_projector(hidden).to(embeds.dtype)
            mask = (input_ids == IMAGE_TOKEN_ID).unsqueeze(-1).expand_as(embeds)
            embeds = embeds.masked_scatter(mask, image)
        hidden = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)


def _layout(which: str) -> nn.Module:
    v5 = tiny_llava()
    return v5 if which == "v5" else LlavaV4Layout(v5)


def _user_script(model: nn.Module, tmp_path: Any, modules_to_save: list[str]) -> Report:
    """What a user writes once and runs on either transformers: LoRA everywhere, the projector trained in full."""
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=modules_to_save))
    guard = GradGuard(expect_trainable=["vision_tower", "multi_modal_projector"], console=False)
    dataset = TinyDataset(tiny_llava(), n=16)  # the same samples for both layouts
    trainer = Trainer(model=model, args=trainer_args(tmp_path, max_steps=3), train_dataset=dataset, callbacks=[guard])
    with contextlib.suppress(TrainingHealthError):  # a static error stops it before its first step
        trainer.train()
    data = json.loads((tmp_path / "gradguard-report.json").read_text())
    validate_report(data)  # the alias field is in the published schema
    return Report.from_dict(data)


@pytest.mark.parametrize("layout", ["v4", "v5"])
def test_the_same_script_runs_on_transformers_4_and_5_layouts(layout: str, tmp_path: Any) -> None:
    report = _user_script(_layout(layout), tmp_path, modules_to_save=["multi_modal_projector"])
    assert report.status == "healthy" and report.ok, report.findings
    prefix = "model." if layout == "v5" else ""
    groups = {g.name: g for g in report.groups}
    assert groups[f"{prefix}vision_tower"].role == "vision"
    assert groups[f"{prefix}multi_modal_projector"].role == "connector"
    assert groups[f"{prefix}language_model"].role == "language" and groups["lm_head"].role == "head"
    # The report keeps the full path and shows the short name the user wrote where they differ.
    aliases = {g.name: g.alias for g in report.groups if g.alias}
    assert aliases == (
        {f"{prefix}vision_tower": "vision_tower", f"{prefix}multi_modal_projector": "multi_modal_projector"}
        if prefix
        else {}
    )
    assert all(report.history["grad_norm"][f"{prefix}{n}"] for n in ("vision_tower", "multi_modal_projector"))
    if prefix:
        assert "| `model.vision_tower` (`vision_tower`) | vision |" in to_markdown(report)


@pytest.mark.parametrize("layout", ["v4", "v5"])
def test_the_same_script_catches_the_frozen_projector_on_both_layouts(layout: str, tmp_path: Any) -> None:
    report = _user_script(_layout(layout), tmp_path, modules_to_save=[])  # forgot modules_to_save
    assert report.status == "fault" and report.fault is not None
    group = f"{'model.' if layout == 'v5' else ''}multi_modal_projector"
    assert (report.fault.code, report.fault.origin.group, report.fault.step) == ("GG001", group, 0)
    if layout == "v5":
        assert "(selected by 'multi_modal_projector')" in report.fault.message
    assert "modules_to_save=['multi_modal_projector']" in report.findings[0].hint


def test_the_v4_layout_has_the_v5_roles_and_every_spelling_resolves() -> None:
    v5, v4 = build_groups(tiny_llava()), build_groups(_layout("v4"))
    assert [(g.name.removeprefix("model."), g.role) for g in v5] == [(g.name, g.role) for g in v4]
    for gmap, prefix in ((v5, "model."), (v4, "")):
        for short in ("vision_tower", "multi_modal_projector", "language_model"):
            for spelling in (short, f"model.{short}", f"base_model.model.model.{short}", f"base_model.model.{short}"):
                if spelling.startswith("model.") and not prefix:
                    continue  # `model.vision_tower` is no path of the v4 layout
                assert [g.name for g in gmap.match(spelling)] == [f"{prefix}{short}"], spelling


# -- roles from structure: a VLM nobody here wrote ----------------------------------------------------------

VISION, TEXT, VOCAB = 32, 48, 256


class Encoder(nn.Module):
    """A small ViT: a Conv2d patch embedding, two blocks, a norm, and a pooling `head` of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, VISION, 8, 8)
        self.pos = nn.Parameter(torch.zeros(1, 16, VISION))
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(VISION, 2, 64, batch_first=True) for _ in range(2))
        self.norm = nn.LayerNorm(VISION)
        self.head = nn.Linear(VISION, VISION)  # a pooling head: part of the encoder, not the model's head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class Decoder(nn.Module):
    """A GPT-style stack: token and position embeddings, causal blocks, a final norm and the logits head."""

    def __init__(self, head: str | None = "lm_head") -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, TEXT)
        self.wpe = nn.Embedding(64, TEXT)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(TEXT, 2, 96, batch_first=True) for _ in range(2))
        self.ln_f = nn.LayerNorm(TEXT)
        self.head_name = head
        if head is not None:
            setattr(self, head, nn.Linear(TEXT, VOCAB, bias=False))

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        n = embeds.shape[1]
        x = embeds + self.wpe(torch.arange(n, device=embeds.device))
        causal = nn.Transformer.generate_square_subsequent_mask(n, device=embeds.device)
        for block in self.blocks:
            x = block(x, src_mask=causal, is_causal=True)
        x = self.ln_f(x)
        return getattr(self, self.head_name)(x) if self.head_name else x


class HandWrittenVLM(nn.Module):
    """``encoder`` (ViT) -> projector (a Linear or a 2-layer MLP, under any name) -> ``decoder`` (GPT)."""

    def __init__(self, proj: str = "proj", mlp: bool = False, proj_last: bool = False, head: str | None = "lm_head"):
        super().__init__()
        self.proj_name = proj
        projector: nn.Module = (
            nn.Sequential(nn.Linear(VISION, TEXT), nn.GELU(), nn.Linear(TEXT, TEXT)) if mlp else nn.Linear(VISION, TEXT)
        )
        self.encoder = Encoder()
        if not proj_last:
            setattr(self, proj, projector)
        self.decoder = Decoder(head)
        if proj_last:  # registered after the decoder: the widths still say what it is
            setattr(self, proj, projector)
        self.out = nn.Linear(TEXT, VOCAB) if head is None else None  # a top-level logits Linear

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        image = getattr(self, self.proj_name)(self.encoder(pixel_values))
        x = torch.cat([image, self.decoder.wte(input_ids)], dim=1)
        hidden = self.decoder(x)[:, image.shape[1] :]
        logits = self.out(hidden) if self.out is not None else hidden
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return {"loss": loss, "logits": logits}


def vlm_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 12), generator=g)
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 32, 32, generator=g), "labels": ids.clone()}


PROJECTOR_NAMES = ["proj", "mm_proj", "adapter", "bridge", "aligner"]


@pytest.mark.parametrize("mlp", [False, True], ids=["linear", "mlp"])
@pytest.mark.parametrize("proj", PROJECTOR_NAMES)
def test_a_hand_written_vlm_gets_its_roles_from_structure(proj: str, mlp: bool) -> None:
    gmap = build_groups(HandWrittenVLM(proj, mlp))
    assert {g.name: g.role for g in gmap} == {
        "encoder": "vision",  # it consumes the image (a Conv2d over 3 channels); its pooling `head` is its own
        proj: "connector",  # between the vision and the language part: a top-level Linear is no head
        "decoder": "language",  # it holds the token embedding
        "decoder.lm_head": "head",
    }
    assert [g.name for g in gmap.match("connector")] == [proj]


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "lora"])
def test_structure_not_names_settles_the_hand_written_vlm(wrapped: bool) -> None:
    # The projector registered after the decoder (no "between"): it maps into the language width.
    model: nn.Module = HandWrittenVLM("bridge", mlp=True, proj_last=True, head=None)
    if wrapped:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["linear1", "linear2"]))
    roles = {g.name: g.role for g in build_groups(model)}
    # An unnamed Linear of vocabulary width is the head; `bridge` is the connector.
    assert roles == {"encoder": "vision", "decoder": "language", "bridge": "connector", "out": "head"}


def test_a_hand_written_vlm_nested_the_transformers_5_way() -> None:
    outer = nn.Module()
    outer.model = HandWrittenVLM("aligner", head="logits")  # `model` holds vision and language: a container
    roles = {g.name: g.role for g in build_groups(outer)}
    assert roles == {
        "model.encoder": "vision",
        "model.aligner": "connector",
        "model.decoder": "language",
        "model.decoder.logits": "head",  # no name hint: the logits' width says it
    }
    assert [g.name for g in build_groups(outer).match("aligner")] == ["model.aligner"]


# Where only a name can tell: a connector nested inside the vision tower (Qwen2-VL's merger) and a bare
# parameter (BLIP-2's query_tokens).
NAME_ONLY = {"qwen2_vl": {"model.visual.merger"}, "qwen2_5_vl": {"model.visual.merger"}, "blip2": {"query_tokens"}}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_structure_alone_finds_every_familys_components(family: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The families' real module graphs as if nobody had told gradguard their names: no attribute-name or
    # class-name hints. The image convolution, the token embedding, the logits' width and the position
    # between them must give each family's reference roles.
    import gradguard.core.groups as groups

    monkeypatch.setattr(groups, "_role_hint", lambda segment: None)
    monkeypatch.setattr(groups, "_CLASS_HINTS", ())
    fam = FAMILIES[family]
    gmap = build_groups(fam.build())
    skip = NAME_ONLY.get(family, set())
    for info in gmap.by_param.values():
        ref = group_of(info.path, fam.roles)
        assert ref is not None
        if ref in skip:
            continue
        assert gmap.groups[info.group].role == fam.roles[ref], (info.path, info.group)


def test_a_top_level_linear_is_not_a_head_unless_it_produces_the_logits() -> None:
    lm = nn.Module()
    lm.decoder = Decoder(head=None)
    lm.value = nn.Linear(TEXT, 1)  # a value / reward projection: not the logits
    lm.unembed = nn.Linear(TEXT, VOCAB)  # the logits
    assert {g.name: g.role for g in build_groups(lm)} == {"decoder": "language", "value": "other", "unembed": "head"}


def test_expect_connector_on_the_hand_written_vlm() -> None:
    model = HandWrittenVLM("adapter", mlp=True)
    assert audit_requires_grad(model, expect_trainable=["connector"]).ok
    model.adapter.requires_grad_(False)
    audit = audit_requires_grad(model, expect_trainable=["connector"])
    assert [(f.code, f.group) for f in audit.findings if f.severity == "error"] == [("GG001", "adapter")]
    # And in a real (smoke) run: the connector trains, the report calls it one.
    model.adapter.requires_grad_(True)
    report = smoke_test(model, [vlm_batch(0), vlm_batch(1)], steps=3, expect_trainable=["connector", "vision"])
    assert report.ok, report.findings
    assert {g.name: g.role for g in report.groups}["adapter"] == "connector"


# -- groups= patterns ---------------------------------------------------------------------------------------


def test_a_groups_pattern_that_matches_nothing_is_an_error() -> None:
    with pytest.raises(ConfigurationError) as err:
        audit_requires_grad(tiny_llava(), groups={"vision_encoder.*": "vision"})
    msg = str(err.value)
    assert "groups= pattern 'vision_encoder.*' matches no parameter of this model" in msg
    assert "Top-level modules: model, lm_head" in msg and "'vision_tower'" in msg
    with pytest.raises(ConfigurationError, match="vision_encoder"):  # the engine (GradGuard, Guard) says the same
        Guard(tiny_llava(), groups={"vision_encoder.*": "vision"}, console=False)


def test_a_groups_pattern_that_matches_gives_its_role() -> None:
    # Fuyu's shape: image patches go through a plain Linear, which no structure can tell from any other.
    model = nn.Module()
    model.image_in = nn.Linear(3 * 8 * 8, TEXT)
    model.decoder = Decoder()
    assert {g.name: g.role for g in build_groups(model)}["image_in"] == "other"
    gmap = build_groups(model, {"image_in": "vision"})  # a target that is a role names the group and gives it
    assert (gmap.groups["vision"].role, [p.path for p in gmap.groups["vision"].params]) == (
        "vision",
        ["image_in.weight", "image_in.bias"],
    )
    # The pattern of the issue, on a model that has such modules: no error, the role it says.
    model.vision_encoder = Encoder()
    assert build_groups(model, {"vision_encoder.*": "vision"}).groups["vision"].role == "vision"


@pytest.mark.parametrize("layout", ["v4", "v5"])
def test_groups_patterns_use_the_same_rule(layout: str) -> None:
    model = _layout(layout)
    # A module's short name, or a glob over a path's last segments: the same on both layouts.
    for pattern in (
        "vision_tower",
        "vision_tower.*",
        "model.vision_tower",
        "model.vision_tower.*",
        "base_model.model.vision_tower",
    ):
        gmap = build_groups(model, {pattern: "vit:vision", "multi_modal_projector": "bridge"})
        assert {g.name: g.role for g in gmap}["vit"] == "vision"
        assert gmap.groups["bridge"].role == "connector"  # no role given: detection's
        assert not any(g.name.endswith("vision_tower") for g in gmap)
    with pytest.raises(ConfigurationError, match=r"groups= pattern 'layers' is ambiguous"):
        build_groups(model, {"layers": "blocks"})


# -- the other entry points -------------------------------------------------------------------------------


def test_track_requires_grad_takes_short_names_and_rejects_bad_ones_before_the_block() -> None:
    model = tiny_llava()
    model.requires_grad_(False)
    model.model.vision_tower.requires_grad_(True)
    with (
        pytest.warns(FrozenByWrapWarning, match="model.vision_tower"),
        track_requires_grad(model, expect_trainable=["vision_tower"]) as changes,
    ):
        model = get_peft_model(model, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)"))
    assert changes.suspicious == ["model.vision_tower"]
    ran = False
    with (
        pytest.raises(ConfigurationError, match="'vision_towr' matches no module group"),
        track_requires_grad(tiny_llava(), expect_trainable=["vision_towr"]),
    ):
        ran = True
    assert not ran


def test_smoke_test_takes_short_names() -> None:
    model = tiny_llava()
    report = smoke_test(model, [make_batch(model)], steps=2, expect_trainable=["vision_tower", "language_model"])
    assert report.ok, report.findings
    assert {g.alias for g in report.groups} == {None, "vision_tower", "language_model"}


def test_cli_expect_takes_short_names(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from gradguard.cli import main

    monkeypatch.setenv("COLUMNS", "200")
    target = "gradguard.testing.models:tiny_llava"
    lm_only = r".*language_model.*\.(q_proj|v_proj)"
    code = main(["audit", target, "--lora-target", lm_only, "--expect", "vision_tower,language_model"])
    out = capsys.readouterr().out
    assert code == 1 and "GG001" in out and "model.vision_tower (vision_tower)" in out
    assert "(selected by 'vision_tower')" in out
    code = main(["audit", target, "--expect", "q_proj"])
    err = capsys.readouterr().err
    assert code == 2 and "--expect entry 'q_proj' is ambiguous" in err


def test_resolve_intent_rejects_what_is_not_a_name() -> None:
    gmap = build_groups(tiny_llava())
    with pytest.raises(ConfigurationError, match="non-empty strings"):
        resolve_intent(gmap, ["vision_tower", ""])
    with pytest.raises(ConfigurationError, match="must be a non-empty string"):
        gmap.resolve(None)  # type: ignore[arg-type]
