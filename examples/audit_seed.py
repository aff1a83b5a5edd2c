"""The seed story, statically: MiniCPM-V with `tune_vision=True`, then LoRA, audited before training.

`get_peft_model` sets requires_grad=False on everything that is not an adapter or in modules_to_save,
silently undoing the `requires_grad_(True)` on the vision tower and the resampler. gradguard catches it
twice: `track_requires_grad` around the wrapping call, and `audit_requires_grad` with the user's intent.

Run: python examples/audit_seed.py
"""

from __future__ import annotations

import warnings

from peft import LoraConfig, get_peft_model
from rich.console import Console

from gradguard import audit_requires_grad, track_requires_grad
from gradguard.testing.models import tiny_minicpmv2

console = Console()
LLM_LORA = r"llm\..*layers\.\d+\.self_attn\.(q_proj|v_proj)"  # MiniCPM-V finetune.py's LoRA target


def build(modules_to_save: list[str] | None = None):
    model = tiny_minicpmv2()  # vpm (SigLIP) + resampler + llm (Qwen2), random weights
    model.requires_grad_(False)
    model.vpm.requires_grad_(True)  # tune_vision=True
    model.resampler.requires_grad_(True)
    with track_requires_grad(model) as changes:
        model = get_peft_model(model, LoraConfig(r=8, target_modules=LLM_LORA, modules_to_save=modules_to_save))
    return model, changes


warnings.simplefilter("ignore")
console.rule("1. LoRA wrapping as in the bug report")
model, changes = build()
console.print("what get_peft_model changed:", changes)
audit = audit_requires_grad(model, expect_trainable=["vpm", "resampler"])
console.print(audit)

console.rule("2. The fix: modules_to_save=['vpm', 'resampler']")
model, changes = build(modules_to_save=["vpm", "resampler"])
audit = audit_requires_grad(model, expect_trainable=["vpm", "resampler"])
console.print(audit)
assert audit.ok, audit
