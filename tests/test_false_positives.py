"""The false-positive budget: healthy training set-ups must produce no error and no warning.

More healthy look-alikes live beside the failures they resemble: text-only batches in VLM data
(tests/test_reliability_truth.py), evaluation forwards in train mode, memorising four examples for 300 steps and
a warm-up from learning rate 0 (tests/test_finite_failures.py).

Every detector added to gradguard has to stay quiet on all of these (a parametrized test, so a new
detector runs against each). The runs are long enough (25-30 optimizer steps) for the trend detectors
to be past their warm-up (20 steps), and vary what a detector might mistake for a fault: family, LoRA /
full / ``modules_to_save`` / partly frozen towers, gradient accumulation, bf16, gradient checkpointing,
dropout, a high-but-healthy and a tiny learning rate, a batch of one, and stated intent
(``expect_trainable``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from test_reliability_bitwise import Config, build_model, train, validate_report
from torch import nn

from gradguard import GradGuard
from gradguard.testing.models import tiny_qwen2


def _frozen_vision_llava(cfg: Config) -> nn.Module:
    """LLaVA stage 2: the vision tower frozen, projector and language model trained."""
    model = build_model(cfg)
    model.model.vision_tower.requires_grad_(False)
    return model


def _qwen2(cfg: Config) -> nn.Module:
    """Qwen2 with its weights stored in bf16 (no autocast, no fp32 master weights)."""
    return tiny_qwen2(seed=0).to(torch.bfloat16)


# (id, config, GradGuard kwargs, model builder or None)
CONNECTOR = {"expect_trainable": ["connector"]}
LLAVA_STAGE2 = {"expect_trainable": ["connector", "language", "head"]}
MINICPM_STORY = {"expect_trainable": ["vpm", "resampler"]}
HEALTHY: list[tuple[str, Config, dict[str, Any], Any]] = [
    ("llama-full", Config("llama", steps=30), {}, None),
    ("llama-lora", Config("llama", lora=True, lr=1e-3, steps=30), {}, None),
    ("llama-lora-mts-lm_head", Config("llama", lora=True, modules_to_save=("lm_head",), lr=5e-4, steps=25), {}, None),
    ("llama-bf16-accum4", Config("llama", bf16=True, accum=4, batch=1, steps=25), {}, None),
    ("llama-dropout-ckpt", Config("llama", dropout=0.1, checkpointing=True, steps=25), {}, None),
    ("llama-high-lr", Config("llama", lr=3e-3, steps=30), {}, None),
    ("llama-tiny-lr", Config("llama", lr=1e-8, steps=25), {}, None),
    ("llama-batch1-no-clip", Config("llama", batch=1, max_grad_norm=0.0, steps=30), {}, None),
    ("qwen2-full-bf16-model", Config("llama", model_bf16=True, steps=25), {}, _qwen2),
    (
        "llava-lora-mts",
        Config("llava", lora=True, modules_to_save=("multi_modal_projector",), steps=25),
        CONNECTOR,
        None,
    ),
    ("llava-frozen-vision", Config("llava", steps=25), LLAVA_STAGE2, _frozen_vision_llava),
    (
        "minicpmv2-lora-vision",
        Config("minicpmv2", lora=True, unfreeze=("vpm", "resampler"), steps=25),
        MINICPM_STORY,
        None,
    ),
    ("minicpmv2-full-ckpt-accum2", Config("minicpmv2", checkpointing=True, accum=2, steps=25), {}, None),
    ("llama-lora-ckpt", Config("llama", lora=True, checkpointing=True, lr=1e-3, steps=25), {}, None),
    (
        "llama-lora-ckpt-reentrant",
        Config(
            "llama",
            lora=True,
            checkpointing=True,
            lr=1e-3,
            steps=25,
            extra={"gradient_checkpointing_kwargs": {"use_reentrant": True}},
        ),
        {},
        None,
    ),
    (
        "llama-compiled",
        Config("llama", steps=25, extra={"torch_compile": True, "torch_compile_backend": "aot_eager"}),
        {},
        None,
    ),
]


@pytest.mark.parametrize(("cfg", "kwargs", "builder"), [h[1:] for h in HEALTHY], ids=[h[0] for h in HEALTHY])
def test_healthy_run_is_quiet(cfg: Config, kwargs: dict[str, Any], builder: Any) -> None:
    model = builder(cfg) if builder else None
    callback = GradGuard(console=False, **kwargs)
    run = train(cfg, [callback], model=model)
    report = run.report
    assert report is not None
    validate_report(report)
    assert run.trainer.state.global_step == cfg.steps, "gradguard stopped a healthy run"
    noisy = [f for f in report["findings"] if f["severity"] in ("error", "warning")]
    for f in noisy:  # shown in the test output when it fails
        print(f"{f['severity']} {f['code']} {f['kind']} [{f['group']}]: {f['message']}")
    assert report["status"] == "healthy" and report["fault"] is None
    assert not [f for f in noisy if f["severity"] == "error"], noisy
    assert not noisy, f"warnings on a healthy run: {[f['code'] + ' ' + f['message'] for f in noisy]}"
    assert not report["environment"]["disabled"]
