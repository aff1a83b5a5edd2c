"""Tests for the tiny random-weight model zoo in :mod:`gradguard.testing.models`."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments, default_data_collator

from gradguard.testing import models
from gradguard.testing.models import (
    FAMILIES,
    IMAGE_TOKEN_ID,
    ROLES,
    SKIPPED,
    Family,
    MiniCPMV2,
    MiniCPMV2Config,
    TinyDataset,
    available,
    family_of,
    group_of,
    make_batch,
    tiny_llama,
    tiny_minicpmv2,
)

# Every family the zoo knows; the ones the installed transformers lacks are reported as skipped, with the reason.
FAMILY_NAMES = [
    *sorted(FAMILIES),
    *(pytest.param(name, marks=pytest.mark.skip(reason=f"{name}: {why}")) for name, why in sorted(SKIPPED.items())),
]
ALL_FAMILIES = {
    "llama", "qwen2", "minicpmv2", "llava", "minicpmv4_6", "idefics2", "idefics3", "smolvlm",
    "qwen2_vl", "qwen2_5_vl", "blip2", "paligemma", "gemma3", "internvl", "mllama",
}  # fmt: skip
# What the oldest supported transformers (4.46) already has: never skipped.
ALWAYS = {"llama", "qwen2", "minicpmv2", "llava", "idefics2", "idefics3", "qwen2_vl", "blip2", "paligemma", "mllama"}


def _forward_backward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.train()
    out = model(**batch)
    loss = out.loss
    assert loss is not None and loss.dim() == 0, "expected a scalar loss"
    assert torch.isfinite(loss), f"non-finite loss {loss}"
    loss.backward()
    return loss


def _check_grads(model: torch.nn.Module, family: Family) -> None:
    missing = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            if not (family.no_grad_params and name.startswith(family.no_grad_params)):
                missing.append(name)
            continue
        assert torch.isfinite(p.grad).all(), f"non-finite grad in {name}"
    assert not missing, f"parameters without a gradient: {missing[:5]}"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_builds_trains_and_is_covered(name: str) -> None:
    family = FAMILIES[name]
    assert family.name == name
    family.roles  # noqa: B018 - resolving the layout imports the family's modules: time the build, not the import
    start = time.perf_counter()
    model = family.build()
    assert time.perf_counter() - start < 2.0, "tiny model took too long to build"
    assert family_of(model) is family

    n_params = sum(p.numel() for p in model.parameters())
    assert 50_000 < n_params < 3_000_000

    # Roles: valid names, and every parameter (tied copies included) under exactly one group path.
    assert set(family.roles.values()) <= set(ROLES)
    assert {"language", "head"} <= set(family.roles.values())
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    uncovered = [n for n in names if group_of(n, family.roles) is None]
    assert not uncovered, f"parameters outside every roles path: {uncovered[:5]}"
    for path in family.roles:
        assert any(n == path or n.startswith(path + ".") for n in names), f"roles path {path!r} matches nothing"

    batch = make_batch(model, batch_size=2, seq_len=24, seed=0)
    assert batch["input_ids"].shape == (2, 24)
    assert (batch["labels"] != -100).any()
    assert (batch["labels"][batch["input_ids"] == IMAGE_TOKEN_ID] == -100).all()
    _forward_backward(model, batch)
    _check_grads(model, family)

    # No dead parameter by construction: every one (bar the family's documented exceptions) gets a
    # non-zero gradient, so gradguard's dead-gradient checks have a clean baseline.
    dead = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.any()]
    assert not dead, f"all-zero gradients: {dead[:5]}"


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_with_lora(name: str) -> None:
    family = FAMILIES[name]
    model = get_peft_model(family.build(), LoraConfig(r=4, target_modules=family.lora_targets))
    assert family_of(model) is family
    lora = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora, "LoRA attached to nothing"
    _forward_backward(model, make_batch(model))
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), n


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_language_only_lora_regex(name: str) -> None:
    family = FAMILIES[name]
    model = get_peft_model(family.build(), LoraConfig(r=4, target_modules=family.language_lora_regex))
    bare = model.get_base_model()
    adapted = {n.split(".lora_A")[0] for n, _ in bare.named_parameters() if ".lora_A" in n}
    assert adapted
    assert {family.roles[group_of(n, family.roles)] for n in adapted} == {"language"}


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_dataset_with_default_collator(name: str) -> None:
    """What a HF Trainer does with TinyDataset: default_data_collator, then forward/backward."""
    family = FAMILIES[name]
    model = family.build()
    ds = TinyDataset(model, n=3, seq_len=24)
    assert len(ds) == 3
    assert ds[0]["input_ids"].shape == (24,)
    batch = default_data_collator([ds[i] for i in range(3)])
    _forward_backward(model, batch)


def test_the_zoo_tells_what_it_can_build_and_why_not() -> None:
    assert available() == sorted(FAMILIES)
    assert set(FAMILIES) | set(SKIPPED) == ALL_FAMILIES
    assert not set(FAMILIES) & set(SKIPPED)
    assert set(FAMILIES) >= ALWAYS, f"skipped on transformers {transformers.__version__}: {dict(SKIPPED)}"
    for name, why in SKIPPED.items():
        assert transformers.__version__ in why, why
        # A skip is honest only if the family really cannot be built here, not because its build broke.
        with pytest.raises(ImportError):
            getattr(models, f"tiny_{name}")()
    with pytest.raises(KeyError):
        FAMILIES["nope"]


_TOP_LEVEL = {"multi_modal_projector", "language_model.model", "language_model.lm_head"}
LEGACY_ROLES = {  # transformers < 4.52: the components at the top level
    "llava": {"vision_tower", *_TOP_LEVEL},
    "paligemma": {"vision_tower", *_TOP_LEVEL},
    "mllama": {"vision_model", *_TOP_LEVEL},
    "qwen2_vl": {"visual", "visual.merger", "model", "lm_head"},
}


@pytest.mark.parametrize("name", sorted(LEGACY_ROLES))
def test_roles_name_the_components_of_the_installed_layout(name: str) -> None:
    family = FAMILIES[name]
    model = family.build()
    vision_attr = next(p for p, r in family.layout.items() if r == "vision").split(".")[-1]
    legacy = not hasattr(getattr(model, "model", None), vision_attr)  # 5.x: model.<vision>, 4.x: <vision>
    assert set(family.roles) == (LEGACY_ROLES[name] if legacy else set(family.layout))
    (vision,), (language,), (head,) = family.paths("vision"), family.paths("language"), family.paths("head")
    assert "Vision" in type(model.get_submodule(vision)).__name__
    assert hasattr(model.get_submodule(language), "embed_tokens")
    lm_head = model.get_submodule(head)
    assert isinstance(lm_head, torch.nn.Linear) and lm_head.out_features == models.VOCAB_SIZE
    for prefix in family.no_grad_params:
        assert any(n.startswith(prefix + ".") for n, _ in model.named_parameters()), prefix


def test_minicpmv2_config_round_trips_through_save_and_load(tmp_path) -> None:
    config = MiniCPMV2Config(num_query=4, vision_config={"hidden_size": 16, "intermediate_size": 32,
                                                         "num_hidden_layers": 1, "num_attention_heads": 2,
                                                         "image_size": 32, "patch_size": 8})  # fmt: skip
    assert config.vision_config.hidden_size == 16 and config.text_config.hidden_size == 64
    assert config.hidden_size == 64 and config.vocab_size == models.VOCAB_SIZE
    as_dict = config.to_dict()
    assert as_dict["vision_config"]["hidden_size"] == 16 and as_dict["num_query"] == 4
    torch.manual_seed(0)
    model = MiniCPMV2(config)
    model.save_pretrained(tmp_path)
    loaded = MiniCPMV2.from_pretrained(tmp_path)
    assert isinstance(loaded.config, MiniCPMV2Config)
    assert loaded.config.num_query == 4 and loaded.config.vision_config.hidden_size == 16
    assert type(loaded.config.text_config) is type(config.text_config)
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(loaded.resampler.pos_embed, model.resampler.pos_embed)  # non-persistent: rebuilt on load
    batch = make_batch(loaded, batch_size=1, seq_len=12)
    assert torch.isfinite(loaded(**batch).loss)


def test_seeding_is_deterministic() -> None:
    a, b, c = tiny_minicpmv2(seed=0), tiny_minicpmv2(seed=0), tiny_minicpmv2(seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not torch.equal(a.resampler.kv_proj.weight, c.resampler.kv_proj.weight)
    assert all(torch.equal(make_batch(a)[k], make_batch(a)[k]) for k in make_batch(a))


def test_llama_config_overrides() -> None:
    model = tiny_llama(hidden_size=128, num_hidden_layers=4)
    assert model.config.hidden_size == 128 and len(model.model.layers) == 4
    _forward_backward(model, make_batch(model))


def test_minicpmv2_layout_and_gradient_checkpointing() -> None:
    model = tiny_minicpmv2()
    assert [n for n, _ in model.named_children()] == ["vpm", "resampler", "llm"]
    assert {n for n, _ in model.resampler.named_children()} >= {"kv_proj", "attn", "ln_q", "ln_kv", "ln_post"}
    assert isinstance(model.resampler.attn, torch.nn.MultiheadAttention)
    assert {n for n, _ in model.resampler.named_parameters(recurse=False)} == {"query", "proj"}
    assert model.get_input_embeddings() is model.llm.get_input_embeddings()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model.gradient_checkpointing_enable()
    assert model.llm.model.gradient_checkpointing
    _forward_backward(model, make_batch(model))
    _check_grads(model, FAMILIES["minicpmv2"])


def test_minicpmv2_peft_modules_to_save() -> None:
    model = get_peft_model(
        tiny_minicpmv2(),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["resampler"]),
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("resampler" in n for n in trainable)
    _forward_backward(model, make_batch(model))


def test_make_batch_rejects_short_sequences() -> None:
    with pytest.raises(ValueError):
        make_batch(tiny_minicpmv2(), seq_len=8)


@pytest.mark.parametrize("name", ["minicpmv2", "llava"])
def test_hf_trainer_runs(name: str, tmp_path) -> None:
    family = FAMILIES[name]
    model = family.build()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        remove_unused_columns=not family.needs_remove_unused_columns,
    )
    trainer = Trainer(model, args=args, train_dataset=TinyDataset(model))
    result = trainer.train()
    assert result.global_step == 2
    assert torch.isfinite(torch.tensor(result.training_loss))


def test_minicpmv2_is_a_pretrained_model() -> None:
    model = tiny_minicpmv2()
    assert isinstance(model, MiniCPMV2)
    out = model(**make_batch(model))
    assert out.logits.shape[:2] == (2, 24)
