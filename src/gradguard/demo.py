"""``gradguard demo``: the story this project started from, end to end, offline, in seconds.

A LoRA fine-tune of a MiniCPM-V-2.x-shaped model with ``tune_vision=True`` logs a normal loss, then
``loss 0.0, grad_norm nan`` for every later step, and keeps training. The demo runs that twice with the
real Hugging Face ``Trainer`` on a tiny random-weight model (built from a config, never downloaded):

1. without gradguard: what the user sees (the Trainer's logs), and the NaN weights it leaves behind;
2. with gradguard: the audit names the module ``get_peft_model`` froze, and ``GradGuard`` stops at the
   faulty step, names where the first NaN appeared, and keeps the weights intact.

The NaN is injected (:func:`gradguard.testing.faults.inject_nan` on the resampler's forward output) to
reproduce deterministically what fp16 overflow does in the real model.

    $ gradguard demo                      # the report goes to ./gradguard-demo
    $ gradguard report gradguard-demo --plot gradguard.png --exit-zero
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from gradguard.report.format import fmt_float

STEPS = 6  # optimizer steps per run
FAULT_STEP = 3  # the resampler's output is NaN from this step on (steps 1 and 2 look healthy)
EXPECT = ["vpm", "resampler"]  # the intent of tune_vision=True
# The form of MiniCPM-V finetune.py's default lora_target_modules: LoRA on the LLM's attention only.
LORA_TARGET = r"llm\..*layers\.\d+\.self_attn\.(q_proj|v_proj)"
MODULES_TO_SAVE = ["resampler"]  # ... and the resampler trained in full, but `vpm` forgotten

SETUP_CODE = f"""\
model = tiny_minicpmv2()                  # children: vpm (vision), resampler (connector), llm (language)
model.llm.requires_grad_(False)           # use_lora=True: the LLM trains through adapters only
model.vpm.requires_grad_(True)            # tune_vision=True
model.resampler.requires_grad_(True)
with track_requires_grad(model) as changes:
    model = get_peft_model(model, LoraConfig(r=8, target_modules=r"{LORA_TARGET}",
                                             modules_to_save={MODULES_TO_SAVE!r}))"""


def build(seed: int = 0) -> tuple[Any, Any, list[str]]:
    """The demo's model, set up as MiniCPM-V's finetune script does with ``tune_vision=True`` and LoRA.

    Returns the ``PeftModel``, what ``get_peft_model`` changed (:func:`gradguard.track_requires_grad`)
    and gradguard's warnings about it.

    >>> model, changes, notes = build()  # doctest: +SKIP
    >>> changes.suspicious  # doctest: +SKIP
    ['vpm']
    """
    from peft import LoraConfig, get_peft_model

    from gradguard.core.track import FrozenByWrapWarning, track_requires_grad
    from gradguard.testing.models import tiny_minicpmv2

    model: Any = tiny_minicpmv2(seed=seed)
    model.llm.requires_grad_(False)
    model.vpm.requires_grad_(True)
    model.resampler.requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with track_requires_grad(model) as changes:
            model = get_peft_model(
                model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGET, modules_to_save=MODULES_TO_SAVE)
            )
    notes = [str(w.message) for w in caught if issubclass(w.category, FrozenByWrapWarning)]
    return model, changes, notes


def _fmt(value: Any) -> str:
    """A logged number the way it reads best: ``0.0``, ``nan``, ``5.5264``."""
    if isinstance(value, float):
        return repr(round(value, 4)) if math.isfinite(value) else str(value)
    return str(value)


def _log_lines(log_history: list[dict[str, Any]]) -> list[str]:
    """The Trainer's per-step logs as the user reads them (``logging_steps=1``)."""
    lines = []
    for entry in log_history:
        if "loss" not in entry:
            continue  # the end-of-training summary
        line = f"step {entry['step']}  loss {_fmt(entry['loss'])}, grad_norm {_fmt(entry.get('grad_norm'))}"
        if "gradguard/raw_loss" in entry:
            line += f"   (gradguard/raw_loss {_fmt(entry['gradguard/raw_loss'])})"
        lines.append(line)
    return lines


def _trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _nonfinite(model: torch.nn.Module) -> tuple[int, int]:
    params = _trainable(model)
    return sum(not bool(torch.isfinite(p).all()) for p in params.values()), len(params)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Library chatter (transformers' warnings, gradguard's logger) off: the demo prints the story itself."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    logger = logging.getLogger("gradguard")
    handler = logging.NullHandler()
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        hf_logging.set_verbosity(verbosity)


def _train(model: Any, workdir: str, console: Console, label: str, callbacks: list[Any]) -> Any:
    """Run the real HF Trainer for :data:`STEPS` steps with a progress bar, the NaN injected from
    :data:`FAULT_STEP` on. Returns the trainer."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from gradguard.testing.faults import inject_nan
    from gradguard.testing.models import TinyDataset

    args = TrainingArguments(
        output_dir=workdir,
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    progress = Progress(TextColumn(f"  {label}"), BarColumn(), MofNCompleteColumn(), console=console, transient=True)
    task = progress.add_task(label, total=STEPS)

    class Advance(TrainerCallback):  # the progress bar
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            progress.update(task, completed=state.global_step)

    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=TinyDataset(model, n=2 * STEPS),
        callbacks=[*callbacks, Advance()],
    )
    for cb in (PrinterCallback, ProgressCallback):  # the demo prints the logs itself, below
        trainer.remove_callback(cb)
    # In the real model fp16 overflow makes the resampler's output NaN; here it is injected.
    with progress, inject_nan(model.base_model.model.resampler, start=FAULT_STEP):
        trainer.train()
    return trainer


DEFAULT_OUTPUT = "gradguard-demo"  # in the current directory: a stable, named folder the next commands can use


def command_prefix() -> str:
    """How to run ``gradguard`` again from this shell, for the commands the demo prints.

    ``gradguard`` when the ``PATH`` finds the very script that is running; else that script's path as it was
    run (``.venv/bin/gradguard`` from ``./scripts/demo.sh``, where the venv is not activated); else, for
    ``python -m gradguard.cli`` or a call from Python, this interpreter with ``-m gradguard.cli``.

    >>> command_prefix().endswith(("gradguard", "-m gradguard.cli"))
    True
    """
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is not None and script.name == "gradguard" and script.is_file():
        found = shutil.which("gradguard")
        if found and Path(found).resolve() == script.resolve():
            return "gradguard"
        return shlex.quote(str(script) if script.is_absolute() or str(script).startswith(".") else f"./{script}")
    return f"{shlex.quote(sys.executable)} -m gradguard.cli"


def run_demo(output: str | os.PathLike[str] | None = None, console: Console | None = None) -> int:
    """Run the demo; the report goes to ``output`` (default: ``./gradguard-demo``, see :data:`DEFAULT_OUTPUT`).

    Returns 0 when gradguard caught the fault and kept the weights intact, 1 otherwise.

    >>> run_demo("gradguard-demo")  # doctest: +SKIP
    0
    """
    from gradguard.report.render import make_console

    console = console if console is not None else make_console()
    out = Path(output if output is not None else DEFAULT_OUTPUT)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    _intro(console, out)
    with _quiet(), tempfile.TemporaryDirectory(prefix="gradguard-demo-trainer-") as workdir:
        _run_without(console, workdir, _show_setup(console))
        report, audit, model, snapshots, steps = _run_with(console, workdir, out)
    console.rule("[bold]4. What gradguard said")
    return _summary(console, report, audit, model, snapshots, steps, out)


def _intro(console: Console, out: Path) -> None:
    console.print(
        Panel(
            "A LoRA fine-tune of a MiniCPM-V-2.x-shaped model with tune_vision=True, on the real Hugging Face "
            "Trainer: first as users run it, then with gradguard.\nThe model is tiny (random weights, built from "
            "a config: nothing is downloaded) and runs on the CPU.\n"
            f"The report goes to {out}/ (--output DIR writes it elsewhere).",
            title="gradguard demo",
            border_style="cyan",
        )
    )


def _show_setup(console: Console) -> Any:
    """Section 1: the set-up and what ``get_peft_model`` changed. Returns the model, for run 1."""
    console.rule("[bold]1. The set-up")
    console.print(Text(SETUP_CODE, style="dim"))
    model, changes, notes = build()
    console.print("\n[bold]track_requires_grad[/]: what get_peft_model changed")
    for line in changes.lines():
        console.print(f"  {line}", markup=False)
    for note in notes:
        console.print(Text("  warning: ", style="yellow") + Text(note))
    console.print(
        f"\n[bold]The fault[/]: from step {FAULT_STEP} on, the resampler's forward output contains NaN. In the "
        "real model, fp16 overflow does this; here it is injected to reproduce it deterministically:\n"
        f"  [dim]inject_nan(model.resampler, start={FAULT_STEP})[/]   (gradguard.testing.faults)"
    )
    return model


def _run_without(console: Console, workdir: str, model: Any) -> None:
    console.rule("[bold]2. Run 1: Trainer, without gradguard")
    trainer = _train(model, workdir, console, "run 1 (no gradguard)", [])
    console.print(f"What the Trainer logs (logging_steps=1), {trainer.state.global_step} steps:")
    for line in _log_lines(trainer.state.log_history):
        console.print(f"  {line}", markup=False)
    bad, total = _nonfinite(model)
    console.print(
        f"Training ran to the end and reported nothing wrong. Afterwards [bold red]{bad} of {total}[/] trainable "
        "weight tensors hold NaN: the adapters and the resampler are destroyed, and 'loss 0.0' looked like "
        "progress."
    )


def _run_with(console: Console, workdir: str, out: Path) -> tuple[Any, Any, Any, dict[int, dict[str, Any]], int]:
    from transformers import TrainerCallback

    from gradguard.core.audit import audit_requires_grad
    from gradguard.integrations.transformers import GradGuard
    from gradguard.report.model import Report

    console.rule("[bold]3. Run 2: the same set-up, with gradguard")
    model, _, _ = build()
    audit = audit_requires_grad(model, expect_trainable=EXPECT)
    console.print(f"[bold]audit_requires_grad(model, expect_trainable={EXPECT!r})[/] before training:")
    console.print(audit)
    console.print(
        "[dim]GradGuard(expect_trainable=...) would stop on this error before step 1 (a static fault). To "
        "show the runtime fault as well, the run below uses GradGuard() without the intent.[/]\n"
    )
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    class Snapshot(TrainerCallback):  # the weights after every step, to prove "intact" below
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            snapshots[state.global_step] = {n: p.detach().clone() for n, p in _trainable(model).items()}

    console.print(f"[bold]Trainer(..., callbacks=\\[GradGuard(report_dir={str(out)!r})]).train()[/]")
    guard = GradGuard(report_dir=str(out), console=False)
    trainer = _train(model, workdir, console, "run 2 (GradGuard)", [guard, Snapshot()])
    console.print(f"What the Trainer logs, {trainer.state.global_step} steps:")
    for line in _log_lines(trainer.state.log_history):
        console.print(f"  {line}", markup=False)
    report = Report.load(out)
    console.print(report)
    return report, audit, model, snapshots, trainer.state.global_step


def _summary(
    console: Console,
    report: Any,
    audit: Any,
    model: torch.nn.Module,
    snapshots: dict[int, dict[str, torch.Tensor]],
    stopped_at: int,
    out: Path,
) -> int:
    fault = report.fault
    if fault is None:
        console.print("[bold red]gradguard reported no fault: this demo expected one; please report it.[/]")
        return 1
    lines: list[str] = []
    if fault.kind == "nonfinite_loss":
        losses = dict(zip(report.history.get("steps", []), report.history.get("loss", [])))
        raw = fmt_float(losses.get(fault.step, "NaN"))
        lines.append(
            f"step {fault.step}: the loss is {raw}, not 0.0 (Trainer's logging_nan_inf_filter shows NaN as 0.0)"
        )
    else:
        lines.append(f"step {fault.step}: {fault.code} {fault.kind}: {fault.message}")
    o = fault.origin
    where = (fault.localization or {}).get("module") or o.module or o.group
    state = {True: "trainable", False: "frozen", None: "trainable or not: unknown"}[o.trainable]
    lines.append(f"the first non-finite value appeared in the {o.phase} output of {where} ({state})")
    for f in audit.findings:
        if f.code == "GG001":
            lines.append(f"{f.group} was meant to train but get_peft_model froze it ({f.code})")
    before = snapshots.get(fault.step - 1)
    same = before is not None and all(torch.equal(p, before[n]) for n, p in _trainable(model).items())
    bad, total = _nonfinite(model)
    if fault.weights_intact and not bad:
        proof = f"; all {total} trainable tensors are finite" + (
            f" and bitwise identical to after step {fault.step - 1}" if same else ""
        )
        lines.append(f"the poisoned update was skipped and the weights are intact{proof}")
    else:
        lines.append(f"the weights are NOT intact: {bad} of {total} trainable tensors hold NaN")
    lines.append(f"training stopped at step {stopped_at} of {STEPS}")
    for line in lines:
        console.print(Text("  • ") + Text(line))
    report_file = out / "gradguard-report.json"
    console.print(f"\nreport: {report_file}", markup=False, soft_wrap=True)
    # Each printed as a whole line (soft_wrap) that works verbatim from this directory: `./scripts/demo.sh`
    # runs `.venv/bin/gradguard`, which is not on the PATH unless the venv is activated.
    prog, folder = command_prefix(), shlex.quote(str(out))
    for command in (f"{prog} report {folder} --plot gradguard.png --exit-zero", f"{prog} explain {fault.code}"):
        console.print(f"next:   {command}", markup=False, soft_wrap=True)
    console.print(
        "        (gradguard report exits 1 for a report with a fault, so that CI can gate on it; --exit-zero "
        "draws and exits 0)",
        markup=False,
        style="dim",
    )
    return 0 if fault.weights_intact and not bad else 1
