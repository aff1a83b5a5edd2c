"""Observational guarantee: a healthy run with ``GradGuard()`` attached is bitwise identical to one without.

Each configuration trains the same seeded model twice in the real HF ``Trainer`` (CPU), once bare and once
with the callback, and compares everything training produces: the Trainer's own log values at every step
(``logging_steps=1``; gradguard adds ``gradguard/*`` keys, which are left out), the final weights and the
optimizer state (``torch.equal``, so bitwise), and the scheduler's learning rate.

The matrix covers every family (tiny Llama, tiny LLaVA, the MiniCPM-V-2.x-shaped model), precision (fp32,
``TrainingArguments(bf16=True)`` autocast, a model stored in bf16) and set-up (LoRA, full fine-tune,
``modules_to_save``, gradient accumulation 2 and 4, gradient checkpointing, dropout) at least once, without
multiplying everything out.

The helpers here (:func:`train`, :class:`Config`) are reused by the other reliability tests.
"""

from __future__ import annotations

import functools
import json
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

from gradguard import GradGuard
from gradguard.testing.models import FAMILIES, TinyDataset, tiny_llama, tiny_llava, tiny_minicpmv2

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "src" / "gradguard" / "report" / "schema.json"
# Log keys that measure time, not training.
TIMING_KEYS = {"train_runtime", "train_samples_per_second", "train_steps_per_second"}
FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "llama": tiny_llama,
    "llava": tiny_llava,
    "minicpmv2": tiny_minicpmv2,
}


@dataclass(frozen=True)
class Config:
    """One training set-up, small enough to run in well under a second on CPU."""

    family: str = "llama"
    lora: bool = False
    lora_all: bool = False  # LoRA on q/v everywhere (vision tower included), not just the language model
    modules_to_save: tuple[str, ...] = ()
    unfreeze: tuple[str, ...] = ()  # modules made trainable after get_peft_model (the MiniCPM-V story)
    bf16: bool = False  # TrainingArguments(bf16=True): autocast on CPU
    model_bf16: bool = False  # weights stored in bf16
    accum: int = 1
    checkpointing: bool = False
    dropout: float = 0.0
    lr: float = 5e-5
    batch: int = 2
    steps: int = 4
    max_grad_norm: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def id(self) -> str:
        parts = [self.family, "bf16-model" if self.model_bf16 else "bf16" if self.bf16 else "fp32"]
        parts.append("lora" if self.lora else "full")
        if self.modules_to_save:
            parts.append("mts")
        if self.unfreeze:
            parts.append("unfreeze-" + "+".join(self.unfreeze))
        if self.accum > 1:
            parts.append(f"accum{self.accum}")
        if self.checkpointing:
            parts.append("ckpt")
        if self.dropout:
            parts.append(f"dropout{self.dropout}")
        if self.lr != 5e-5:
            parts.append(f"lr{self.lr:g}")
        if self.batch != 2:
            parts.append(f"bs{self.batch}")
        return "-".join(parts)


def build_model(cfg: Config) -> nn.Module:
    torch.manual_seed(0)
    factory = FACTORIES[cfg.family]
    if cfg.dropout:
        if cfg.family != "llama":
            raise ValueError("dropout configs use tiny_llama (config overrides)")
        model = tiny_llama(attention_dropout=cfg.dropout)
    else:
        model = factory()
    if cfg.model_bf16:
        model = model.to(torch.bfloat16)
    if cfg.lora:
        targets = ["q_proj", "v_proj"] if cfg.lora_all else FAMILIES[cfg.family].language_lora_regex
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=list(cfg.modules_to_save) or None)
        model = get_peft_model(model, lora)
        base = model.get_base_model()
        for name in cfg.unfreeze:
            base.get_submodule(name).requires_grad_(True)
    return model


def training_args(cfg: Config, output_dir: str, **overrides: Any) -> TrainingArguments:
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch,
        gradient_accumulation_steps=cfg.accum,
        learning_rate=cfg.lr,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=1,
        seed=0,
        data_seed=0,
        bf16=cfg.bf16,
        gradient_checkpointing=cfg.checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if cfg.checkpointing else None,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    kwargs.update(cfg.extra)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


@dataclass
class Run:
    """What one training run produced, ready to compare."""

    trainer: Trainer
    logs: list[dict[str, Any]]
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    report: dict[str, Any] | None
    output_dir: str


def train(
    cfg: Config,
    callbacks: list[TrainerCallback] | None = None,
    *,
    model: nn.Module | None = None,
    output_dir: str | None = None,
    **arg_overrides: Any,
) -> Run:
    """Train ``cfg`` in a real Trainer; returns logs (Trainer's own keys), weights, optimizer state, report."""
    model = model if model is not None else build_model(cfg)
    ds = TinyDataset(model, n=cfg.batch * cfg.accum * cfg.steps)
    out = output_dir or tempfile.mkdtemp(prefix="gg-rel-")
    trainer = Trainer(
        model=model,
        args=training_args(cfg, out, **arg_overrides),
        train_dataset=ds,
        data_collator=default_data_collator,
        callbacks=callbacks or [],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and steadier on a shared CI machine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' own deprecations
            trainer.train()
    finally:
        torch.set_num_threads(threads)
    return collect(trainer, out)


def collect(trainer: Trainer, out: str) -> Run:
    logs = [
        {k: v for k, v in row.items() if not k.startswith("gradguard/") and k not in TIMING_KEYS}
        for row in trainer.state.log_history
    ]
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    opt = trainer.optimizer.state_dict() if trainer.optimizer is not None else {}
    folder = next(
        (cb.guard.report_dir for cb in trainer.callback_handler.callbacks if isinstance(cb, GradGuard) and cb.guard),
        None,
    )
    path = Path(folder or out) / "gradguard-report.json"
    report = json.loads(path.read_text()) if path.exists() else None
    return Run(trainer, logs, weights, opt, report, out)


def _tensors(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")
    else:
        yield prefix, obj


def assert_identical(a: Run, b: Run) -> None:
    """Bitwise equality of logs, weights and optimizer state."""
    assert a.logs == b.logs, "Trainer logs differ"
    assert a.weights.keys() == b.weights.keys()
    diff = [k for k in a.weights if not torch.equal(a.weights[k], b.weights[k])]
    assert not diff, f"weights differ: {diff[:5]}"
    opt_a, opt_b = dict(_tensors(a.optimizer)), dict(_tensors(b.optimizer))
    assert opt_a.keys() == opt_b.keys()
    for k, va in opt_a.items():
        vb = opt_b[k]
        same = torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb
        assert same, f"optimizer state differs at {k}"


@functools.cache
def _report_validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)  # once: jsonschema.validate() re-checks it every call
    return jsonschema.Draft202012Validator(schema)


def validate_report(report: dict[str, Any]) -> None:
    """Every report a test produces must validate against the published JSON Schema."""
    _report_validator().validate(report)


def trainable_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


# -- the matrix -----------------------------------------------------------------------------------------------
# family x precision x set-up, each at least once (9 configurations).
MATRIX = [
    Config("llama"),  # fp32, full fine-tune
    Config("llama", lora=True, accum=2),  # LoRA + gradient accumulation
    Config("llama", bf16=True, checkpointing=True),  # bf16 autocast + gradient checkpointing
    Config("llama", dropout=0.1, accum=4, batch=1),  # dropout (RNG untouched by gradguard) + accumulation 4
    Config("llava", lora=True, modules_to_save=("multi_modal_projector",)),  # VLM LoRA + modules_to_save
    Config("llava", bf16=True, accum=2),  # VLM full fine-tune in bf16 autocast
    Config("minicpmv2", lora=True, unfreeze=("vpm", "resampler")),  # the MiniCPM-V story, healthy
    Config("minicpmv2", model_bf16=True),  # weights stored in bf16
    Config("minicpmv2", checkpointing=True, accum=2),  # VLM full + checkpointing + accumulation
]


@pytest.mark.parametrize("cfg", MATRIX, ids=[c.id for c in MATRIX])
def test_guard_is_bitwise_observational(cfg: Config) -> None:
    bare = train(cfg)
    guard = GradGuard(console=False)
    guarded = train(cfg, [guard])
    assert guard.guard is not None and not guard.guard.disabled, "gradguard disabled itself on a healthy run"
    assert guarded.report is not None and guarded.report["status"] == "healthy", guarded.report
    validate_report(guarded.report)
    # the runs did train (a no-op run would be trivially identical)
    assert len(bare.logs) == cfg.steps + 1 and all("loss" in row for row in bare.logs[:-1])
    assert_identical(bare, guarded)
    # and training moved the weights
    fresh = {k: v for k, v in build_model(cfg).state_dict().items()}
    assert trainable_changed(fresh, guarded.weights)
