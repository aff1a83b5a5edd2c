#!/usr/bin/env python3
"""The version matrix: gradguard's core suite and ``gradguard demo`` on the stacks users run.

    python3 scripts/matrix.py                  # every leg: build its venv, run the demo and the core suite
    python3 scripts/matrix.py floor tf4.57     # some legs
    python3 scripts/matrix.py --list           # the legs, their pinned versions, the core test files
    python3 scripts/matrix.py --summary        # the table and closing line over the results already there

Each leg is a venv under ``.venvs/matrix/<leg>`` with one pinned stack (Python, torch, transformers, peft,
accelerate, trl), gradguard installed from this checkout (``-e .``, so a pin outside ``pyproject.toml``'s
ranges fails the install) and the test tools. The default leg, the current transformers 5.x, is not here:
it is the README's ``./scripts/test.sh`` (the whole suite), which ``.ci/run`` runs beside this script and
whose results ``--summary`` folds in (``--default-junit``). ``docs/versions.md`` explains the choices.

Installs use uv (a few seconds per venv against a minute for pip): it unpacks each wheel once into its cache
and hardlinks it into every venv. torch 2.13.0 is the CPU build that lies on this machine's disk; pip finds it
there (its config), uv does not, so it is fetched once with ``pip download`` and handed to uv as a file.
torch 2.4.1, the declared floor, comes from PyPI as its CUDA build (about 2.5 GB with the nvidia-* libraries
it loads at import); it runs on the CPU.

Results land in ``--results`` (default ``.venvs/matrix/results``): per leg ``<leg>.xml`` (JUnit),
``<leg>.json`` (versions, exit codes, times) and ``<leg>.log``. Exit status 0 only when every leg installed,
its demo exited 0 and its core suite passed. Standard library only; Python >= 3.10.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / ".venvs"
UV_VERSION = "0.13.9"
LOCAL_TORCH = "2.13.0"  # the CPU build on this machine's disk (see the module docstring)

# The core suite: what must hold on every supported stack. Groups and roles on every family the installed
# transformers has, the static audit, the HF Trainer callback (TRL's SFTTrainer included), localisation, the
# plain-loop / Accelerate / Lightning integrations and the model zoo. tests/test_demo.py is left to the default
# leg: each leg runs `gradguard demo` itself and checks its report (demo_problems), and running the demo a
# second time would cost a leg a fifth of its time.
CORE_TESTS = [
    "tests/test_groups.py",
    "tests/test_audit.py",
    "tests/test_callback.py",
    "tests/test_localize.py",
    "tests/test_integrations_loops.py",
    "tests/test_models_zoo.py",
    "tests/test_cli.py",
]
# What the core suite needs beyond gradguard and the pinned stack (floats to the newest compatible release).
TEST_DEPS = ["pytest>=8,<10", "jsonschema>=4.20,<5", "matplotlib>=3.7.0,<4", "lightning>=2.4.0,<3", "datasets"]


@dataclass(frozen=True)
class Leg:
    name: str
    why: str
    python: str  # major.minor, found as `python<X.Y>` on PATH
    pins: dict[str, str] = field(default_factory=dict)  # package -> exact version; torch included

    @property
    def venv(self) -> Path:
        return VENVS / "matrix" / self.name

    @property
    def bin(self) -> Path:
        return self.venv / "bin"


LEGS = {
    leg.name: leg
    for leg in [
        Leg(
            "floor",
            "every declared floor at once (Python, torch, transformers, peft, accelerate, trl, numpy, rich, ...)",
            "3.10",
            {
                "torch": "2.4.1",
                "transformers": "4.46.3",
                "peft": "0.13.2",
                "accelerate": "1.0.1",
                "trl": "0.12.2",
                "numpy": "1.24.4",
                "rich": "13.0.0",
                # lightning 2.3 imports pkg_resources without depending on setuptools: 2.4 is the floor
                "lightning": "2.4.0",
                "matplotlib": "3.7.0",
            },
        ),
        Leg(
            "tf4.57",
            "the last transformers 4.x, with the PEFT of its time",
            "3.11",
            {"torch": LOCAL_TORCH, "transformers": "4.57.6", "peft": "0.17.1", "accelerate": "1.16.0", "trl": "1.16.0"},
        ),
        Leg(
            "tf5.0",
            "the first transformers 5.x",
            "3.11",
            {"torch": LOCAL_TORCH, "transformers": "5.0.0", "peft": "0.21.2", "accelerate": "1.16.0", "trl": "1.16.0"},
        ),
    ]
}
# The declared lower bounds that the floor leg must install exactly: pyproject.toml's dependencies, its
# `lightning` and `plot` extras, and accelerate and trl from its dev extra (gradguard does not import them;
# the Trainer and the tests do).
FLOOR_CHECKED = ("torch", "transformers", "peft", "numpy", "rich", "accelerate", "trl", "lightning", "matplotlib")

ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",  # 2 cores for two concurrent test processes: one thread each
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
    "MPLBACKEND": "Agg",
    "COLUMNS": "120",
    "PYTHONUNBUFFERED": "1",
    "UV_NO_PROGRESS": "1",
}
ENV.pop("VIRTUAL_ENV", None)
ENV.pop("PYTHONPATH", None)  # each leg imports the gradguard installed in its own venv


def log(msg: str) -> None:
    print(f"[matrix {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], out, timeout: float, **kw) -> int:
    """Run ``cmd`` with its output appended to the open file ``out``; a timeout is exit 124, as timeout(1)."""
    out.write(f"$ {' '.join(map(str, cmd))}\n")
    out.flush()
    try:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, timeout=timeout, **kw).returncode
    except subprocess.TimeoutExpired:
        out.write(f"\n[matrix] timed out after {timeout:.0f}s\n")
        return 124


# -- the declared ranges ---------------------------------------------------------------------------------


def declared_floors() -> dict[str, str]:
    """package -> lower bound, from pyproject.toml's dependencies and extras (a regex: 3.10 has no tomllib)."""
    text = (ROOT / "pyproject.toml").read_text()
    return {m[1].lower(): m[2] for m in re.finditer(r'"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?>=([0-9][^,"]*)', text)}


def check_floor_leg() -> list[str]:
    """The floor leg must test exactly the declared floors, or the declaration is not what CI proves."""
    floors, leg = declared_floors(), LEGS["floor"]
    problems = [
        f"pyproject.toml declares {pkg}>={floors.get(pkg)} but the floor leg installs {pkg}=={leg.pins.get(pkg)}"
        for pkg in FLOOR_CHECKED
        if floors.get(pkg) != leg.pins.get(pkg)
    ]
    python = re.search(r'requires-python\s*=\s*">=([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    if python is None or python[1] != leg.python:
        problems.append(f"pyproject.toml's requires-python is not >={leg.python}, the floor leg's Python")
    return problems


# -- building the venvs ----------------------------------------------------------------------------------


def uv() -> Path:
    """uv in a small venv of its own (built once with the machine's python3 and pip)."""
    tools = VENVS / "tools"
    exe = tools / "bin" / "uv"
    if not exe.exists():
        log(f"bootstrapping uv {UV_VERSION}")
        subprocess.run([sys.executable, "-m", "venv", str(tools)], check=True)
        pip = [str(tools / "bin" / "pip"), "install", "--quiet", f"uv=={UV_VERSION}"]
        subprocess.run(pip, check=True, env={**ENV, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    return exe


def local_torch_wheel() -> Path:
    """The torch CPU wheel from the machine's disk, fetched once by pip (uv does not look there)."""
    dest = VENVS / "wheels"
    found = sorted(dest.glob(f"torch-{LOCAL_TORCH}*.whl"))
    if not found:
        log(f"fetching the torch {LOCAL_TORCH} wheel with pip (the CPU build, where this machine has it)")
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(dest)]
        subprocess.run([*pip, f"torch=={LOCAL_TORCH}"], check=True, env={**ENV, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        found = sorted(dest.glob(f"torch-{LOCAL_TORCH}*.whl"))
    if "+cpu" not in found[0].name:
        log(f"note: {found[0].name} is not the CPU build (several GB with its CUDA libraries)")
    return found[0]


def find_python(version: str) -> str | None:
    """A Python ``version`` interpreter that runs: on PATH, else pyenv's (whose shim for a version that is
    installed but not selected is on PATH and fails, as on this project's machines)."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [
        shutil.which(f"python{version}"),
        *sorted(map(str, root.glob(f"versions/{version}.*/bin/python{version}"))),
    ]
    for exe in filter(None, candidates):
        probe = [exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"]
        try:
            proc = subprocess.run(probe, capture_output=True, text=True, timeout=60)
        except OSError:
            continue
        if proc.returncode == 0 and proc.stdout.strip() == version:
            return exe
    return None


_EDITABLE = threading.Lock()  # setuptools writes src/gradguard.egg-info while it builds: one build at a time


def install(leg: Leg, uv_exe: Path, torch_wheel: Path | None, results: Path) -> dict:
    start = time.monotonic()
    with open(results / f"{leg.name}.log", "w") as out:
        python = find_python(leg.python)
        if python is None:
            out.write(f"no working python{leg.python} (PATH, pyenv): the leg needs it\n")
            return {"install_rc": 127, "install_s": 0.0}
        if leg.venv.exists():
            shutil.rmtree(leg.venv)  # a leg is always built from its pins alone
        rc = run([str(uv_exe), "venv", "--quiet", "--python", python, str(leg.venv)], out, 120)
        local = leg.pins["torch"] == LOCAL_TORCH and torch_wheel is not None
        pins = [str(torch_wheel) if local else f"torch=={leg.pins['torch']}"]
        pins += [f"{p}=={v}" for p, v in leg.pins.items() if p != "torch"]
        uv_pip = [str(uv_exe), "pip", "install", "--python", str(leg.bin / "python")]
        if rc == 0:  # the stack and the test tools: the downloads, concurrent with the other legs
            rc = run([*uv_pip, *pins, *TEST_DEPS], out, 900, cwd=ROOT)
        if rc == 0:  # gradguard itself, with the pins restated: a pin outside pyproject.toml's ranges fails here
            with _EDITABLE:
                rc = run([*uv_pip, *pins, "-e", "."], out, 300, cwd=ROOT)
    return {"install_rc": rc, "install_s": round(time.monotonic() - start, 1)}


VERSIONS = """
import importlib.metadata as md, json, platform
names = ["torch", "transformers", "peft", "accelerate", "trl", "numpy", "rich", "lightning", "datasets", "pytest"]
out = {"python": platform.python_version()}
for n in names:
    try:
        out[n] = md.version(n)
    except md.PackageNotFoundError:
        out[n] = None
print(json.dumps(out))
"""


def versions(python: Path) -> dict:
    proc = subprocess.run([str(python), "-c", VERSIONS], capture_output=True, text=True, env=ENV, timeout=120)
    return json.loads(proc.stdout) if proc.returncode == 0 else {}


DEMO_SAYS = [  # what the user sees without gradguard, and what gradguard says (whitespace collapsed)
    "loss 0.0, grad_norm nan",
    "the first non-finite value appeared in the forward output of resampler (trainable)",
    "vpm was meant to train but get_peft_model froze it",
    "the poisoned update was skipped and the weights are intact",
]


def demo_problems(out_dir: Path, printed: str) -> list[str]:
    """What is wrong with the story ``gradguard demo`` told (``printed``) and the report it wrote (GG101 at
    step 3, born in the resampler, the update skipped), or nothing."""
    text = " ".join(printed.split())
    problems = [f"the demo did not say {s!r}" for s in DEMO_SAYS if s not in text]
    try:
        report = json.loads((out_dir / "gradguard-report.json").read_text())
    except (OSError, ValueError) as exc:
        return [*problems, f"no readable report: {exc}"]
    fault = report.get("fault") or {}
    origin = fault.get("origin") or {}
    expected = {
        "status": (report.get("status"), "fault"),
        "fault step": (fault.get("step"), 3),
        "fault code": (fault.get("code"), "GG101"),
        "origin group": (origin.get("group"), "resampler"),
        "weights intact": (fault.get("weights_intact"), True),
    }
    problems += [f"report {what}: {got!r}, expected {want!r}" for what, (got, want) in expected.items() if got != want]
    return problems


def test(leg: Leg, results: Path) -> dict:
    """``gradguard demo`` (the console script, as a user runs it) and its report, then the core suite."""
    info: dict = {"versions": versions(leg.bin / "python")}
    with open(results / f"{leg.name}.log", "a") as out:
        start = time.monotonic()
        demo_dir = leg.venv / "demo"
        shutil.rmtree(demo_dir, ignore_errors=True)
        demo_log = results / f"{leg.name}-demo.log"
        with open(demo_log, "w") as demo_out:
            info["demo_rc"] = run([str(leg.bin / "gradguard"), "demo", "--output", str(demo_dir)], demo_out, 600)
        if info["demo_rc"] == 0 and (problems := demo_problems(demo_dir, demo_log.read_text())):
            out.write("".join(f"[matrix] gradguard demo: {p}\n" for p in problems))
            info["demo_rc"] = "wrong story"
        out.write(f"[matrix] gradguard demo: exit {info['demo_rc']}, output in {demo_log}\n")
        info["demo_s"] = round(time.monotonic() - start, 1)
        start = time.monotonic()
        junit = results / f"{leg.name}.xml"
        junit.unlink(missing_ok=True)
        pytest = [str(leg.bin / "python"), "-m", "pytest", *CORE_TESTS, "-q", "-p", "no:cacheprovider"]
        info["tests_rc"] = run([*pytest, f"--junitxml={junit}"], out, 1800, cwd=ROOT)
        info["tests_s"] = round(time.monotonic() - start, 1)
    return info


# -- results ---------------------------------------------------------------------------------------------


def junit_counts(path: Path) -> dict:
    """passed / failed / skipped and the skip reasons, from a pytest JUnit file."""
    counts: dict = {"passed": 0, "failed": 0, "skipped": 0, "reasons": Counter(), "failures": []}
    if not path.exists():
        return counts
    for case in ET.parse(path).getroot().iter("testcase"):
        bad = case.find("failure")
        bad = bad if bad is not None else case.find("error")
        if bad is not None:
            counts["failed"] += 1
            name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
            counts["failures"].append((name, (bad.get("message") or "").splitlines()[:1]))
        elif (skip := case.find("skipped")) is not None:
            counts["skipped"] += 1
            counts["reasons"][skip.get("message", "").removeprefix("Skipped: ")] += 1
        else:
            counts["passed"] += 1
    return counts


COLUMNS = ("leg", "python", "torch", "transformers", "peft", "accelerate", "trl", "passed", "failed", "skipped")


def summary(results: Path, legs: list[str], default: Path | None) -> int:
    """One table over the legs' results, their skip reasons, and a closing ``N passed, N failed`` line."""
    rows = []
    if default is not None:  # .ci/run's default leg: default.xml, default.json (exit codes, seconds), its venv
        meta = results / "default.json"
        info = json.loads(meta.read_text()) if meta.exists() else {"tests_rc": "not run"}
        python = default / "bin" / "python"
        info["versions"] = versions(python) if python.exists() else {}
        rows.append(("default", info, junit_counts(results / "default.xml")))
    for name in legs:
        meta = results / f"{name}.json"
        info = json.loads(meta.read_text()) if meta.exists() else {"install_rc": "not run"}
        rows.append((name, info, junit_counts(results / f"{name}.xml")))
    table = [(*COLUMNS, "demo", "seconds")]
    ok = True
    totals: Counter[str] = Counter()
    for name, info, counts in rows:
        problems = [k for k in ("install_rc", "demo_rc", "tests_rc") if info.get(k, 0) != 0]
        if counts["passed"] == 0:
            problems.append("no test passed")
        if problems:
            ok = False
            print(f"{name}: FAILED ({', '.join(problems)}; see {results / (name + '.log')})")
            # CI shows only this script's output: name what failed, so the log file is not needed to start
            for test, message in counts["failures"]:
                print(f"  {name}: FAILED {test}: {' '.join(message)[:300]}")
            log_file = results / f"{name}.log"
            if not counts["failures"] and log_file.exists():  # an install or the demo failed: its last words
                print("".join(f"  {name}| {line}" for line in log_file.read_text().splitlines(True)[-15:]))
        totals.update({k: counts[k] for k in ("passed", "failed", "skipped")})
        v = info.get("versions", {})
        seconds = sum(info.get(k, 0) for k in ("install_s", "demo_s", "tests_s"))
        demo_rc = info.get("demo_rc", "-")
        demo = "ok" if demo_rc == 0 else (f"exit {demo_rc}" if isinstance(demo_rc, int) else str(demo_rc))
        cells = [str(v.get(k) or "-") for k in COLUMNS[1:7]] + [str(counts[k]) for k in COLUMNS[7:]]
        table.append((name, *cells, demo, f"{seconds:.0f}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    print()
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for name, _, counts in rows:
        for reason, n in sorted(counts["reasons"].items()):
            print(f"  {name}: {n} skipped: {reason}")
    print(f"matrix: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("legs", nargs="*", help=f"legs to run (default: all of {', '.join(LEGS)})")
    ap.add_argument("--list", action="store_true", help="print the legs and the core test files, run nothing")
    ap.add_argument("--summary", action="store_true", help="only print the table over the results already there")
    ap.add_argument("--results", type=Path, default=VENVS / "matrix" / "results")
    ap.add_argument(
        "--default",
        type=Path,
        metavar="VENV",
        help="fold in the default leg (./scripts/test.sh): its venv, and default.xml / default.json in --results",
    )
    ap.add_argument("--jobs", type=int, default=1, help="legs tested at once (default 1)")
    args = ap.parse_args(argv)
    legs = args.legs or list(LEGS)
    unknown = [name for name in legs if name not in LEGS]
    if unknown:
        ap.error(f"unknown legs {unknown}; known: {list(LEGS)}")
    if args.list:
        for leg in LEGS.values():
            pins = ", ".join(f"{p} {v}" for p, v in leg.pins.items())
            print(f"{leg.name}: Python {leg.python}, {pins}\n    {leg.why}")
        print("core suite:", " ".join(CORE_TESTS))
        return 0
    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    if args.summary:
        return summary(results, legs, args.default)

    mismatch = check_floor_leg()
    for line in mismatch:
        log(line)
    start = time.monotonic()
    uv_exe = uv()
    torch_wheel = local_torch_wheel() if any(LEGS[n].pins["torch"] == LOCAL_TORCH for n in legs) else None
    info: dict[str, dict] = {}
    # Installs are network and disk bound: all at once. Tests are CPU bound: --jobs at a time.
    with concurrent.futures.ThreadPoolExecutor(len(legs)) as pool:
        futures = {name: pool.submit(install, LEGS[name], uv_exe, torch_wheel, results) for name in legs}
        for name, fut in futures.items():
            info[name] = fut.result()
            log(f"{name}: installed in {info[name]['install_s']}s (exit {info[name]['install_rc']})")

    def one(name: str) -> None:
        if info[name]["install_rc"] == 0:
            log(f"{name}: gradguard demo and the core suite ...")
            info[name].update(test(LEGS[name], results))
            c = junit_counts(results / f"{name}.xml")
            log(
                f"{name}: demo exit {info[name]['demo_rc']} ({info[name]['demo_s']}s); core suite {c['passed']} "
                f"passed, {c['failed']} failed, {c['skipped']} skipped ({info[name]['tests_s']}s)"
            )
        (results / f"{name}.json").write_text(json.dumps(info[name], indent=1))

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(one, legs))
    log(f"matrix legs done in {time.monotonic() - start:.0f}s")
    rc = summary(results, legs, args.default)
    return 1 if mismatch else rc


if __name__ == "__main__":
    sys.exit(main())
