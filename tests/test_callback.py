"""GradGuard in a real HF Trainer: records, detects, attributes, and stops before the bad update."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import trainer_args
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback

from gradguard import GradGuard, Report, TrainingHealthError
from gradguard.testing.faults import corrupt_input, detach_output, inject_nan, mask_labels
from gradguard.testing.models import TinyDataset, tiny_llama, tiny_llava, tiny_minicpmv2

LLM_LORA = r"llm\..*layers\.\d+\.self_attn\.(q_proj|v_proj)"


def seed_vlm(modules_to_save=("resampler",)):
    """MiniCPM-V-2.x-shaped: LoRA on the language model, the connector trainable via modules_to_save."""
    return get_peft_model(
        tiny_minicpmv2(), LoraConfig(r=4, target_modules=LLM_LORA, modules_to_save=list(modules_to_save))
    )


def train(model, tmp_path, callbacks=(), optimizer=None, dataset=None, **args):
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, **{"max_steps": 6, **args}),
        train_dataset=dataset or TinyDataset(model, n=64),
        callbacks=list(callbacks),
        optimizers=(optimizer, None) if optimizer is not None else (None, None),
    )
    trainer.train()
    return trainer


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def report_of(tmp_path) -> Report:
    data = json.loads((tmp_path / "gradguard-report.json").read_text())
    return Report.from_dict(data)


def resampler_of(model):
    return model.get_base_model().resampler


# -- the seed, reproduced -------------------------------------------------------------------------------


def test_without_gradguard_the_trainer_logs_loss_0_and_grad_norm_nan(tmp_path) -> None:
    model = seed_vlm()
    with inject_nan(resampler_of(model), start=3):
        trainer = train(model, tmp_path)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert math.isfinite(logs[0]["loss"]) and logs[0]["loss"] > 0
    assert logs[2]["loss"] == 0.0 and math.isnan(logs[2]["grad_norm"])  # the famous line
    assert any(not torch.isfinite(p).all() for p in model.parameters())  # the weights are poisoned


def test_seed_connector_fault_stops_at_step_3_with_weights_intact(tmp_path) -> None:
    model = seed_vlm()
    guard = GradGuard(on_fault="stop", console=False)
    before = {}

    class Snapshot(TrainerCallback):  # weights as they were before step 3
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == 2:
                before.update(weights(model))

    with inject_nan(resampler_of(model), start=3):
        trainer = train(model, tmp_path, callbacks=[guard, Snapshot()])
    assert trainer.state.global_step == 3  # stopped at the faulty step
    report = report_of(tmp_path)
    fault = report.fault
    assert report.status == "fault" and fault is not None
    assert fault.step == 3 and fault.kind in ("nonfinite_loss", "nonfinite_grad")
    assert fault.origin.phase == "forward"
    assert fault.origin.group == "resampler" and fault.origin.role == "connector"
    assert fault.origin.trainable is True
    assert fault.weights_intact
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the update was skipped
    logged = fault.fact("logged_as")
    assert logged is not None and "0.0" in logged["text"] and "logging_nan_inf_filter" in logged["text"]
    assert "GG111" in [f.code for f in report.findings]  # the masked 0.0, explained
    assert (tmp_path / "gradguard-report.md").read_text().count("logging_nan_inf_filter") >= 1


def test_fault_in_a_frozen_vision_layer(tmp_path) -> None:
    model = seed_vlm()
    vpm_layer = model.get_base_model().vpm.encoder.layers[0]
    with inject_nan(vpm_layer, start=2):
        train(model, tmp_path, callbacks=[GradGuard(console=False)])
    origin = report_of(tmp_path).fault.origin
    assert (origin.phase, origin.group, origin.role, origin.trainable) == ("forward", "vpm", "vision", False)


class _Masked(torch.utils.data.Dataset):
    """Image tokens ate the context: truncation cut every answer, so every label is -100."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        item = dict(self.inner[i])
        item["labels"] = torch.full_like(item["labels"], -100)
        return item


def test_all_labels_masked_is_no_supervision(tmp_path) -> None:
    model = seed_vlm()
    train(model, tmp_path, callbacks=[GradGuard(console=False)], dataset=_Masked(TinyDataset(model, n=16)))
    fault = report_of(tmp_path).fault
    assert (fault.kind, fault.origin.phase, fault.step) == ("no_supervision", "data", 1)
    assert fault.fact("supervised_tokens")["value"] == [0]


def test_masked_labels_with_a_finite_loss_is_a_warning(tmp_path) -> None:
    # Labels masked after the Trainer counted num_items_in_batch: the loss is 0/N = 0, finite. Wasted,
    # not poisoned: a warning, the run goes on.
    model = seed_vlm()
    with mask_labels(model, start=2, times=1):
        trainer = train(model, tmp_path, callbacks=[GradGuard(console=False)], max_steps=3)
    report = report_of(tmp_path)
    assert trainer.state.global_step == 3 and report.status == "healthy"
    assert [(f.kind, f.severity, f.step) for f in report.findings] == [("no_supervision", "warning", 2)]


def test_nan_pixel_values_is_a_data_fault(tmp_path) -> None:
    model = seed_vlm()
    with corrupt_input(model, "pixel_values", start=2):
        train(model, tmp_path, callbacks=[GradGuard(console=False)])
    fault = report_of(tmp_path).fault
    assert (fault.kind, fault.origin.phase, fault.origin.module) == ("nonfinite_input", "data", "pixel_values")
    # ...and which part of the model took it in: the vision tower that get_peft_model froze
    assert (fault.origin.group, fault.origin.role, fault.origin.trainable) == ("vpm", "vision", False)
    assert "it reached `vpm` (vision, frozen)" in fault.message


def test_nan_pixel_values_names_the_llava_vision_tower_that_consumed_it(tmp_path) -> None:
    model = tiny_llava()
    vision = next(name for name, _ in model.named_modules() if name.endswith("vision_tower"))
    with corrupt_input(model, "pixel_values", start=3):
        train(model, tmp_path, callbacks=[GradGuard(console=False)])
    report = report_of(tmp_path)
    fault = report.fault
    assert (fault.step, fault.kind, fault.origin.module) == (3, "nonfinite_input", "pixel_values")
    assert (fault.origin.group, fault.origin.role, fault.origin.trainable) == (vision, "vision", True)
    assert fault.fact("first_nonfinite_output")["group"] == vision and fault.weights_intact
    assert f"it reached `{vision}` (vision, trainable)" in fault.message
    assert f"pixel_values (group {vision}, role vision, trainable)" in " ".join(str(report).split())


def test_backward_only_nan_in_a_language_layer(tmp_path) -> None:
    model = seed_vlm()
    layer = model.get_base_model().llm.model.layers[1]
    with inject_nan(layer.mlp, phase="backward", start=2):
        train(model, tmp_path, callbacks=[GradGuard(console=False)])
    fault = report_of(tmp_path).fault
    assert fault.kind == "nonfinite_grad"
    assert (fault.origin.phase, fault.origin.group, fault.origin.role) == ("backward", "llm", "language")
    assert "layers.1." in fault.fact("first_nonfinite_gradient")["module"]


def test_vision_tower_under_no_grad_is_a_dead_gradient(tmp_path) -> None:
    model = tiny_minicpmv2()  # full fine-tune: the vision tower is trainable…
    model.vpm.forward = torch.no_grad()(model.vpm.forward)  # …but its forward runs under no_grad
    train(model, tmp_path, callbacks=[GradGuard(console=False)], max_steps=5)
    dead = [f for f in report_of(tmp_path).findings if f.kind == "dead_gradient"]
    assert [f.group for f in dead] == ["vpm"] and dead[0].step <= 3 and dead[0].severity == "warning"


def test_dead_gradient_of_an_expected_group_stops_the_run(tmp_path) -> None:
    model = tiny_minicpmv2()
    with detach_output(model.resampler):
        trainer = train(model, tmp_path, callbacks=[GradGuard(expect_trainable=["resampler"], console=False)])
    fault = report_of(tmp_path).fault
    assert fault.kind == "dead_gradient" and fault.origin.group == "resampler"
    assert trainer.state.global_step == 3


def test_optimizer_without_the_resampler(tmp_path) -> None:
    model = seed_vlm()
    opt = torch.optim.AdamW([p for n, p in model.named_parameters() if p.requires_grad and "resampler" not in n])
    before = weights(model)
    forwards = []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    with pytest.raises(TrainingHealthError, match="before step 1.*nothing was trained") as stopped:
        train(model, tmp_path, callbacks=[GradGuard(console=False)], optimizer=opt)
    fault = report_of(tmp_path).fault
    assert (fault.kind, fault.step, fault.origin.phase, fault.origin.group) == (
        "not_in_optimizer",
        0,
        "static",
        "resampler",
    )
    assert stopped.value.fault["kind"] == "not_in_optimizer"
    assert not forwards  # the Trainer cannot stop before its first step: gradguard raised, nothing ran
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    md = (tmp_path / "gradguard-report.md").read_text()
    assert "before step 1" in md and "nothing was trained" in md and "step 0" not in md


def test_seed_intent_is_checked_before_step_1(tmp_path) -> None:
    model = tiny_minicpmv2()
    model.requires_grad_(False)
    model.vpm.requires_grad_(True)
    model.resampler.requires_grad_(True)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=LLM_LORA))
    before = weights(model)
    with pytest.raises(TrainingHealthError, match="GG001 frozen_expected_trainable before step 1"):
        train(model, tmp_path, callbacks=[GradGuard(expect_trainable=["vpm", "resampler"], console=False)])
    report = report_of(tmp_path)
    assert report.fault.kind == "frozen_expected_trainable" and report.fault.step == 0
    assert {f.group for f in report.findings if f.code == "GG001"} == {"vpm", "resampler"}
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_on_fault_raise(tmp_path) -> None:
    model = seed_vlm()
    with inject_nan(resampler_of(model), start=2), pytest.raises(TrainingHealthError) as err:
        train(model, tmp_path, callbacks=[GradGuard(on_fault="raise", console=False)])
    assert err.value.report["fault"]["kind"] == "nonfinite_loss"
    assert err.value.fault["origin"]["group"] == "resampler"
    assert (tmp_path / "gradguard-report.json").exists()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_on_fault_warn_records_and_goes_on(tmp_path) -> None:
    model = seed_vlm()
    with inject_nan(resampler_of(model), start=2):
        trainer = train(model, tmp_path, callbacks=[GradGuard(on_fault="warn", console=False)], max_steps=4)
    assert trainer.state.global_step == 4
    report = report_of(tmp_path)
    assert report.fault.step == 2 and not report.fault.weights_intact
    assert report.history["repeated_findings"]  # the same NaN every step is counted, not repeated


# -- healthy runs stay quiet and bitwise identical -------------------------------------------------------

HEALTHY = {
    "lora": (lambda: get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])), {}),
    "lora+modules_to_save": (lambda: seed_vlm(), {}),
    "full": (lambda: tiny_minicpmv2(), {}),
    "grad_accum_4": (lambda: tiny_llama(), {"gradient_accumulation_steps": 4, "per_device_train_batch_size": 1}),
    "bf16": (lambda: get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])), {"bf16": True}),
}


@pytest.mark.parametrize("name", list(HEALTHY))
def test_healthy_runs_are_quiet_and_bitwise_identical(name, tmp_path) -> None:
    build, args = HEALTHY[name]
    torch.manual_seed(0)
    bare_model = build()
    bare = train(bare_model, tmp_path / "bare", **args)
    torch.manual_seed(0)
    guarded_model = build()
    guarded = train(guarded_model, tmp_path / "guarded", callbacks=[GradGuard(console=False)], **args)
    assert losses(bare) == losses(guarded)
    for (n, a), (_, b) in zip(bare_model.state_dict().items(), guarded_model.state_dict().items()):
        assert torch.equal(a, b), n
    report = report_of(tmp_path / "guarded")
    assert report.status == "healthy" and not report.errors(), report
    assert len(report.history["steps"]) == 6
    logged = guarded.state.log_history[0]
    assert "gradguard/raw_loss" in logged and any(k.startswith("gradguard/grad_norm/") for k in logged)


def test_no_hook_is_left_behind(tmp_path) -> None:
    model = seed_vlm()
    train(model, tmp_path, callbacks=[GradGuard(console=False)], max_steps=2)
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, m
    for p in model.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)


def test_resume_from_checkpoint_continues_the_history(tmp_path) -> None:
    def run(max_steps, resume=None):
        torch.manual_seed(0)
        model = tiny_llama()
        trainer = Trainer(
            model=model,
            args=trainer_args(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=3),
            train_dataset=TinyDataset(model, n=64),
            callbacks=[GradGuard(console=False)],
        )
        trainer.train(resume_from_checkpoint=resume)
        return report_of(tmp_path)

    run(3)
    report = run(6, resume=str(tmp_path / "checkpoint-3"))
    assert report.history["steps"] == [1, 2, 3, 4, 5, 6]


def test_trl_sft_trainer(tmp_path) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model = tiny_llama()
    rows = [{"input_ids": list(range(3, 3 + 12 + i % 4))} for i in range(32)]
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=5,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
    )
    collator = _lm_collator
    with inject_nan(model.model.layers[0], start=3):
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=_tiny_tokenizer(),
            data_collator=collator,
            callbacks=[GradGuard(console=False)],
        )
        trainer.train()
    assert trainer.state.global_step == 3
    fault = report_of(tmp_path).fault
    assert fault.step == 3 and fault.origin.group == "model"


def _lm_collator(rows):
    n = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    labels = torch.full((len(rows), n), -100)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        labels[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
    return {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100).long()}


def _tiny_tokenizer():
    """A real fast tokenizer built in code (no hub): one token per character."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(97 + i): 3 + i for i in range(26)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def test_raw_loss_with_gradient_accumulation_matches_the_trainers(tmp_path) -> None:
    # With num_items_in_batch each micro-batch's model loss is only a share of the step's: gradguard
    # reports the real per-token loss, as the Trainer logs it.
    model = tiny_llama()
    trainer = train(
        model,
        tmp_path,
        callbacks=[GradGuard(console=False)],
        gradient_accumulation_steps=4,
        per_device_train_batch_size=1,
        max_steps=3,
    )
    for logged in (h for h in trainer.state.log_history if "loss" in h):
        assert logged["gradguard/raw_loss"] == pytest.approx(logged["loss"], rel=1e-4)
