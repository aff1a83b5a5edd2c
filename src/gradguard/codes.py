"""Finding codes: the single source of every rule's explanation.

Each rule is explained once, here, in ruff's manner: what it means, why it matters, an example of the
failing set-up, the fix, and known limits. ``docs/codes/*.md`` and ``gradguard explain GG…`` are
generated from this table (``python -m gradguard.codes docs/codes`` rewrites the pages; a test keeps
them in sync).

Codes ``GG0xx`` come from the static audit (before a step runs), ``GG1xx`` from the running guard,
``GG9xx`` are about gradguard itself.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Rule:
    code: str
    kind: str
    severity: Severity  # default severity; a rule may raise it (e.g. when the user's intent is violated)
    title: str
    what: str
    why: str
    example: str
    fix: str
    limits: str = ""

    def markdown(self) -> str:
        """The rule's docs page."""
        parts = [
            f"# {self.code} `{self.kind}`: {self.title}",
            f"Default severity: **{self.severity}**",
            f"## What it means\n{self.what}",
            f"## Why it matters\n{self.why}",
            f"## Example\n```python\n{self.example.strip()}\n```",
            f"## Fix\n```python\n{self.fix.strip()}\n```",
        ]
        if self.limits:
            parts.append(f"## Known limits\n{self.limits}")
        return "\n\n".join(parts) + "\n"


_LORA_EXAMPLE = """
model = build_minicpmv()                      # children: vpm, resampler, llm
model.vpm.requires_grad_(True)                # tune_vision=True
model.resampler.requires_grad_(True)
model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
audit_requires_grad(model, expect_trainable=["vpm", "resampler"])  # GG001 for vpm and resampler
"""

_RULES = [
    Rule(
        "GG001",
        "frozen_expected_trainable",
        "error",
        "a group you expect to train is frozen",
        "A group named in `expect_trainable` (by name or role) has no parameter with `requires_grad=True`.",
        "The run will look normal (the loss goes down through the parts that do train) while this part "
        "never changes. The classic cause: `get_peft_model` sets `requires_grad=False` on everything that is "
        "not an adapter or listed in `modules_to_save`, silently undoing an earlier `requires_grad_(True)` "
        "(MiniCPM-V `tune_vision=True`, OpenBMB/MiniCPM-V#212).",
        _LORA_EXAMPLE,
        """
model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"],
                                         modules_to_save=["vpm", "resampler"]))
# or, after wrapping:  model.base_model.model.vpm.requires_grad_(True)
""",
        "Only `requires_grad` is checked here; whether the group really receives a gradient is checked "
        "while training (GG109).",
    ),
    Rule(
        "GG002",
        "trainable_expected_frozen",
        "warning",
        "a group you did not list trains its base weights",
        "`expect_trainable` was given and a group not selected by it has trainable *base* parameters "
        "(adapter parameters such as LoRA A/B are expected and do not count).",
        "Full-rank updates of a part you meant to keep frozen cost memory and can damage it (e.g. a "
        "language model fine-tuned in full by accident because LoRA was never applied).",
        """
model.llm.requires_grad_(True)          # forgot to freeze the language model
audit_requires_grad(model, expect_trainable=["resampler"])   # GG002 for llm
""",
        """
model.requires_grad_(False)
model.resampler.requires_grad_(True)
""",
    ),
    Rule(
        "GG003",
        "not_in_optimizer",
        "error",
        "trainable parameters are missing from the optimizer",
        "Some parameters have `requires_grad=True` but are in none of the optimizer's param groups.",
        "They receive gradients (costing compute and memory) but are never updated. It happens when the "
        "optimizer is built before a module is unfrozen or wrapped (huggingface/peft#1278).",
        """
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
model.resampler.requires_grad_(True)     # after the optimizer was built
audit_requires_grad(model, optimizer=optimizer)    # GG003 for resampler
""",
        """
model.resampler.requires_grad_(True)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
""",
    ),
    Rule(
        "GG004",
        "frozen_in_optimizer",
        "warning",
        "frozen parameters are in the optimizer",
        "Some parameters in the optimizer's param groups have `requires_grad=False`.",
        "They never get a gradient, so they never change, although the optimizer's list suggests they "
        "train. Often a sign that freezing happened after the optimizer was built, or that the wrong "
        "parameters were frozen.",
        """
optimizer = torch.optim.AdamW(model.parameters())
model.vpm.requires_grad_(False)          # frozen after the optimizer was built
""",
        """
model.vpm.requires_grad_(False)
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
""",
    ),
    Rule(
        "GG005",
        "no_trainable_params",
        "error",
        "nothing in the model is trainable",
        "No parameter of the model has `requires_grad=True` (or the model has no parameters at all).",
        "`loss.backward()` fails with 'element 0 of tensors does not require grad', or, with inputs that "
        "require grad, training runs and changes nothing.",
        """
model.requires_grad_(False)
model = get_peft_model(model, LoraConfig(target_modules=["not_a_module_name"]))  # matches nothing
""",
        """
model = get_peft_model(model, LoraConfig(target_modules=["q_proj", "v_proj"]))
model.print_trainable_parameters()
""",
    ),
    Rule(
        "GG006",
        "tied_weight_mismatch",
        "warning",
        "tied weights disagree about training",
        "The model ties its output embedding to its input embedding, but the two are now different "
        "tensors with different `requires_grad` (or only one of them is trainable).",
        "A tie that PEFT's `modules_to_save=['lm_head']` or a trainable-tokens set-up broke: one side "
        "trains, the other does not, and saving or merging produces inconsistent weights "
        "(huggingface/peft#1462, #2777).",
        """
model = get_peft_model(model, LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
# lm_head is now a trainable copy; embed_tokens stays frozen and no longer tied
""",
        """
LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"])
# or PEFT's ensure_weight_tying=True where your PEFT version supports it
""",
    ),
    Rule(
        "GG007",
        "partial_freeze",
        "info",
        "a group is partly frozen",
        "Inside one group, a small minority of the base parameter tensors differs in `requires_grad` from the rest.",
        "Often intended (frozen embeddings, frozen first layers) but sometimes an accident: a name "
        "filter that matched too much or too little.",
        """
for name, p in model.vpm.named_parameters():
    p.requires_grad = "layers.1" in name     # meant "layers.1*" but froze layers.10, .11 …
""",
        "# Check the listed parameter names; freeze or unfreeze by module, not by substring.",
        "Informational only: gradguard cannot know your intent here.",
    ),
    Rule(
        "GG008",
        "fp16_trainable",
        "warning",
        "trainable parameters are stored in float16",
        "Some trainable parameters have dtype float16.",
        "Optimizer updates below fp16's resolution are lost, Adam's state overflows, and "
        "`torch.amp.GradScaler` refuses to unscale fp16 gradients ('Attempting to unscale FP16 "
        "gradients'). Mixed precision keeps master weights in fp32.",
        """
model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float16)
Trainer(model, TrainingArguments(fp16=True, ...))
""",
        """
model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)  # fp16=True autocasts
# or: keep the base in fp16 and train fp32 adapters only (PEFT does this for LoRA)
""",
    ),
    Rule(
        "GG009",
        "meta_params",
        "info",
        "parameters are on the meta device",
        "Some parameters have no data (meta device): the model was built with `init_empty_weights` or "
        "`device='meta'` and not materialised.",
        "The audit can still check structure and `requires_grad`, but no step can run: forward fails or "
        "trains nothing until weights are loaded.",
        """
with init_empty_weights():
    model = AutoModelForCausalLM.from_config(cfg)
""",
        """
model = AutoModelForCausalLM.from_config(cfg)   # or load_checkpoint_and_dispatch(...)
""",
    ),
    Rule(
        "GG101",
        "nonfinite_loss",
        "error",
        "the loss is NaN or Inf",
        "The raw loss of a micro-batch (the model's `outputs.loss`, before Trainer's bookkeeping) is not finite.",
        "Every gradient of the step becomes NaN, and without a GradScaler (bf16, fp32) the optimizer "
        "writes NaN into the weights; after that every step is NaN. Hugging Face Trainer's "
        "`logging_nan_inf_filter` (on by default) then logs `loss 0.0`, which hides it: "
        "`loss 0.0, grad_norm nan` is almost always a NaN loss (trl#6702, MiniCPM-V#212).",
        """
# fp16 overflow in the vision tower, or a connector that blows up:
Trainer(model, TrainingArguments(fp16=True, ...)).train()
# {'loss': 0.0, 'grad_norm': nan, ...}
""",
        """
# Read the report's origin: the group (and, after replay, the module) where the first non-finite value
# appeared. Then: bf16 instead of fp16, a lower learning rate, a fixed input, or a fixed layer.
Trainer(model, args, callbacks=[GradGuard()]).train()
""",
    ),
    Rule(
        "GG102",
        "nonfinite_grad",
        "error",
        "a gradient is NaN or Inf",
        "A parameter's gradient (read during backward, before clipping) is not finite while the loss is.",
        "Clipping with a NaN total norm multiplies every gradient by NaN, so one bad gradient poisons the "
        "whole update. The origin is a backward-only failure: a fully masked attention row, a custom "
        "autograd function, a FlashAttention backward bug (transformers#31997).",
        """
class Bad(torch.autograd.Function):      # identity forward, NaN backward
    @staticmethod
    def forward(ctx, x): return x
    @staticmethod
    def backward(ctx, g): return g * float("nan")
""",
        """
# Fix the layer the report names (phase `backward`); for attention masks, make sure no query row is
# fully masked (pytorch#103749).
""",
        "Under an fp16 GradScaler, a non-finite gradient with a finite loss is an ordinary overflow: the "
        "scaler skips the step and gradguard records it instead of raising this finding.",
    ),
    Rule(
        "GG103",
        "nonfinite_param",
        "error",
        "a weight is NaN or Inf",
        "A trainable parameter holds a non-finite value (checked at train begin, periodically, at the end, "
        "and after any step that was allowed to proceed with a fault).",
        "Once a weight is NaN, every later forward pass is NaN: the model is lost unless you go back to a checkpoint.",
        """
GradGuard(on_fault="warn")   # lets a NaN gradient through; AdamW writes it into the weights
""",
        """
GradGuard(on_fault="stop")   # default: the poisoned update is skipped, weights stay intact
# otherwise resume from the last checkpoint taken before the fault step
""",
    ),
    Rule(
        "GG104",
        "nonfinite_input",
        "error",
        "the batch contains NaN or Inf",
        "A floating-point input of the batch (`pixel_values`, `inputs_embeds`, audio features …) is not finite. "
        "The report names the input (`origin.module`) and the part of the model that took it in: the first "
        "group whose output went non-finite in that micro-batch (`origin.group`, e.g. the vision tower).",
        "The fault is in the data, not the model: a corrupt image, a division by a zero std in "
        "normalisation, a bad cached feature. Training on it poisons the weights.",
        """
batch["pixel_values"] = (img - mean) / std      # std == 0 for a blank channel
""",
        """
assert torch.isfinite(batch["pixel_values"]).all(), sample_id   # in your dataset / collator
""",
    ),
    Rule(
        "GG105",
        "no_supervision",
        "error",
        "a batch has no target tokens",
        "Every label of a micro-batch is `-100` (ignored), so there is nothing to learn from.",
        "Cross-entropy over zero tokens is NaN (a mean over nothing) or 0: the step is poisoned or wasted. "
        "The usual cause in vision-language fine-tuning: image tokens fill `model_max_length` and "
        "truncation cuts off the answer (lmms-finetune#43, LLaVA#816, trl#6668).",
        """
tok(prompt_with_576_image_tokens + answer, truncation=True, max_length=512)  # the answer is cut off
""",
        """
# raise model_max_length, or drop samples whose labels are all -100 in the collator:
batch = [s for s in batch if (s["labels"] != -100).any()]
""",
    ),
    Rule(
        "GG106",
        "loss_collapse",
        "warning",
        "the loss collapsed to zero",
        "A finite loss that started well above zero has stayed at (nearly) zero for several steps.",
        "Real models rarely reach zero loss; this usually means the labels leak into the inputs, the "
        "answer tokens are masked so only trivial tokens remain, or the loss is being computed on the "
        "wrong tensor.",
        """
labels = input_ids.clone()   # with a model that does not shift labels: it learns to copy
""",
        """
# check label shifting and masking; compare the number of supervised tokens per batch in the report
""",
        "A tiny data set memorised by a large model also reaches ~0: then this warning is expected.",
    ),
    Rule(
        "GG107",
        "loss_spike",
        "warning",
        "the loss spiked",
        "The loss jumped far above its recent level (median + k × MAD over a window of the run's own "
        "history; no fixed threshold).",
        "Spikes often precede divergence (peft#3073); a learning rate too high or a bad batch are the usual causes.",
        """
TrainingArguments(learning_rate=5e-3, warmup_steps=0)
""",
        """
TrainingArguments(learning_rate=2e-4, warmup_ratio=0.03, max_grad_norm=1.0)
""",
        "Judged after a warm-up of the detector's window; the first steps are never called spikes.",
    ),
    Rule(
        "GG108",
        "grad_explosion",
        "warning",
        "a group's gradient norm exploded",
        "A group's pre-clip gradient norm jumped far above its own recent level (robust statistics over "
        "the run's history: healthy norms range from 1e-3 to 1e3 across models).",
        "Clipping hides it from the logged `grad_norm` only partly; an exploding group is usually the "
        "next to produce Inf.",
        """
TrainingArguments(learning_rate=1e-2)   # the connector's gradients grow step after step
""",
        """
TrainingArguments(learning_rate=1e-4, max_grad_norm=1.0)   # or a lower LR for that group
""",
    ),
    Rule(
        "GG109",
        "dead_gradient",
        "warning",
        "a trainable group gets no gradient",
        "A group with trainable parameters ran its forward but received no gradient (`.grad` stayed `None`) "
        "or an exactly zero one, for several consecutive steps. An error when the group is in "
        "`expect_trainable`. Steps on which the group ran no forward (text-only batches never reach a vision "
        "tower) do not count: that is GG112.",
        "The group is meant to train but does not: its forward runs under `torch.no_grad` (LLaVA#305), "
        "reentrant gradient checkpointing cut the graph (peft#2880), or its output is detached.",
        """
with torch.no_grad():
    image_features = self.vision_tower(pixel_values)     # trainable tower, no gradient
""",
        """
image_features = self.vision_tower(pixel_values)
# with gradient checkpointing: gradient_checkpointing_kwargs={"use_reentrant": False}
# or model.enable_input_require_grads()
""",
        "LoRA's `lora_B` starts at zero, so `lora_A` gets an exactly zero gradient on the first step of a "
        "healthy run: gradguard judges a group, over several steps, never a single step. A group made of loose "
        "parameters (BLIP-2's `query_tokens`) has no forward to watch: it is judged on every step.",
    ),
    Rule(
        "GG110",
        "loss_scale_collapse",
        "error",
        "the fp16 loss scale keeps falling",
        "The GradScaler's scale has fallen step after step (each fall is an overflow and a skipped step) "
        "and is near its floor.",
        "An occasional skipped step is normal in fp16; a scale that keeps falling means most steps are "
        "skipped and nothing trains (DeepSpeed#4021).",
        """
TrainingArguments(fp16=True)   # activations overflow 65504 in the vision tower every step
""",
        """
TrainingArguments(bf16=True)   # bf16 has fp32's range; or find the overflowing module in the report
""",
    ),
    Rule(
        "GG111",
        "masked_nonfinite_log",
        "info",
        "the Trainer logged a NaN loss as 0.0",
        "Hugging Face Trainer's logs show `loss 0.0` (or a stale average) for a window in which the raw "
        "loss was NaN or Inf.",
        "`logging_nan_inf_filter=True` (the default) replaces a non-finite step loss with the running "
        "average, which is 0.0 right after a log event: `loss 0.0, grad_norm nan`.",
        """
TrainingArguments(logging_steps=1)   # {'loss': 0.0, 'grad_norm': nan}
""",
        """
TrainingArguments(logging_nan_inf_filter=False)   # to see the NaN in the logs; GradGuard reads it anyway
""",
    ),
    Rule(
        "GG112",
        "idle_group",
        "info",
        "a trainable group ran no forward for many steps",
        "No input reached a trainable group for `idle_steps` consecutive steps (default 50): its forward did "
        "not run, so it got no gradient and did not train on them. A warning at the end of the run when a group "
        "named in `expect_trainable` never ran at all.",
        "Real VLM instruction data mixes text-only samples, and on those the vision tower and the connector do "
        "not run: that is healthy, and gradguard does not call the group dead for it. But a vision tower that "
        "never sees an image (the image column dropped by the collator, `remove_unused_columns=True`, a prompt "
        "without the image token) trains on nothing.",
        """
dataset = text_only_samples           # no pixel_values in any batch
GradGuard(expect_trainable=["vision_tower"])   # GG112 warning at the end: vision_tower never ran
""",
        """
TrainingArguments(remove_unused_columns=False)  # keep pixel_values; and put the image token in the prompts
""",
        "Only groups whose root module gradguard hooks can be watched (not loose parameters).",
    ),
    Rule(
        "GG113",
        "unused_params",
        "info",
        "trainable tensors never get a gradient while their group runs",
        "Some trainable tensors of a group got no gradient on any step its forward ran, while the rest of the "
        "group did.",
        "They take optimizer memory and compute and learn nothing. The common case is by design: LLaVA reads "
        "the vision features from the second-to-last layer (`vision_feature_layer=-2`), so the last layer of the "
        "vision tower never gets a gradient; LoRA adapters put there are wasted.",
        """
config = LoraConfig(target_modules=["q_proj", "v_proj"], modules_to_save=["vision_tower"])
# LLaVA with vision_feature_layer=-2: the last CLIP layer's tensors never get a gradient (GG113)
""",
        """
model.model.vision_tower.vision_model.encoder.layers[-1].requires_grad_(False)  # or leave it out of LoRA
""",
    ),
    Rule(
        "GG114",
        "loss_divergence",
        "error",
        "the loss has diverged, with every number finite",
        "For `divergence_steps` steps in a row (default 3) the raw loss was far above where a sane run can be: "
        "`chance_factor` (2) times the loss of guessing uniformly over the vocabulary (`ln V`, when the loss is a "
        "cross-entropy over the logits' last dimension), or, without a vocabulary, `divergence_ratio` (10) times "
        "the run's first loss. No warm-up: it can fire from step 2. The first such step is a GG107 warning.",
        "A cross-entropy starts near `ln V` with random weights and only falls in a fine-tune: a loss several "
        "times above it means the model is confidently wrong, and every further step burns budget. NaN comes "
        "later, or never; spike detectors that compare against the run's own median wait for a warm-up and then "
        "compare against a median that has already diverged.",
        """
TrainingArguments(learning_rate=1.0)      # a typo for 1e-4: losses 5.6, 22, 16, 28, 31 ... never NaN
""",
        """
TrainingArguments(learning_rate=1e-4, warmup_ratio=0.03, max_grad_norm=1.0)
# to be warned only, not stopped:
GradGuard(severity={"loss_divergence": "warning"})
""",
        "A custom loss that is not a cross-entropy over the logits (a regression, a contrastive loss) is judged "
        "against its first value only.",
    ),
    Rule(
        "GG115",
        "no_update",
        "warning",
        "the weights of a trainable group do not move",
        "For `no_update_steps` optimizer steps in a row (default 5) the update changed a trainable group's "
        "weights by less than `no_update_ratio` (1e-8) of their norm, while gradients arrived and the learning "
        "rate was neither warming up nor decayed to under half its peak. Also reported before step 1 when the "
        "set-up makes it certain: a learning rate of 0 for a param group holding trainable tensors, LoRA with a "
        "scaling of 0 (`lora_alpha=0`), or (HF Trainer) a warm-up longer than the run. An error at runtime for a "
        "group named in `expect_trainable`.",
        "Nothing looks wrong in any log: gradients are finite and non-zero, the loss is flat or drifts with the "
        "data. The model just does not learn, for the whole budget.",
        """
TrainingArguments(max_steps=20, warmup_steps=10**6)    # a warm-up given in steps where a ratio was meant
TrainingArguments(learning_rate=0)
LoraConfig(r=8, lora_alpha=0)                          # scaling = lora_alpha / r = 0
""",
        """
TrainingArguments(max_steps=20, warmup_ratio=0.1, learning_rate=1e-4)
LoraConfig(r=8, lora_alpha=16)
""",
        "The ratio is measured on a fixed sample of each group's tensors (up to 16 tensors, 1024 values each): an "
        "update that moves only parameters outside the sample is not seen.",
    ),
    Rule(
        "GG116",
        "update_too_large",
        "warning",
        "one update rewrites a large part of the weights",
        "An optimizer step moved a trainable group's weights by more than `update_too_large` (0.5) of their "
        "norm. Healthy fine-tunes move them by about 1e-3 per step.",
        "Such a step erases what the weights knew; it usually comes with a learning rate that is orders of "
        "magnitude too high, and precedes a divergence (GG114).",
        """
torch.optim.AdamW(model.parameters(), lr=1.0)
""",
        """
torch.optim.AdamW(model.parameters(), lr=1e-4)   # with warm-up and clipping
""",
        "Weights that start at exactly zero (LoRA's B) have no norm to compare to: they are judged with the "
        "rest of their group.",
    ),
    Rule(
        "GG117",
        "not_learning",
        "error",
        "the set-up cannot learn a single repeated batch",
        "`smoke_test(..., expect_learning=True)` trained on one batch over and over and the loss did not fall "
        "by the stated factor (default: to 0.8 of its first value) within the steps given.",
        "Overfitting one batch is the oldest sanity check in deep learning: a set-up that cannot do it will not "
        "learn anything else. A CI smoke test that only checks for NaN passes on a model whose weights never "
        "move. The finding carries each group's update-to-weight ratio, which says which part did not move.",
        """
smoke_test(model, [batch], steps=20, optimizer=torch.optim.AdamW(params, lr=0), expect_learning=True)
""",
        """
smoke_test(model, [batch], steps=20, expect_learning=True)   # AdamW(lr=1e-3) by default
""",
    ),
    Rule(
        "GG901",
        "internal_error",
        "warning",
        "gradguard disabled itself after an internal error",
        "An exception was raised inside gradguard (a hook, a detector, a renderer). gradguard removed its "
        "hooks and stopped watching; your training went on.",
        "gradguard must never be the reason a run dies. The report keeps what was recorded until then.",
        """
GradGuard()   # hit a model shape gradguard does not handle
""",
        """
GradGuard(strict=True)   # in tests: let the exception propagate, and please report it
""",
    ),
]

RULES: dict[str, Rule] = {r.code: r for r in _RULES}
BY_KIND: dict[str, Rule] = {r.kind: r for r in _RULES}


def rule(code_or_kind: str) -> Rule:
    """Look a rule up by code (``"GG001"``) or kind (``"frozen_expected_trainable"``).

    >>> rule("GG101").kind
    'nonfinite_loss'
    """
    key = code_or_kind.strip()
    found = RULES.get(key.upper()) or BY_KIND.get(key)
    if found is None:
        raise KeyError(f"unknown finding code or kind {code_or_kind!r}; known codes: {', '.join(RULES)}")
    return found


def docs_index() -> str:
    rows = "\n".join(f"| [{r.code}]({r.code}.md) | `{r.kind}` | {r.severity} | {r.title} |" for r in _RULES)
    return (
        "# Finding codes\n\n"
        "Generated from `src/gradguard/codes.py` (`python -m gradguard.codes docs/codes`); also shown by "
        "`gradguard explain CODE`.\n\n"
        "| code | kind | default severity | meaning |\n|---|---|---|---|\n" + rows + "\n"
    )


def write_docs(folder: str | Path) -> list[Path]:
    """Write one Markdown page per rule and an index into ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for r in _RULES:
        path = out / f"{r.code}.md"
        path.write_text(r.markdown())
        written.append(path)
    (out / "README.md").write_text(docs_index())
    return [*written, out / "README.md"]


if __name__ == "__main__":  # pragma: no cover - a maintenance command
    for p in write_docs(sys.argv[1] if len(sys.argv) > 1 else "docs/codes"):
        print(p)
