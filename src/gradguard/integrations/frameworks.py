"""Which fine-tuning framework built this trainer, and that framework's own switch for a frozen part.

A GG001 hint that says "pass ``modules_to_save=['vision_tower']`` to LoraConfig" is right for someone who
wrote the PEFT code, and useless to someone who wrote ``freeze_vision_tower: true`` in a LLaMA-Factory YAML:
the fix they need is the framework's own key. This module recognises the frameworks people train VLMs with
and names that key:

============  ==============================================  =============================================
framework     recognised by                                   switches (frozen part -> trainable)
============  ==============================================  =============================================
LLaMA-Factory trainer class under ``llamafactory.``;           ``freeze_vision_tower: false``,
              ``trainer.finetuning_args``                       ``freeze_multi_modal_projector: false`` (full /
                                                                freeze tuning) or ``additional_target`` (LoRA),
                                                                ``freeze_language_model: false``
ms-swift      trainer / arguments class under ``swift.``;      ``--freeze_vit false``, ``--freeze_aligner
              ``freeze_vit`` / ``freeze_aligner`` /             false``, ``--freeze_llm false``
              ``freeze_llm`` on the arguments
MiniCPM-V     ``tune_vision`` / ``tune_llm`` on the             ``--tune_vision true``, ``--tune_llm true``
finetune.py   TrainingArguments (``CPMTrainer``)
LLaVA         trainer class under ``llava.``, or                ``--freeze_mm_mlp_adapter False``,
train.py      ``freeze_mm_mlp_adapter`` / ``tune_mm_mlp_adapter``  ``--tune_mm_mlp_adapter False``,
              / ``mm_tunable_parts`` on the TrainingArguments   LLaVA-NeXT's ``--mm_tunable_parts``
TRL           trainer class under ``trl.``                     ``modules_to_save`` in the ``peft_config`` the
                                                                trainer applies
============  ==============================================  =============================================

Detection reads class names (``type(obj).__mro__``'s ``__module__``) and attributes of the objects it is
given; it never imports a framework, so ``import gradguard`` stays free of them and detection costs nothing
where they are not installed. Everything here is contained: a failure returns ``None`` (no hint), never an
exception into the user's training.

A Hugging Face callback does not receive the trainer (``CallbackHandler.call_event`` passes the model,
optimizer, scheduler and dataloaders, but not the trainer, and the handler keeps no reference to it), yet
LLaMA-Factory keeps its switches on the trainer (``trainer.finetuning_args``). :func:`find_trainer` walks up
the call stack from the callback to the frame whose ``self`` owns the ``callback_handler``: the trainer's
``_inner_training_loop`` is always on the stack when ``on_train_begin`` runs.

>>> from types import SimpleNamespace
>>> LF = type("CustomSeq2SeqTrainer", (), {"__module__": "llamafactory.train.sft.trainer"})
>>> trainer = LF()
>>> trainer.finetuning_args = SimpleNamespace(finetuning_type="lora", freeze_vision_tower=True,
...                                           freeze_multi_modal_projector=True, freeze_language_model=False)
>>> fw = detect(trainer)
>>> fw.name
'llamafactory'
>>> fw.switch_hint("vision", frozen=True)
'LLaMA-Factory: set `freeze_vision_tower: false` (it is true in this run)'
"""

from __future__ import annotations

import inspect
import logging
import types
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("gradguard")

__all__ = ["Framework", "amend_hints", "detect", "find_trainer"]

# The finding kinds whose hint gets the framework's switch, and which way the switch must go:
# GG001 (a group meant to train is frozen) -> unfreeze; GG002 (a group meant to stay frozen trains) -> freeze.
_KINDS = {"frozen_expected_trainable": True, "trainable_expected_frozen": False}

HintFn = Callable[["Framework", str, bool, "str | None"], "str | None"]


@dataclass(frozen=True)
class Framework:
    """A fine-tuning framework recognised from a trainer and its arguments.

    ``name`` is a stable key (``"llamafactory"``, ``"ms-swift"``, ``"minicpm-v"``, ``"llava"``, ``"trl"``),
    ``title`` the name people know, ``settings`` the framework's freeze switches as read from the arguments
    object in this run (empty where the arguments were not found: the hint is then the plain switch).

    >>> fw = Framework("ms-swift", "ms-swift", {"freeze_vit": True}, _swift_hint)
    >>> fw.switch_hint("vision", frozen=True)
    'ms-swift: pass `--freeze_vit false` (it is true in this run)'
    >>> fw.switch_hint("connector", frozen=True)   # not read from this run's arguments: the plain switch
    'ms-swift: pass `--freeze_aligner false`'
    >>> fw.switch_hint("vision", frozen=False)     # GG002, but the switch already freezes it
    'ms-swift: pass `--freeze_vit true` (it is already true in this run, so something else changed the module)'
    """

    name: str
    title: str
    settings: Mapping[str, Any]
    _hint: HintFn = field(repr=False, compare=False)

    def switch_hint(self, role: str, frozen: bool, group: str | None = None) -> str | None:
        """The framework's own switch for a group of ``role``; ``None`` where the framework has none.

        ``frozen=True``: the group is frozen but meant to train (GG001) -> how to unfreeze it;
        ``frozen=False``: the group trains but is meant to stay frozen (GG002) -> how to freeze it.
        ``group`` (the module path, e.g. ``model.multi_modal_projector``) is used where the switch names
        modules (``additional_target``, ``modules_to_save``).
        """
        try:
            return self._hint(self, role, frozen, group)
        except Exception as exc:  # a hint is a nicety: never let it cost the run
            log.debug("gradguard: no %s hint for %s (%s: %s)", self.title, role, type(exc).__name__, exc)
            return None


# -- finding the trainer from inside a callback -------------------------------------------------------------


def find_trainer(handler_or_frame: Any = None, *, callback: Any = None, max_depth: int = 48) -> Any | None:
    """The object (a ``transformers.Trainer``) whose ``callback_handler`` is running the current event.

    ``handler_or_frame``: a ``CallbackHandler`` (the trainer is the frame's ``self`` whose ``callback_handler``
    *is* that handler), or a frame to start from (typically ``inspect.currentframe()`` inside
    ``on_train_begin``), or ``None`` for the caller's frame. With ``callback``, only a trainer whose handler
    holds that very callback object is accepted (so a trainer run inside another trainer's callback resolves
    to the right one). Walks at most ``max_depth`` frames; returns ``None`` when there is no such frame, and
    never raises.

    >>> class Handler:
    ...     def __init__(self, callbacks): self.callbacks = callbacks
    ...     def on_train_begin(self):
    ...         return [cb.on_train_begin() for cb in self.callbacks][0]
    >>> class Trainer:
    ...     def __init__(self, cb): self.callback_handler = Handler([cb])
    ...     def train(self): return self.callback_handler.on_train_begin()
    >>> class Callback:
    ...     def on_train_begin(self):
    ...         return find_trainer(inspect.currentframe(), callback=self)
    >>> trainer = Trainer(Callback())
    >>> trainer.train() is trainer
    True
    >>> find_trainer() is None   # not inside a trainer
    True
    """
    start: types.FrameType | None = None
    try:
        handler = None
        if isinstance(handler_or_frame, types.FrameType):
            start = handler_or_frame
        else:
            handler = handler_or_frame
            here = inspect.currentframe()
            start = here.f_back if here is not None else None
            del here
        return _walk_stack(start, lambda owner: _owns(owner, handler, callback), max_depth)
    except Exception as exc:  # introspection must never break training
        log.debug("gradguard: find_trainer failed (%s: %s)", type(exc).__name__, exc)
        return None
    finally:
        del start  # frames hold their locals: do not keep the stack alive


def _walk_stack(frame: types.FrameType | None, accept: Callable[[Any], bool], max_depth: int) -> Any | None:
    """The first ``self`` of a method frame, from ``frame`` outwards, that ``accept`` takes."""
    try:
        depth = 0
        while frame is not None and depth < max_depth:
            owner = _frame_self(frame)
            if owner is not None and accept(owner):
                return owner
            frame = frame.f_back
            depth += 1
        return None
    finally:
        del frame


def _frame_self(frame: types.FrameType) -> Any | None:
    code = frame.f_code
    # Only frames of methods have a `self`; reading f_locals of other frames would copy their locals for nothing.
    if code.co_argcount == 0 or code.co_varnames[:1] != ("self",):
        return None
    return frame.f_locals.get("self")


def _owns(owner: Any, handler: Any, callback: Any) -> bool:
    try:
        cbh = owner.__dict__.get("callback_handler") if hasattr(owner, "__dict__") else None
    except Exception:
        return False
    if cbh is None:
        return False
    if handler is not None:
        return cbh is handler
    callbacks = getattr(cbh, "callbacks", None)
    if not isinstance(callbacks, list):
        return False
    return callback is None or any(cb is callback for cb in callbacks)


# -- detection --------------------------------------------------------------------------------------------


def detect(trainer: Any | None = None, args: Any | None = None) -> Framework | None:
    """The framework that built ``trainer`` (and/or its ``args``), or ``None`` for a plain Trainer / loop.

    ``args`` defaults to ``trainer.args``. Never imports a framework; never raises.

    >>> from types import SimpleNamespace
    >>> detect(None, SimpleNamespace(tune_vision=False, tune_llm=False, use_lora=True)).name   # MiniCPM-V
    'minicpm-v'
    >>> detect(None, SimpleNamespace(output_dir="out")) is None   # a plain TrainingArguments
    True
    """
    try:
        if args is None:
            args = _get(trainer, "args")
        for probe in _PROBES:
            fw = probe(trainer, args)
            if fw is not None:
                return fw
        return None
    except Exception as exc:
        log.debug("gradguard: framework detection failed (%s: %s)", type(exc).__name__, exc)
        return None


def _from_package(obj: Any, *packages: str) -> bool:
    """Whether ``obj``'s class, or a base class, is defined in one of ``packages`` (by module name only)."""
    if obj is None:
        return False
    cls = obj if isinstance(obj, type) else type(obj)
    for klass in getattr(cls, "__mro__", (cls,)):
        module = getattr(klass, "__module__", "") or ""
        if any(module == p or module.startswith(p + ".") for p in packages):
            return True
    return False


def _read(obj: Any, names: Iterable[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if obj is None:
        return out
    for name in names:
        try:
            value = getattr(obj, name)
        except Exception:
            continue
        if isinstance(value, (bool, int, float, str, list, tuple, type(None))):
            out[name] = list(value) if isinstance(value, tuple) else value
    return out


def _get(obj: Any, name: str) -> Any:
    """``getattr(obj, name, None)`` that also survives properties raising something else than AttributeError."""
    if obj is None:
        return None
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


def _has_any(obj: Any, names: Iterable[str]) -> bool:
    return obj is not None and any(_safe_hasattr(obj, n) for n in names)


def _safe_hasattr(obj: Any, name: str) -> bool:
    try:
        return hasattr(obj, name)
    except Exception:
        return False


def _leaf(group: str | None, default: str) -> str:
    return group.rsplit(".", 1)[-1] if group else default


def _yaml(value: bool) -> str:
    return "true" if value else "false"


def _now(settings: Mapping[str, Any], key: str, render: Callable[[Any], str], target: Any) -> str:
    """What the switch is set to in this run, beside a hint that says to set it to ``target``."""
    if key not in settings:
        return ""
    value = settings[key]
    if value == target:
        # The switch already says what the hint would: the cause is elsewhere, and the user should know.
        return f" (it is already {render(value)} in this run, so something else changed the module)"
    return f" (it is {render(value)} in this run)"


# LLaMA-Factory ---------------------------------------------------------------------------------------------

_LF_KEYS = (
    "finetuning_type",
    "freeze_vision_tower",
    "freeze_multi_modal_projector",
    "freeze_language_model",
    "additional_target",
    "lora_target",
    "freeze_extra_modules",
)


def _detect_llamafactory(trainer: Any, args: Any) -> Framework | None:
    fargs = _get(trainer, "finetuning_args")
    if fargs is None and _has_any(args, ("freeze_vision_tower", "freeze_multi_modal_projector")):
        fargs = args  # someone handed us LLaMA-Factory's FinetuningArguments directly
    if not (_from_package(trainer, "llamafactory") or _from_package(args, "llamafactory") or fargs is not None):
        return None
    return Framework("llamafactory", "LLaMA-Factory", _read(fargs, _LF_KEYS), _llamafactory_hint)


def _llamafactory_hint(fw: Framework, role: str, frozen: bool, group: str | None) -> str | None:
    # Semantics read from llamafactory 0.9.5 (model/adapter.py, model/model_utils/visual.py):
    # - freeze_vision_tower / freeze_language_model act in every finetuning_type: full and freeze tuning
    #   set requires_grad_(False) on those modules; LoRA leaves them out of the LoRA target modules.
    # - freeze_multi_modal_projector acts in full and freeze tuning only: LoRA never puts adapters on the
    #   projector (find_all_linear_modules excludes it), so under LoRA it trains only as `additional_target`
    #   (LLaMA-Factory's name for PEFT's modules_to_save).
    s = fw.settings
    ftype = s.get("finetuning_type")
    lora = ftype in ("lora", "oft")
    t = fw.title
    if role == "vision":
        key = "freeze_vision_tower"
        if not frozen:
            return f"{t}: set `{key}: true`{_now(s, key, _yaml, True)}"
        if s.get(key) is False and lora:
            targets = s.get("lora_target")
            whole = f"`additional_target: {_leaf(group, 'vision_tower')}`"
            if targets == ["all"]:  # then LoRA did reach the tower: something after it froze the adapters
                return f"{t}: `{key}` is already false and `lora_target` is all: train the tower whole with {whole}"
            return (
                f"{t}: `{key}` is already false, so the tower trains only through LoRA on the modules in "
                f"`lora_target` (here {targets!r}): use `lora_target: all`, or train it whole with {whole}"
            )
        return f"{t}: set `{key}: false`{_now(s, key, _yaml, False)}"
    if role == "connector":
        key = "freeze_multi_modal_projector"
        leaf = _leaf(group, "multi_modal_projector")
        if lora:
            if frozen:
                return (
                    f"{t}: add `additional_target: {leaf}` (with finetuning_type: {ftype}, LLaMA-Factory puts no "
                    f"adapters on the projector and `{key}` does not apply)"
                )
            return f"{t}: remove {leaf!r} from `additional_target`"
        if ftype is None:
            if frozen:
                return f"{t}: set `{key}: false` (full / freeze tuning) or add `additional_target: {leaf}` (LoRA)"
            return f"{t}: set `{key}: true` (full / freeze tuning) or remove {leaf!r} from `additional_target` (LoRA)"
        return f"{t}: set `{key}: {_yaml(not frozen)}`{_now(s, key, _yaml, not frozen)}"
    if role in ("language", "head"):
        key = "freeze_language_model"
        if role == "head" and not frozen:
            return None  # freeze_language_model would freeze the language model too: no switch for lm_head alone
        if frozen and role == "head" and lora:
            return f"{t}: add `additional_target: {_leaf(group, 'lm_head')}` (LoRA leaves the output head out)"
        if frozen and s.get(key) is False and lora:
            return f"{t}: `{key}` is already false: check that `lora_target` names layers of the language model"
        if frozen and ftype == "freeze":
            return (
                f"{t}: set `{key}: false`{_now(s, key, _yaml, False)}, and choose its layers with "
                "`freeze_trainable_layers` / `freeze_trainable_modules` / `freeze_extra_modules`"
            )
        return f"{t}: set `{key}: {_yaml(not frozen)}`{_now(s, key, _yaml, not frozen)}"
    return None


# ms-swift -------------------------------------------------------------------------------------------------

_SWIFT_KEYS = (
    "tuner_type",  # ms-swift 4.x
    "train_type",  # ms-swift 3.x
    "freeze_vit",
    "freeze_aligner",
    "freeze_llm",
    "target_modules",
    "modules_to_save",
)
_SWIFT_SWITCH = {"vision": "freeze_vit", "connector": "freeze_aligner", "language": "freeze_llm"}


def _detect_swift(trainer: Any, args: Any) -> Framework | None:
    if not (_from_package(trainer, "swift") or _from_package(args, "swift")):
        return None
    switches = tuple(_SWIFT_SWITCH.values())
    # ms-swift 4.x builds the trainer's TrainingArguments from its SftArguments but keeps only the fields the
    # TrainingArguments class declares: freeze_vit / freeze_aligner / freeze_llm stay on the SftArguments, held
    # by the pipeline (SwiftSft.args), whose run() -> train(trainer) frames are on the stack below the trainer.
    source = next((c for c in (args, _get(trainer, "args")) if _has_any(c, switches)), None)
    if source is None:
        here = inspect.currentframe()
        try:
            owner = _walk_stack(here, lambda o: _from_package(o, "swift") and _has_any(_get(o, "args"), switches), 96)
        finally:
            del here
        source = _get(owner, "args")
    settings = _read(args, ("tuner_type", "train_type"))
    settings.update(_read(source, _SWIFT_KEYS))
    return Framework("ms-swift", "ms-swift", settings, _swift_hint)


def _cli(value: bool) -> str:
    return "true" if value else "false"


def _swift_hint(fw: Framework, role: str, frozen: bool, group: str | None) -> str | None:
    key = _SWIFT_SWITCH.get("language" if role == "head" else role)
    if key is None:
        return None
    s = fw.settings
    if frozen and role == "head":
        return f"{fw.title}: pass `--modules_to_save {_leaf(group, 'lm_head')}`"
    hint = f"{fw.title}: pass `--{key} {_cli(not frozen)}`{_now(s, key, _cli, not frozen)}"
    if frozen and s.get(key) is False:
        # The switch is already off, so something else froze the group: under LoRA, only the modules matched
        # by --target_modules get adapters.
        tuner = s.get("tuner_type") or s.get("train_type") or "lora"
        hint = (
            f"{fw.title}: `--{key}` is already false: with --tuner_type {tuner}, check that `--target_modules` "
            f"(here {s.get('target_modules')!r}) reaches it (`all-linear`), or pass "
            f"`--modules_to_save {_leaf(group, key.removeprefix('freeze_'))}`"
        )
    return hint


# MiniCPM-V finetune.py ------------------------------------------------------------------------------------

_MINICPM_KEYS = ("tune_vision", "tune_llm", "use_lora")


def _detect_minicpm(trainer: Any, args: Any) -> Framework | None:
    # finetune.py defines its TrainingArguments in __main__ (the script) with tune_vision / tune_llm; its
    # trainer is CPMTrainer from the script's trainer.py. No package to recognise: the fields are the mark.
    if not _has_any(args, ("tune_vision", "tune_llm")) and type(trainer).__name__ != "CPMTrainer":
        return None
    return Framework("minicpm-v", "MiniCPM-V finetune.py", _read(args, _MINICPM_KEYS), _minicpm_hint)


def _minicpm_hint(fw: Framework, role: str, frozen: bool, group: str | None) -> str | None:
    s = fw.settings
    t = fw.title
    if role == "vision":
        if frozen and s.get("tune_vision") is True and s.get("use_lora"):
            # The origin story of gradguard: older finetune.py applied get_peft_model after honouring
            # tune_vision, and get_peft_model froze vpm again.
            return (
                f"{t}: `--tune_vision true` is already set, but get_peft_model (`--use_lora true`) froze "
                f"`{group or 'vpm'}` after it: update finetune.py (current versions call "
                "`model.base_model.vpm.requires_grad_(True)` after get_peft_model) or add that line"
            )
        return f"{t}: pass `--tune_vision {_cli(frozen)}`{_now(s, 'tune_vision', _cli, frozen)}"
    if role in ("language", "head"):
        if frozen and s.get("use_lora"):
            return f"{t}: with `--use_lora true` the LLM trains through LoRA: check `--lora_target_modules`"
        extra = " (full fine-tuning of the LLM; not with `--use_lora true`)" if frozen else ""
        return f"{t}: pass `--tune_llm {_cli(frozen)}`{_now(s, 'tune_llm', _cli, frozen)}{extra}"
    if role == "connector" and frozen:
        return (
            f"{t}: the script has no switch for the resampler: current versions re-enable it after "
            "get_peft_model (`model.base_model.resampler.requires_grad_(True)`); update finetune.py or add that line"
        )
    return None


# LLaVA / LLaVA-NeXT train.py --------------------------------------------------------------------------------

_LLAVA_KEYS = ("freeze_mm_mlp_adapter", "tune_mm_mlp_adapter", "mm_tunable_parts", "lora_enable", "mm_vision_tower_lr")
_LLAVA_PARTS = {"vision": "mm_vision_tower", "connector": "mm_mlp_adapter", "language": "mm_language_model"}


def _detect_llava(trainer: Any, args: Any) -> Framework | None:
    marks = ("freeze_mm_mlp_adapter", "tune_mm_mlp_adapter", "mm_tunable_parts")
    if not (_from_package(trainer, "llava") or _has_any(args, marks)):
        return None
    settings = _read(args, _LLAVA_KEYS)
    # LLaVA-NeXT (its TrainingArguments adds mm_vision_tower_lr) can unfreeze the vision tower; LLaVA 1.5 cannot.
    name_title = ("llava", "LLaVA-NeXT train.py" if "mm_vision_tower_lr" in settings else "LLaVA train.py")
    return Framework(*name_title, settings, _llava_hint)


def _llava_hint(fw: Framework, role: str, frozen: bool, group: str | None) -> str | None:
    s = fw.settings
    t = fw.title
    role = "language" if role == "head" else role
    part = _LLAVA_PARTS.get(role)
    if part is None:
        return None
    tunable = s.get("mm_tunable_parts")
    if isinstance(tunable, str) and tunable:
        # mm_tunable_parts overrides every other switch in LLaVA-NeXT's train.py.
        parts = [p for p in tunable.split(",") if p]
        new = [*parts, part] if frozen and part not in parts else [p for p in parts if p != part]
        return f"{t}: pass `--mm_tunable_parts {','.join(new) or '<none>'}` (it is {tunable!r} in this run)"
    next_ = "mm_vision_tower_lr" in s
    if role == "vision":
        if next_ and frozen:
            return f"{t}: pass `--unfreeze_mm_vision_tower True` (or add mm_vision_tower to `--mm_tunable_parts`)"
        if next_:
            return f"{t}: pass `--unfreeze_mm_vision_tower False`"
        if frozen:
            return (
                f"{t}: LLaVA's train.py always freezes the vision tower (CLIPVisionTower.load_model); LLaVA-NeXT's "
                "has `--mm_tunable_parts mm_vision_tower,...` / `--unfreeze_mm_vision_tower True`"
            )
        return None
    if role == "connector":
        if frozen and s.get("freeze_mm_mlp_adapter") is False:
            return None  # the switch is not what froze it
        key = "freeze_mm_mlp_adapter"
        return f"{t}: pass `--{key} {'False' if frozen else 'True'}`{_now(s, key, str, not frozen)}"
    # language
    if frozen:
        if s.get("tune_mm_mlp_adapter") is True:
            return (
                f"{t}: pass `--tune_mm_mlp_adapter False` (it is True in this run, which trains the projector "
                "alone and freezes the rest)"
            )
        return f"{t}: pass `--freeze_backbone False` (or `--lora_enable True` to train the LLM through LoRA)"
    return f"{t}: pass `--freeze_backbone True` (or `--tune_mm_mlp_adapter True` to train the projector alone)"


# TRL ------------------------------------------------------------------------------------------------------


def _detect_trl(trainer: Any, args: Any) -> Framework | None:
    if not (_from_package(trainer, "trl") or _from_package(args, "trl")):
        return None
    model = _get(trainer, "model")
    settings = {"peft": bool(model is not None and _safe_hasattr(model, "peft_config"))} if trainer else {}
    return Framework("trl", "TRL", settings, _trl_hint)


def _trl_hint(fw: Framework, role: str, frozen: bool, group: str | None) -> str | None:
    # TRL has no freeze switches; what it adds is get_peft_model, applied by the trainer from peft_config,
    # which freezes everything outside the adapters (and undoes earlier requires_grad_(True) calls).
    if not frozen or fw.settings.get("peft") is False:
        return None
    leaf = _leaf(group, "vision_tower")
    return (
        f"{fw.title}: the trainer applied your `peft_config` with get_peft_model, which froze it: pass "
        f"`peft_config=LoraConfig(..., modules_to_save=[{leaf!r}])`"
    )


# Order matters: LLaMA-Factory's DPO/KTO trainers and ms-swift's RLHF trainers subclass TRL's.
_PROBES: tuple[Callable[[Any, Any], Framework | None], ...] = (
    _detect_llamafactory,
    _detect_swift,
    _detect_minicpm,
    _detect_llava,
    _detect_trl,
)


# -- findings -------------------------------------------------------------------------------------------------


def amend_hints(findings: Iterable[Any], framework: Framework | None, roles: Mapping[str, str]) -> int:
    """Put the framework's own switch before the hint of each GG001 / GG002 finding, in place.

    ``roles`` maps group names to roles (``{"model.vision_tower": "vision", ...}``). In place because the
    guard compares findings by value (a fault is recorded once, ``finding not in guard.findings``): a copy
    with a new hint would be recorded twice. Idempotent, and never raises. Returns how many were amended.

    >>> from gradguard.report.model import Finding
    >>> fw = Framework("ms-swift", "ms-swift", {"freeze_vit": True}, _swift_hint)
    >>> f = Finding.of("frozen_expected_trainable", "visual: 0 of 1.0K trainable", "pass modules_to_save=['visual']",
    ...                "visual")
    >>> amend_hints([f], fw, {"visual": "vision"}), f.hint
    (1, "ms-swift: pass `--freeze_vit false` (it is true in this run); or pass modules_to_save=['visual']")
    >>> amend_hints([f], fw, {"visual": "vision"})   # already there
    0
    """
    if framework is None:
        return 0
    n = 0
    try:
        for f in findings:
            frozen = _KINDS.get(getattr(f, "kind", ""))
            role = roles.get(getattr(f, "group", None) or "")
            if frozen is None or role is None:
                continue
            switch = framework.switch_hint(role, frozen, f.group)
            if not switch or switch in f.hint:
                continue
            f.hint = f"{switch}; or {f.hint}" if f.hint else switch
            n += 1
    except Exception as exc:
        log.debug("gradguard: framework hints skipped (%s: %s)", type(exc).__name__, exc)
    return n
