"""The ``gradguard`` command: ``audit`` · ``report`` · ``explain`` · ``demo``.

Exit status: 0 all good; 1 the audit found an error, or the report is not healthy (a CI job fails); 2 bad
usage (a wrong option, an unknown target or code, an unreadable file: one line on stderr says what is wrong
and how to fix it);
3 an unexpected error inside gradguard (one line, ``--debug`` shows the traceback).

    $ gradguard audit ./my-model --lora-target q_proj,v_proj --expect vision
    $ gradguard report ./output --plot gradguard.png --exit-zero
    $ gradguard explain GG101
    $ gradguard demo
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from gradguard import __version__

# Exit codes (documented in docs/cli.md).
OK, ERRORS, USAGE, INTERNAL = 0, 1, 2, 3

# Characters that make a --lora-target value a regular expression (PEFT full-matches a string target
# against module paths) instead of a list of module-name suffixes.
_REGEX_CHARS = re.compile(r"[\\^$*+?()\[\]{}|]")


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump): ``gradguard audit: error: … (see --help)``."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# -- helpers ------------------------------------------------------------------------------------------------


def _split(value: str | None) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _console(stderr: bool = False) -> Any:
    from gradguard.report.render import make_console

    # Piped or captured output: COLUMNS, else a generous width (rich's default of 80 cut module paths).
    return make_console(stderr=stderr)


@contextlib.contextmanager
def _quiet() -> Iterator[list[warnings.WarningMessage]]:
    """Keep library chatter (transformers' warnings and progress bars) out of the CLI's output.

    gradguard's own warnings are recorded and returned, so the caller can show them its own way.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield caught
        finally:  # restore: main() may be called in-process (tests, notebooks)
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()


def _gradguard_warnings(caught: Sequence[warnings.WarningMessage]) -> list[str]:
    from gradguard.core.track import FrozenByWrapWarning

    return [str(w.message) for w in caught if issubclass(w.category, FrozenByWrapWarning)]


# -- loading the TARGET of `gradguard audit` ---------------------------------------------------------------


def load_target(target: str, trust_remote_code: bool = False) -> tuple[Any, str]:
    """Load the model named by ``target``: a ``save_pretrained`` directory or ``module:callable``.

    Returns the model and a short description of how it was loaded. Raises :class:`UsageError` with a
    one-line explanation when it cannot.

    >>> model, how = load_target("gradguard.testing.models:tiny_llava")  # doctest: +SKIP
    >>> how  # doctest: +SKIP
    'gradguard.testing.models:tiny_llava() -> LlavaForConditionalGeneration'
    """
    path = Path(target).expanduser()
    if path.is_dir():
        return _load_directory(path, trust_remote_code)
    if path.exists():
        raise UsageError(
            f"{target} is a file; pass the model directory written by save_pretrained (the folder with config.json)"
        )
    if ":" in target:
        return _load_callable(target)
    raise UsageError(
        f"{target!r} is neither a directory nor module:callable; pass a folder written by save_pretrained "
        "or e.g. 'gradguard.testing.models:tiny_minicpmv2'"
    )


def _load_callable(target: str) -> tuple[Any, str]:
    from torch import nn

    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise UsageError(f"{target!r}: write module:callable, e.g. 'gradguard.testing.models:tiny_llava'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"cannot import {module_name!r} ({exc}); is it on PYTHONPATH / installed?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{target} is not callable; point at a function (or class) that returns the model")
    try:
        model = obj()
    except Exception as exc:  # the user's builder failed: their error, not gradguard's
        raise UsageError(f"{target}() raised {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"{target}() returned {type(model).__name__}, not a torch.nn.Module")
    return model, f"{target}() -> {type(model).__name__}"


def _register_testing_models(model_type: str) -> None:
    """Make gradguard's own tiny test models (``model_type`` ``gradguard_*``) loadable by the Auto classes."""
    if not model_type.startswith("gradguard_"):
        return
    from transformers import AutoConfig, AutoModel, PreTrainedModel

    models = importlib.import_module("gradguard.testing.models")
    PreTrainedConfig = models.PreTrainedConfig  # transformers 4.x spells it PretrainedConfig
    for obj in vars(models).values():
        if isinstance(obj, type) and issubclass(obj, PreTrainedModel) and obj is not PreTrainedModel:
            cfg = getattr(obj, "config_class", None)
            if (
                isinstance(cfg, type)
                and issubclass(cfg, PreTrainedConfig)
                and getattr(cfg, "model_type", None) == model_type
            ):
                AutoConfig.register(model_type, cfg, exist_ok=True)
                AutoModel.register(cfg, obj, exist_ok=True)


def _auto_classes(config: Any) -> list[Any]:
    """The Auto classes to try, best first: the one whose class for this config is listed in
    ``config.architectures`` (LLaVA -> ``AutoModelForImageTextToText``, Llama -> ``AutoModelForCausalLM``),
    then the others, ``AutoModel`` (no head) last."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText

    archs = set(getattr(config, "architectures", None) or [])
    candidates = [AutoModelForImageTextToText, AutoModelForCausalLM, AutoModel]
    if any(a.endswith("ForCausalLM") for a in archs):
        candidates = [AutoModelForCausalLM, AutoModelForImageTextToText, AutoModel]

    def listed(auto: Any) -> bool:
        try:
            return auto._model_mapping[type(config)].__name__ in archs
        except (KeyError, AttributeError):
            return False

    return sorted(candidates, key=lambda auto: not listed(auto))  # stable: keeps the order otherwise


def _load_directory(path: Path, trust_remote_code: bool) -> tuple[Any, str]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UsageError(f"{path} has no config.json; pass a directory written by model.save_pretrained(...)")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{config_file} is not valid JSON ({exc})") from None
    model_type = str(raw.get("model_type", ""))
    weights = [
        p
        for p in path.iterdir()
        if p.suffix in (".safetensors", ".bin", ".pt", ".pth") or p.name.endswith(".index.json")
    ]
    if not weights:
        raise UsageError(
            f"{path} has a config.json but no weights (*.safetensors / *.bin); save the model with save_pretrained"
        )
    from transformers import AutoConfig

    _register_testing_models(model_type)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc) or raw.get("auto_map"):
            hint = "the directory ships its own modeling code: add --trust-remote-code if you trust it"
        else:
            hint = "upgrade transformers, or pass module:callable that builds the model"
        raise UsageError(f"{path}: transformers cannot read model_type {model_type!r}; {hint}") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the config ({_first_line(exc)})") from None
    tried = []
    for auto in _auto_classes(config):
        try:
            model = auto.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
        except ValueError as exc:
            if "Unrecognized configuration class" in str(exc):
                tried.append(auto.__name__)
                continue
            raise UsageError(f"cannot load the weights in {path}: {_first_line(exc)}") from None
        except (OSError, RuntimeError, KeyError) as exc:
            raise UsageError(f"cannot load the weights in {path}: {_first_line(exc)}") from None
        return model, f"{path} ({type(model).__name__}, loaded with {auto.__name__})"
    raise UsageError(
        f"{path}: no Auto class can build model_type {model_type!r} (tried {', '.join(tried)}); "
        "pass module:callable that builds the model"
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# -- gradguard audit ---------------------------------------------------------------------------------------


def _unfreeze(model: Any, entries: Sequence[str]) -> list[str]:
    """``requires_grad_(True)`` on module paths (``vpm``, ``model.vision_tower``) or group names / roles."""
    from gradguard.core.groups import build_groups

    done = []
    gmap = None
    for entry in entries:
        try:
            module = model.get_submodule(entry)
        except AttributeError:
            gmap = gmap or build_groups(model)
            try:
                hits = gmap.match(entry, what="--unfreeze entry")
            except ValueError as exc:  # a name that is ambiguous in this model
                raise UsageError(str(exc)) from None
            if not hits:
                raise UsageError(
                    f"--unfreeze {entry!r} is neither a module path nor a group or role of this model; groups: "
                    f"{', '.join(gmap.groups)}"
                ) from None
            for g in hits:
                for info in g.params:
                    info.param.requires_grad_(True)
                done.append(f"{g.name} ({sum(p.param.numel() for p in g.params):,} params)")
            continue
        module.requires_grad_(True)
        done.append(f"{entry} ({sum(p.numel() for p in module.parameters()):,} params)")
    return done


def lora_targets(value: str) -> str | list[str]:
    """``--lora-target``: a comma-separated list of module names (PEFT matches name suffixes), or one
    regular expression that PEFT full-matches against module paths (MiniCPM-V's finetune.py default:
    ``llm\\..*layers\\.\\d+\\.self_attn\\.(q_proj|v_proj)``).

    >>> lora_targets("q_proj,v_proj")
    ['q_proj', 'v_proj']
    >>> lora_targets(r"llm\\..*\\.(q_proj|v_proj)")
    'llm\\\\..*\\\\.(q_proj|v_proj)'
    """
    if _REGEX_CHARS.search(value):
        try:
            re.compile(value)
        except re.error as exc:
            raise UsageError(f"--lora-target {value!r} is not a valid regular expression ({exc})") from None
        return value
    targets = _split(value)
    if not targets:
        raise UsageError("--lora-target is empty; e.g. --lora-target q_proj,v_proj")
    return targets


def _apply_lora(model: Any, args: argparse.Namespace, expect: list[str] | None) -> tuple[Any, Any, list[str]]:
    from peft import LoraConfig, get_peft_model

    from gradguard.core.track import track_requires_grad

    targets = lora_targets(args.lora_target)
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        target_modules=targets,
        modules_to_save=_split(args.modules_to_save) or None,
    )
    with _quiet() as caught:
        try:
            with track_requires_grad(model, expect_trainable=expect) as changes:
                model = get_peft_model(model, config)
        except ValueError as exc:
            raise UsageError(
                f"get_peft_model failed ({_first_line(exc).rstrip('.')}); "
                "check --lora-target against the model's module names"
            ) from None
    return model, changes, _gradguard_warnings(caught)


def _check_expect(model: Any, expect: list[str], groups: dict[str, str] | None) -> None:
    """Resolve ``--expect`` before LoRA wraps the model: a bad name is a usage error, not a LoRA failure.

    The names resolve by the one rule of ``GroupMap.match`` (a group, its short name, a role, a glob, a
    module path), on the bare model; wrapping does not change group names.
    """
    from gradguard.core.audit import resolve_intent
    from gradguard.core.groups import build_groups

    try:
        resolve_intent(build_groups(model, groups), expect, what="--expect entry")
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None


def cmd_audit(args: argparse.Namespace) -> int:
    from gradguard.core.audit import audit_requires_grad
    from gradguard.report.model import _jsonable

    expect = _split(args.expect) or None
    groups = _parse_groups(args.group)
    if args.modules_to_save and not args.lora_target:
        raise UsageError("--modules-to-save needs --lora-target (the LoRA set-up it belongs to)")
    if args.lora_r < 1:
        raise UsageError(f"--lora-r must be >= 1, got {args.lora_r}")
    with _quiet():
        model, how = load_target(args.target, args.trust_remote_code)
    unfrozen = _unfreeze(model, _split(args.unfreeze)) if args.unfreeze else []
    if expect:
        _check_expect(model, expect, groups)
    changes: Any = None
    notes: list[str] = []
    if args.lora_target:
        model, changes, notes = _apply_lora(model, args, expect)
    try:
        audit = audit_requires_grad(model, expect_trainable=expect, groups=groups)
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None

    if args.json:
        print(json.dumps(_jsonable(audit.to_dict()), indent=2, allow_nan=False))
        return OK if audit.ok else ERRORS
    console = _console()
    console.print(f"[bold]gradguard audit[/]: {how}")
    if unfrozen:
        console.print(f"unfroze before LoRA: {', '.join(unfrozen)}")
    if changes is not None:
        save = f"; modules_to_save={_split(args.modules_to_save)}" if args.modules_to_save else ""
        console.print(f"get_peft_model (LoRA r={args.lora_r} on {args.lora_target}{save}) changed requires_grad:")
        for line in changes.lines():
            console.print(f"  {line}", markup=False)
        for note in notes:
            console.print(f"[yellow]warning[/]: {note}", markup=True)
    console.print(audit)
    return OK if audit.ok else ERRORS


def _parse_groups(values: Sequence[str] | None) -> dict[str, str] | None:
    out = {}
    for item in values or []:
        pattern, sep, name = item.partition("=")
        if not sep or not pattern or not name:
            raise UsageError(f"--group {item!r}: write GLOB=NAME[:ROLE], e.g. --group 'vpm.*=vision_tower:vision'")
        out[pattern] = name
    return out or None


# -- gradguard report -------------------------------------------------------------------------------------


def report_exit_status(report: Any) -> int:
    """``gradguard report``'s exit status: 0 for a healthy report; 1 (:data:`ERRORS`) when it holds a fault or
    an error finding, or the run ended ``aborted`` / ``interrupted``, so that CI can gate on it.

    >>> from gradguard.report.model import Report
    >>> report_exit_status(Report()), report_exit_status(Report(status="aborted"))
    (0, 1)
    """
    healthy = report.status == "healthy" and report.ok
    return OK if healthy else ERRORS


def _load_report(path: str) -> Any:
    from gradguard.report.model import Report

    try:
        return Report.load(path)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    except IsADirectoryError:
        raise UsageError(f"{path}: pass gradguard-report.json or the folder that holds it") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc})") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise UsageError(f"{path}: {exc}") from None


def cmd_report(args: argparse.Namespace) -> int:
    from gradguard.report.render import to_markdown

    report = _load_report(args.path)
    if args.plot:
        try:
            from gradguard.report.plot import plot_report

            out = plot_report(report, args.plot)
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'gradguard[plot]'") from None
        except OSError as exc:
            raise UsageError(f"cannot write {args.plot}: {_first_line(exc)}") from None
        print(f"wrote {out}", file=sys.stderr)
    if args.markdown:
        sys.stdout.write(to_markdown(report))
    elif not args.plot or args.show:
        _console().print(report)
    status = report_exit_status(report)
    if status and not args.exit_zero:
        # Said on stderr, so that a CI log shows why the job failed even when stdout went to a file.
        print(
            f"gradguard report: the report is not healthy (status {report.status}); exit status {status} "
            "(--exit-zero to always exit 0)",
            file=sys.stderr,
        )
        return status
    return OK


# -- gradguard explain ------------------------------------------------------------------------------------


def cmd_explain(args: argparse.Namespace) -> int:
    from gradguard.codes import RULES, rule

    if args.list:
        if args.plain:
            for r in RULES.values():
                print(f"{r.code}  {r.kind:<28} {r.severity:<8} {r.title}")
            return OK
        from rich.table import Table

        table = Table(title="gradguard finding codes", title_justify="left")
        for col in ("code", "kind", "severity", "meaning"):
            table.add_column(col)
        for r in RULES.values():
            table.add_row(r.code, r.kind, r.severity, r.title)
        _console().print(table)
        return OK
    if not args.code:
        raise UsageError("name a code or kind (e.g. gradguard explain GG101), or use --list")
    try:
        found = rule(args.code)
    except KeyError:
        raise UsageError(f"unknown finding code or kind {args.code!r}; known codes: {', '.join(RULES)}") from None
    text = found.markdown()
    if args.plain:
        sys.stdout.write(text)
    else:
        from rich.markdown import Markdown

        _console().print(Markdown(text, code_theme="ansi_dark"))
    return OK


# -- gradguard demo ---------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    # The demo trains on the CPU; without this, DeepSpeed (when installed, imported by the Trainer) prints
    # a "Setting accelerator to CPU" warning into the demo's output. Only this process is affected.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from gradguard.demo import run_demo

    return run_demo(output=args.output)


# -- the parser --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gradguard",
        description="Training-health diagnostics for PyTorch: what will train, what went wrong, where.",
        epilog="Exit status: 0 ok, 1 the audit found errors or the report is not healthy, 2 bad usage, 3 internal "
        "error. Docs: docs/cli.md",
    )
    parser.add_argument("--version", action="version", version=f"gradguard {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_audit(sub)
    _add_report(sub)
    _add_explain(sub)
    _add_demo(sub)
    return parser


def _add_audit(sub: Any) -> None:
    audit = sub.add_parser(
        "audit",
        help="which module groups will train, before a step runs (exit 1 on errors)",
        description="Load a model, apply LoRA the way you do, and show per group (vision tower, connector, "
        "language model, head) what trains; errors (e.g. a group you expect to train is frozen) exit 1.",
    )
    audit.add_argument(
        "target", metavar="TARGET", help="a save_pretrained directory, or module:callable returning a model"
    )
    audit.add_argument(
        "--expect",
        metavar="A,B",
        help="groups (full or short names), roles or globs that must train, e.g. vision_tower,resampler or vision",
    )
    audit.add_argument(
        "--unfreeze", metavar="A,B", help="requires_grad_(True) on these module paths before LoRA (tune_vision=True)"
    )
    audit.add_argument(
        "--lora-target",
        metavar="NAMES|REGEX",
        help="apply LoRA: comma-separated module names (q_proj,v_proj) or one regex PEFT full-matches",
    )
    audit.add_argument("--modules-to-save", metavar="A,B", help="LoRA's modules_to_save, e.g. resampler")
    audit.add_argument("--lora-r", type=int, default=8, metavar="R", help="LoRA rank (default 8)")
    audit.add_argument(
        "--group",
        action="append",
        metavar="GLOB=NAME[:ROLE]",
        help="override group detection (repeatable), e.g. 'vpm.*=vision_tower:vision'",
    )
    audit.add_argument("--json", action="store_true", help="print the audit as JSON (groups, findings) on stdout")
    audit.add_argument(
        "--trust-remote-code", action="store_true", help="allow a directory's own modeling code (auto_map)"
    )
    audit.set_defaults(func=cmd_audit)


def _add_report(sub: Any) -> None:
    report = sub.add_parser(
        "report",
        help="render a saved gradguard-report.json (console, Markdown, plot); exit 1 unless it is healthy",
        description="Render the report GradGuard wrote (gradguard-report.json, or the folder that holds it). "
        "Exits 1 when the report holds a fault or an error finding, or the run was aborted or interrupted "
        "(a CI gate); 0 for a healthy report.",
    )
    report.add_argument("path", metavar="PATH", help="gradguard-report.json or its folder (e.g. the output_dir)")
    report.add_argument("--markdown", action="store_true", help="print Markdown instead of the console rendering")
    report.add_argument(
        "--plot", metavar="FILE.png", help="write grad norms and loss over steps as a PNG (needs gradguard[plot])"
    )
    report.add_argument("--show", action="store_true", help="with --plot, also print the report")
    report.add_argument(
        "--exit-zero", action="store_true", help="exit 0 even when the report is not healthy (render only)"
    )
    report.set_defaults(func=cmd_report)


def _add_explain(sub: Any) -> None:
    explain = sub.add_parser(
        "explain",
        help="what a finding code means, why it matters, how to fix it",
        description="Explain a finding code (GG101) or kind (nonfinite_loss): what, why, example, fix.",
    )
    explain.add_argument("code", nargs="?", metavar="CODE", help="a code like GG101, or a kind like nonfinite_loss")
    explain.add_argument("--list", action="store_true", help="list every code")
    explain.add_argument("--plain", action="store_true", help="plain Markdown text, no rich rendering")
    explain.set_defaults(func=cmd_explain)


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="the MiniCPM-V LoRA story end to end, offline, in seconds",
        description="A LoRA fine-tune of a tiny MiniCPM-V-2.x-shaped model goes NaN: first the plain HF "
        "Trainer (loss 0.0, grad_norm nan), then the same run with GradGuard.",
    )
    demo.add_argument(
        "--output",
        metavar="DIR",
        default=None,
        help="where to write the report (default: ./gradguard-demo in the current directory)",
    )
    demo.set_defaults(func=cmd_demo)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. Returns the exit status (``main(["explain", "GG101"])`` in tests).

    >>> main(["explain", "GG101", "--plain"])  # doctest: +SKIP
    0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, argparse errors
        return exc.code if isinstance(exc.code, int) else USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE
    # gradguard's logger would repeat on stderr what the CLI prints itself.
    logger = logging.getLogger("gradguard")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the CLI never downloads anything
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"gradguard {args.command}: error: {exc}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        print("gradguard: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"gradguard {args.command}: internal error: {_first_line(exc)} (rerun with 'gradguard --debug "
            f"{args.command} …' for the traceback, and please report it)",
            file=sys.stderr,
        )
        return INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
