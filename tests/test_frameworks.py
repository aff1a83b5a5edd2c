"""Framework detection and the framework's own switch in GG001/GG002 hints (gradguard.integrations.frameworks).

Detection runs on look-alike objects (classes whose ``__module__`` is the framework's, namespaces with its argument
fields: the frameworks themselves are not installed here) and on real objects where they are: the HF ``Trainer``
and TRL's ``SFTTrainer`` for real, end to end. Real LLaMA-Factory and ms-swift runs are in test_llamafactory.py
and test_msswift.py (throwaway venvs).
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from conftest import trainer_args

from gradguard.errors import TrainingHealthError
from gradguard.integrations.frameworks import Framework, amend_hints, detect, find_trainer
from gradguard.report.model import Finding


def instance(module: str, name: str = "Trainer", bases: tuple[type, ...] = (), **attrs: Any) -> Any:
    """An object whose class looks like it was defined in ``module`` (no import of that module)."""
    cls = type(name, bases, {"__module__": module})
    obj = cls()
    for k, v in attrs.items():
        setattr(obj, k, v)
    return obj


def lf_args(**kw: Any) -> SimpleNamespace:
    base = dict(
        finetuning_type="lora",
        freeze_vision_tower=True,
        freeze_multi_modal_projector=True,
        freeze_language_model=False,
        additional_target=None,
        lora_target=["all"],
    )
    return SimpleNamespace(**{**base, **kw})


def lf_trainer(**kw: Any) -> Any:
    return instance("llamafactory.train.sft.trainer", "CustomSeq2SeqTrainer", finetuning_args=lf_args(**kw))


# -- detection --------------------------------------------------------------------------------------------


def test_plain_objects_are_no_framework() -> None:
    from transformers import TrainingArguments

    assert detect(None, None) is None
    assert detect(instance("transformers.trainer"), TrainingArguments(output_dir="/tmp/x", report_to=[])) is None
    assert detect(instance("my_project.train"), SimpleNamespace(output_dir="x")) is None


def test_llamafactory_by_module_and_by_finetuning_args() -> None:
    fw = detect(lf_trainer())
    assert fw is not None and fw.name == "llamafactory" and fw.title == "LLaMA-Factory"
    assert fw.settings["freeze_vision_tower"] is True and fw.settings["finetuning_type"] == "lora"
    # A user's subclass in their own module is still LLaMA-Factory's trainer (found through the MRO).
    base = type(lf_trainer())
    sub = type("MyTrainer", (base,), {"__module__": "my_project"})()
    assert detect(sub).name == "llamafactory"
    # Its FinetuningArguments handed over directly.
    assert detect(None, lf_args()).name == "llamafactory"


def test_llamafactory_rlhf_trainers_subclass_trl_and_are_still_llamafactory() -> None:
    trl_dpo = type("DPOTrainer", (), {"__module__": "trl.trainer.dpo_trainer"})
    trainer = instance("llamafactory.train.dpo.trainer", "CustomDPOTrainer", (trl_dpo,), finetuning_args=lf_args())
    assert detect(trainer).name == "llamafactory"
    assert detect(instance("trl.trainer.dpo_trainer", "DPOTrainer")).name == "trl"


def test_msswift_reads_its_switches_from_the_pipeline_on_the_stack() -> None:
    # ms-swift 4.x: the trainer's TrainingArguments carry tuner_type but not freeze_vit; SftArguments (on the
    # pipeline object, SwiftSft.args) do, and SwiftSft.train(trainer) is on the stack when callbacks run.
    training_args = instance("swift.trainers.arguments", "Seq2SeqTrainingArguments", tuner_type="lora")
    trainer = instance("swift.trainers.seq2seq_trainer", "Seq2SeqTrainer", args=training_args)

    class SwiftSft:
        def __init__(self) -> None:
            self.args = SimpleNamespace(freeze_vit=True, freeze_aligner=True, freeze_llm=False)

        def train(self, trainer: Any) -> Any:
            return detect(trainer)

    SwiftSft.__module__ = "swift.pipelines.train.sft"
    fw = SwiftSft().train(trainer)
    assert fw.name == "ms-swift"
    assert fw.settings == {"tuner_type": "lora", "freeze_vit": True, "freeze_aligner": True, "freeze_llm": False}
    assert fw.switch_hint("vision", frozen=True) == "ms-swift: pass `--freeze_vit false` (it is true in this run)"
    # Outside the pipeline the switches are unknown, and the hint is the plain flag.
    fw = detect(trainer)
    assert fw.settings == {"tuner_type": "lora"}
    assert fw.switch_hint("connector", frozen=True) == "ms-swift: pass `--freeze_aligner false`"


def test_minicpmv_script_by_its_training_arguments() -> None:
    args = instance("__main__", "TrainingArguments", tune_vision=False, tune_llm=False, use_lora=True)
    fw = detect(instance("trainer", "CPMTrainer", args=args))
    assert fw.name == "minicpm-v"
    assert fw.switch_hint("vision", frozen=True) == (
        "MiniCPM-V finetune.py: pass `--tune_vision true` (it is false in this run)"
    )


def test_llava_scripts_by_module_or_fields() -> None:
    args = instance("__main__", "TrainingArguments", freeze_mm_mlp_adapter=True, lora_enable=False)
    assert detect(instance("llava.train.llava_trainer", "LLaVATrainer", args=args)).title == "LLaVA train.py"
    next_args = SimpleNamespace(freeze_mm_mlp_adapter=False, mm_tunable_parts=None, mm_vision_tower_lr=None)
    assert detect(None, next_args).title == "LLaVA-NeXT train.py"


def test_detection_never_raises() -> None:
    class Hostile:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("boom")

    class HostileClass:
        __module__ = "llamafactory.x"

        @property
        def finetuning_args(self) -> Any:
            raise RuntimeError("boom")

    assert detect(Hostile(), Hostile()) is None
    fw = detect(HostileClass())  # the class is LLaMA-Factory's; its arguments cannot be read: plain switches
    assert fw is not None and fw.settings == {}
    assert fw.switch_hint("vision", frozen=True) == "LLaMA-Factory: set `freeze_vision_tower: false`"


# -- the switches -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "role", "frozen", "expected"),
    [
        ({}, "vision", True, "set `freeze_vision_tower: false` (it is true in this run)"),
        ({}, "vision", False, "set `freeze_vision_tower: true` (it is already true in this run, so something else"),
        ({"freeze_vision_tower": False, "lora_target": ["q_proj"]}, "vision", True, "use `lora_target: all`"),
        ({"freeze_vision_tower": False}, "vision", True, "`lora_target` is all: train the tower whole with `addi"),
        ({}, "connector", True, "add `additional_target: multi_modal_projector` (with finetuning_type: lora"),
        ({}, "connector", False, "remove 'multi_modal_projector' from `additional_target`"),
        ({"finetuning_type": "full"}, "connector", True, "set `freeze_multi_modal_projector: false` (it is true"),
        ({"finetuning_type": "freeze"}, "connector", False, "set `freeze_multi_modal_projector: true` (it is alr"),
        ({"freeze_language_model": True}, "language", True, "set `freeze_language_model: false` (it is true"),
        ({"finetuning_type": "full"}, "language", False, "set `freeze_language_model: true` (it is false in this"),
        ({}, "head", True, "add `additional_target: lm_head`"),
        ({"finetuning_type": "full"}, "head", False, None),  # no switch freezes lm_head alone
        ({}, "other", True, None),
    ],
)
def test_llamafactory_switches(settings: dict[str, Any], role: str, frozen: bool, expected: str | None) -> None:
    fw = detect(lf_trainer(**settings))
    group = {"vision": "model.vision_tower", "connector": "model.multi_modal_projector"}.get(role, "lm_head")
    hint = fw.switch_hint(role, frozen, group)
    if expected is None:
        assert hint is None
    else:
        assert hint is not None and hint.startswith("LLaMA-Factory: ") and expected in hint, hint


def test_llamafactory_projector_key_follows_the_group_name() -> None:
    # Qwen2-VL's connector is visual.merger: LLaMA-Factory's additional_target takes module names.
    hint = detect(lf_trainer()).switch_hint("connector", True, "model.visual.merger")
    assert "`additional_target: merger`" in hint


@pytest.mark.parametrize(
    ("settings", "role", "frozen", "expected"),
    [
        ({"freeze_vit": True}, "vision", True, "pass `--freeze_vit false` (it is true in this run)"),
        ({"freeze_aligner": False}, "connector", False, "pass `--freeze_aligner true` (it is false in this run)"),
        ({"freeze_llm": True}, "language", True, "pass `--freeze_llm false`"),
        ({"freeze_vit": False, "target_modules": ["q_proj"]}, "vision", True, "`--freeze_vit` is already false"),
        ({}, "head", True, "pass `--modules_to_save lm_head`"),
        ({}, "other", True, None),
    ],
)
def test_msswift_switches(settings: dict[str, Any], role: str, frozen: bool, expected: str | None) -> None:
    trainer = instance("swift.trainers.seq2seq_trainer", args=SimpleNamespace(tuner_type="lora", **settings))
    hint = detect(trainer).switch_hint(role, frozen, "lm_head" if role == "head" else None)
    assert (hint is None) if expected is None else (expected in hint), hint


@pytest.mark.parametrize(
    ("settings", "role", "frozen", "expected"),
    [
        # The origin story: tune_vision is on, yet get_peft_model froze vpm.
        ({"tune_vision": True, "use_lora": True}, "vision", True, "get_peft_model (`--use_lora true`) froze `vpm`"),
        ({"tune_vision": True, "use_lora": False}, "vision", False, "pass `--tune_vision false` (it is true"),
        ({"tune_llm": False, "use_lora": False}, "language", True, "pass `--tune_llm true` (it is false"),
        ({"tune_llm": False, "use_lora": True}, "language", True, "check `--lora_target_modules`"),
        ({}, "connector", True, "no switch for the resampler"),
        ({}, "connector", False, None),
    ],
)
def test_minicpmv_switches(settings: dict[str, Any], role: str, frozen: bool, expected: str | None) -> None:
    fw = detect(None, SimpleNamespace(**{"tune_vision": True, "tune_llm": False, "use_lora": False, **settings}))
    hint = fw.switch_hint(role, frozen, "vpm" if role == "vision" else None)
    assert (hint is None) if expected is None else (expected in hint), hint


@pytest.mark.parametrize(
    ("settings", "role", "frozen", "expected"),
    [
        ({"freeze_mm_mlp_adapter": True}, "connector", True, "pass `--freeze_mm_mlp_adapter False` (it is True"),
        ({"freeze_mm_mlp_adapter": False}, "connector", False, "pass `--freeze_mm_mlp_adapter True` (it is False"),
        ({"tune_mm_mlp_adapter": True}, "language", True, "pass `--tune_mm_mlp_adapter False`"),
        ({"freeze_mm_mlp_adapter": False}, "language", True, "pass `--freeze_backbone False`"),
        ({"freeze_mm_mlp_adapter": False}, "vision", True, "always freezes the vision tower"),
        ({"mm_vision_tower_lr": None}, "vision", True, "pass `--unfreeze_mm_vision_tower True`"),
        (
            {"mm_tunable_parts": "mm_mlp_adapter,mm_language_model"},
            "vision",
            True,
            "pass `--mm_tunable_parts mm_mlp_adapter,mm_language_model,mm_vision_tower`",
        ),
        ({"mm_tunable_parts": "mm_mlp_adapter"}, "connector", False, "pass `--mm_tunable_parts <none>`"),
    ],
)
def test_llava_switches(settings: dict[str, Any], role: str, frozen: bool, expected: str) -> None:
    hint = detect(instance("llava.train.llava_trainer", args=SimpleNamespace(**settings))).switch_hint(role, frozen)
    assert hint is not None and expected in hint, hint


def test_trl_switch_is_modules_to_save_only_under_peft() -> None:
    peft_model = SimpleNamespace(peft_config={"default": object()})
    fw = detect(instance("trl.trainer.sft_trainer", "SFTTrainer", model=peft_model))
    assert "modules_to_save=['vision_tower']" in fw.switch_hint("vision", True, "model.vision_tower")
    assert fw.switch_hint("vision", False, "model.vision_tower") is None
    fw = detect(instance("trl.trainer.sft_trainer", "SFTTrainer", model=torch.nn.Linear(1, 1)))
    assert fw.switch_hint("vision", True, "model.vision_tower") is None  # no PEFT: the user froze it, not TRL


def test_a_failing_hint_is_no_hint() -> None:
    def broken(fw: Framework, role: str, frozen: bool, group: str | None) -> str | None:
        raise KeyError(role)

    assert Framework("x", "X", {}, broken).switch_hint("vision", True) is None


# -- amend_hints ------------------------------------------------------------------------------------------


def _gg(kind: str, group: str, hint: str = "the PEFT fix") -> Finding:
    return Finding.of(kind, f"{group}: something", hint, group, phase="static")


def test_amend_hints_puts_the_switch_first_in_place_and_once() -> None:
    fw = detect(lf_trainer())
    roles = {"model.vision_tower": "vision", "model.language_model": "language", "lm_head": "head"}
    gg001 = _gg("frozen_expected_trainable", "model.vision_tower")
    gg002 = _gg("trainable_expected_frozen", "model.language_model")
    other = _gg("not_in_optimizer", "model.vision_tower")
    unknown = _gg("frozen_expected_trainable", "not_a_group")
    findings = [gg001, gg002, other, unknown]

    assert amend_hints(findings, fw, roles) == 2
    assert gg001.hint == "LLaMA-Factory: set `freeze_vision_tower: false` (it is true in this run); or the PEFT fix"
    assert gg002.hint.startswith("LLaMA-Factory: set `freeze_language_model: true`") and "the PEFT fix" in gg002.hint
    assert other.hint == unknown.hint == "the PEFT fix"
    assert amend_hints(findings, fw, roles) == 0  # idempotent
    assert amend_hints(findings, None, roles) == 0


def test_amend_hints_never_raises() -> None:
    fw = detect(lf_trainer())
    assert amend_hints([object(), None, 3], fw, {"x": "vision"}) == 0
    assert amend_hints(None, fw, {}) == 0  # type: ignore[arg-type]


# -- find_trainer -----------------------------------------------------------------------------------------


class _Handler:
    def __init__(self, callbacks: list[Any]) -> None:
        self.callbacks = callbacks

    def on_train_begin(self) -> None:
        for cb in self.callbacks:
            cb.on_train_begin()


class _FakeTrainer:
    def __init__(self, *callbacks: Any) -> None:
        self.callback_handler = _Handler(list(callbacks))

    def train(self) -> None:
        self.callback_handler.on_train_begin()


class _Recorder:
    def __init__(self, inner: _FakeTrainer | None = None) -> None:
        self.inner = inner
        self.found: Any = None
        self.found_by_handler: Any = None

    def on_train_begin(self) -> None:
        frame = inspect.currentframe()
        try:
            if self.inner is not None:  # a trainer run from inside another trainer's callback
                self.inner.train()
            self.found = find_trainer(frame, callback=self)
            handler = sys._getframe(1).f_locals["self"]
            self.found_by_handler = find_trainer(handler)
        finally:
            del frame


def test_find_trainer_from_a_frame_a_handler_and_in_nested_trainers() -> None:
    inner_cb = _Recorder()
    inner = _FakeTrainer(inner_cb)
    outer_cb = _Recorder(inner)
    outer = _FakeTrainer(outer_cb)
    outer.train()
    assert outer_cb.found is outer and outer_cb.found_by_handler is outer
    assert inner_cb.found is inner and inner_cb.found_by_handler is inner


def test_find_trainer_never_raises_and_stops_at_the_depth_limit() -> None:
    assert find_trainer(object()) is None
    assert find_trainer(None) is None
    cb = _Recorder()
    trainer = _FakeTrainer(cb)

    def deep(n: int) -> Any:
        return deep(n - 1) if n else find_trainer(inspect.currentframe(), callback=cb, max_depth=5)

    class Holder:
        callback_handler = trainer.callback_handler

        def go(self) -> Any:
            return deep(10)

    assert Holder().go() is None  # 10 frames down: beyond max_depth


def test_find_trainer_in_a_real_trainer_and_no_framework_for_it(tmp_path) -> None:
    from transformers import Trainer, TrainerCallback

    from gradguard.testing.models import TinyDataset, tiny_llama

    class Probe(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            frame = inspect.currentframe()
            try:
                self.trainer = find_trainer(frame, callback=self)
            finally:
                del frame
            self.framework = detect(self.trainer, args)

    model = tiny_llama()
    probe = Probe()
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, max_steps=1),
        train_dataset=TinyDataset(model, n=2),
        callbacks=[probe],
    )
    trainer.train()
    assert probe.trainer is trainer
    assert probe.framework is None


# -- end to end in TRL's SFTTrainer (real) --------------------------------------------------------------------


def _char_tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{chr(97 + i): 3 + i for i in range(26)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def _sft_llava(tmp_path, monkeypatch, modules_to_save: list[str] | None, on_fault: str = "stop") -> Any:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import default_data_collator
    from trl import SFTConfig, SFTTrainer

    from gradguard import GradGuard
    from gradguard.report.model import Report
    from gradguard.testing.models import FAMILIES, TinyDataset, tiny_llava

    model = tiny_llava()
    rows = [{k: v.tolist() for k, v in s.items()} for s in TinyDataset(model, n=8)]
    lora = LoraConfig(r=4, target_modules=FAMILIES["llava"].language_lora_regex, modules_to_save=modules_to_save)
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataset_kwargs={"skip_prepare_dataset": True},
        remove_unused_columns=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows).with_format("torch"),
        processing_class=_char_tokenizer(),
        data_collator=default_data_collator,
        peft_config=lora,
        callbacks=[GradGuard(expect_trainable=["model.vision_tower"], on_fault=on_fault, console=False)],
    )
    stopped = contextlib.suppress(TrainingHealthError) if on_fault == "stop" else contextlib.nullcontext()
    with stopped:  # a static error under on_fault="stop" raises before step 1: the report is what matters here
        trainer.train()
    return Report.from_dict(__import__("json").loads((tmp_path / "gradguard-report.json").read_text()))


def test_trl_sft_trainer_gg001_names_modules_to_save_and_following_it_works(tmp_path, monkeypatch) -> None:
    report = _sft_llava(tmp_path / "frozen", monkeypatch, None)
    gg001 = [f for f in report.findings if f.code == "GG001" and f.group == "model.vision_tower"]
    assert gg001, report.findings
    assert gg001[0].hint.startswith("TRL: the trainer applied your `peft_config` with get_peft_model")
    assert "modules_to_save=['vision_tower']" in gg001[0].hint

    report = _sft_llava(tmp_path / "fixed", monkeypatch, ["vision_tower"])
    assert report.status == "healthy", report.findings


def test_with_on_fault_raise_the_report_already_carries_the_framework_hint(tmp_path, monkeypatch) -> None:
    # on_fault="raise" writes the report inside start(), at the static fault: the hint must be amended as the
    # findings are recorded, not after start() returns.
    from gradguard import TrainingHealthError

    with pytest.raises(TrainingHealthError) as err:
        _sft_llava(tmp_path, monkeypatch, None, on_fault="raise")
    written = __import__("json").loads((tmp_path / "gradguard-report.json").read_text())
    for report in (err.value.report, written):
        gg001 = [f for f in report["findings"] if f["code"] == "GG001"]
        assert gg001 and gg001[0]["hint"].startswith("TRL: "), gg001
