"""The static audit and track_requires_grad, on real transformers / peft objects."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from gradguard import Report, audit_requires_grad, track_requires_grad
from gradguard.core.track import FrozenByWrapWarning
from gradguard.testing.models import tiny_llama, tiny_minicpmv2

LORA = dict(r=4, target_modules=["q_proj", "v_proj"])
# As MiniCPM-V's finetune.py does: LoRA on the language model's attention only (the SigLIP tower has
# q_proj / v_proj too).
LLM_LORA = dict(r=4, target_modules=r"llm\..*layers\.\d+\.self_attn\.(q_proj|v_proj)")


def seed_model(**lora_extra):
    """The seed story: tune_vision=True (vpm, resampler trainable), then LoRA on the llm."""
    model = tiny_minicpmv2()
    model.requires_grad_(False)
    model.vpm.requires_grad_(True)
    model.resampler.requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught, track_requires_grad(model) as changes:
        warnings.simplefilter("always")
        model = get_peft_model(model, LoraConfig(**LLM_LORA, **lora_extra))
    return model, changes, caught


def codes(audit, code):
    return [f.group for f in audit.findings if f.code == code]


@pytest.mark.parametrize("intent", [["vpm", "resampler"], ["vision", "connector"]], ids=["names", "roles"])
def test_seed_frozen_by_get_peft_model(intent) -> None:
    model, _, _ = seed_model()
    audit = audit_requires_grad(model, expect_trainable=intent)
    assert not audit.ok
    assert codes(audit, "GG001") == ["vpm", "resampler"]
    vpm = next(f for f in audit.findings if f.group == "vpm")
    assert vpm.kind == "frozen_expected_trainable" and vpm.severity == "error"
    assert "0 of" in vpm.message and "base params trainable" in vpm.message
    assert "modules_to_save=['vpm']" in vpm.hint
    text = str(audit)
    assert "audit: NOT ok" in text and "vpm" in text and "frozen" in text


def test_seed_fixed_with_modules_to_save() -> None:
    model, changes, caught = seed_model(modules_to_save=["vpm", "resampler"])
    audit = audit_requires_grad(model, expect_trainable=["vpm", "resampler"])
    assert audit.ok, audit
    states = {g.name: g.state for g in audit.groups}
    # A modules_to_save module trains in full (through PEFT's copy): "trainable", not "adapters".
    assert states["vpm"] == "trainable" and states["resampler"] == "trainable" and states["llm"] == "adapters"
    assert not changes.suspicious and not [w for w in caught if w.category is FrozenByWrapWarning]
    assert set(changes.copied) == {"vpm", "resampler"} and not changes.frozen
    assert "resampler (connector): trains 23.7K as a modules_to_save copy" in str(changes)


@pytest.mark.parametrize("modules_to_save", [None, ["resampler"], ["vpm", "resampler"]])
def test_group_counts_add_up_on_a_real_peft_model(modules_to_save) -> None:
    """params = trainable + frozen over each module's own weights, counted once; adapters apart (issue 15)."""
    model, _, _ = seed_model(modules_to_save=modules_to_save)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    audit = audit_requires_grad(model, optimizer=optimizer)
    bare = {name: sum(p.numel() for p in getattr(tiny_minicpmv2(), name).parameters()) for name in ("vpm", "resampler")}
    saved = set(modules_to_save or [])
    by_name = {g.name: g for g in audit.groups}
    for g in audit.groups:
        assert g.trainable + g.frozen == g.params, g
        assert 0 <= g.adapter_trainable <= g.adapter_params
        assert g.in_optimizer == g.trainable + g.adapter_trainable
    for name in ("vpm", "resampler"):
        g = by_name[name]
        assert g.params == bare[name]  # the copy is not counted twice, and the original not beside it
        if name in saved:  # trained in full through the copy: all of it trainable, no adapter
            assert (g.trainable, g.frozen, g.adapter_params, g.state) == (bare[name], 0, 0, "trainable")
        else:
            assert (g.trainable, g.frozen, g.adapter_params, g.state) == (0, bare[name], 0, "frozen")
    llm = by_name["llm"]
    assert llm.trainable == 0 and llm.adapter_params == llm.adapter_trainable > 0 and llm.state == "adapters"
    # Every tensor of the model is counted once, except the frozen originals PEFT keeps beside the copies.
    originals = sum(bare[name] for name in saved)
    total = sum(p.numel() for p in model.parameters())
    assert sum(g.params + g.adapter_params for g in audit.groups) == total - originals


def test_track_requires_grad_reports_what_get_peft_model_froze(caplog) -> None:
    with caplog.at_level("WARNING", logger="gradguard"):
        _, changes, caught = seed_model()
    assert set(changes.frozen) == {"vpm", "resampler"}
    assert changes.suspicious == ["vpm", "resampler"]
    assert changes.added["llm"] > 0  # the LoRA adapters
    assert [w for w in caught if w.category is FrozenByWrapWarning]
    assert "froze vpm, resampler" in caplog.text
    assert "vpm (vision): froze" in str(changes)


def test_track_requires_grad_is_quiet_for_plain_lora_on_a_fresh_model() -> None:
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenByWrapWarning)
        with track_requires_grad(model) as changes:
            get_peft_model(model, LoraConfig(**LORA))
    assert changes.frozen and not changes.suspicious  # freezing a fresh model is what LoRA is for


def test_optimizer_built_before_unfreezing() -> None:
    model = tiny_minicpmv2()
    model.requires_grad_(False)
    model.llm.requires_grad_(True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model.resampler.requires_grad_(True)
    audit = audit_requires_grad(model, optimizer=opt)
    assert codes(audit, "GG003") == ["resampler"] and not audit.ok


def test_frozen_param_inside_optimizer() -> None:
    model = tiny_minicpmv2()
    opt = torch.optim.AdamW(model.parameters())
    model.vpm.requires_grad_(False)
    audit = audit_requires_grad(model, optimizer=opt)
    assert codes(audit, "GG004") == ["vpm"]
    assert audit.ok  # a warning: wasteful, not broken


def test_trainable_expected_frozen_is_a_warning() -> None:
    model = tiny_minicpmv2()  # everything trainable
    audit = audit_requires_grad(model, expect_trainable=["resampler"])
    assert set(codes(audit, "GG002")) == {"vpm", "llm", "llm.lm_head"} and audit.ok


def test_scale_meta_device_llama_lora() -> None:
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=4,
        vocab_size=32000,
    )
    with init_empty_weights():
        model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    audit = audit_requires_grad(model, expect_trainable=["language"])
    assert audit.ok
    assert [f.code for f in audit.findings] == ["GG009"]  # meta params: structure-only audit
    assert {g.name for g in audit.groups} == {"model", "lm_head"}


# -- bad input: a clear finding or a clear TypeError / ValueError ------------------------------------------


def test_no_parameters() -> None:
    audit = audit_requires_grad(nn.ReLU())
    assert codes(audit, "GG005") == [None] and "no parameters" in audit.findings[0].message


def test_no_trainable_parameters() -> None:
    model = tiny_llama().requires_grad_(False)
    audit = audit_requires_grad(model)
    assert [f.code for f in audit.findings] == ["GG005"] and not audit.ok


def test_tied_weights_broken_by_modules_to_save() -> None:
    model = tiny_llama(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model = get_peft_model(model, LoraConfig(**LORA, modules_to_save=["lm_head"]))
    audit = audit_requires_grad(model)
    assert "GG006" in [f.code for f in audit.findings]


def test_fp16_trainable_params() -> None:
    audit = audit_requires_grad(tiny_llama().half())
    assert set(codes(audit, "GG008")) == {"model", "lm_head"}


def test_partial_freeze_is_informational() -> None:
    model = tiny_llama()
    model.model.layers[1].input_layernorm.weight.requires_grad_(False)
    audit = audit_requires_grad(model)
    assert codes(audit, "GG007") == ["model"] and audit.ok


def test_unknown_expect_trainable_names_the_groups() -> None:
    with pytest.raises(ValueError, match=r"'vmp' matches no module group.*Did you mean 'vpm'"):
        audit_requires_grad(tiny_minicpmv2(), expect_trainable=["vmp"])


def test_expect_trainable_string_and_bad_types() -> None:
    assert audit_requires_grad(tiny_minicpmv2(), expect_trainable="vpm").ok
    with pytest.raises(TypeError, match="expect_trainable"):
        audit_requires_grad(tiny_minicpmv2(), expect_trainable=[3])  # type: ignore[list-item]


def test_non_module_arguments() -> None:
    with pytest.raises(TypeError, match="torch.nn.Module"):
        audit_requires_grad("meta-llama/Llama-3-8B")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimizer"):
        audit_requires_grad(tiny_llama(), optimizer=[1, 2])


def test_audit_dict_and_report_round_trip() -> None:
    model, _, _ = seed_model()
    audit = audit_requires_grad(model, expect_trainable=["vpm"])
    data = json.loads(json.dumps(audit.to_dict()))
    assert data["ok"] is False and {g["name"] for g in data["groups"]} == {"vpm", "resampler", "llm", "llm.lm_head"}
    report = audit.to_report()
    assert Report.from_dict(json.loads(report.to_json())) == report
