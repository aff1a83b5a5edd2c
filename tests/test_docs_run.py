"""Every code block in ``README.md`` and ``docs/`` runs as written (issue 15).

How the runner reads a page:

- ```` ```python ```` blocks run **in order, in one fresh namespace per page**, in a process of the page's own
  (forked from one that imported torch and transformers, see ``ZYGOTE``) whose working directory is a new
  temporary folder (so ``report_dir="out"`` writes there). A page whose snippets need a model,
  arguments or data shows that set-up as a block of its own, visibly, before them: nothing is hidden.
- ```` ```bash ```` blocks whose first command is ``gradguard …`` (the console script of this environment) or
  ``./scripts/…`` run too, in the same folder, with ``bash -e -o pipefail``. Other shell blocks (``pip install``,
  ``torchrun``, ``swift sft``) and every other fence (text, yaml, output) are shown, not run.
- A block that cannot run in CI carries, on the line directly before its fence, exactly
  ``<!-- docs-runner: skip (REASON) -->`` (an HTML comment: invisible on the rendered page), e.g.
  ``<!-- docs-runner: skip (needs llamafactory) -->``.
- A block that raises (or a command that exits non-zero) fails the page's test; the traceback points at the
  page's own line numbers.
- ``docs/codes/*.md`` are generated from ``gradguard.codes`` and checked by ``tests/test_docs.py`` instead.

Run one page by hand: ``python tests/test_docs_run.py docs/getting-started.md``.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "docs" / "frameworks").glob("*.md")),
]
MARKER = re.compile(r"^<!-- docs-runner: skip \((?P<reason>[^()]+)\) -->$")
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
SHELL = {"bash", "sh", "shell", "console"}
TIMEOUT_S = 600  # per page; a guard against a hang, not a speed test


@dataclass
class Block:
    page: str  # absolute path: tracebacks then show the page's own lines (linecache reads the file)
    line: int  # 1-based line of the block's first code line in the page
    lang: str
    code: str
    skip: str | None  # the reason of a docs-runner skip marker

    @property
    def runs(self) -> bool:
        if self.skip is not None:
            return False
        if self.lang == "python":
            return True
        if self.lang in SHELL:
            first = next(
                (ln.split()[0] for ln in self.code.splitlines() if ln.strip() and not ln.lstrip().startswith("#")), ""
            )
            return first == "gradguard" or first.startswith("./scripts/")
        return False


def extract(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown page, in order, with their skip markers.

    Raises ``ValueError`` for a malformed or misplaced marker and for an unclosed fence: a marker that the
    runner cannot read would silently stop skipping (or never skip).
    """
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        text = lines[i]
        if "docs-runner" in text:
            if not MARKER.match(text.strip()):
                raise ValueError(f"{path}:{i + 1}: write the marker exactly `<!-- docs-runner: skip (REASON) -->`")
            if i + 1 >= len(lines) or not FENCE.match(lines[i + 1]):
                raise ValueError(f"{path}:{i + 1}: a docs-runner marker must be the line directly before a fence")
        m = FENCE.match(text)
        if not m:
            i += 1
            continue
        indent, lang = m.group("indent"), m.group("lang").lower()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{path}:{i + 1}: the fence opened here is never closed")
        marker = MARKER.match(lines[i - 1].strip()) if i else None
        body = [ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[i + 1 : end]]
        code = textwrap.dedent("\n".join(body)) + "\n"
        blocks.append(Block(str(path.resolve()), i + 2, lang, code, marker.group("reason") if marker else None))
        i = end + 1
    return blocks


# Running a page: the blocks run in a child process forked from a "zygote" that imported torch, transformers and
# peft once (about 10 s on these machines, which a subprocess per page would pay ten times over). A forked child
# starts from the zygote's state, which is that of a fresh interpreter with those modules imported: the page's
# namespace is new, and nothing a page does reaches the zygote or the next page.
ZYGOTE = r"""
import json, os, signal, subprocess, sys, traceback

import peft, torch, transformers  # noqa: F401  (the imports every page would pay)
from transformers import Trainer, TrainingArguments  # noqa: F401  (transformers imports these lazily)


def run_blocks(blocks, root):
    namespace = {"__name__": "__main__"}
    for b in blocks:
        where = f"{os.path.relpath(b['page'], root)}:{b['line']}"
        print(f"[docs-runner] {where} ({b['lang']})", flush=True)
        if b["lang"] == "python":
            try:
                # Padded with newlines so that line numbers in a traceback are the page's own.
                exec(compile("\n" * (b["line"] - 1) + b["code"], b["page"], "exec"), namespace)
            except BaseException:
                traceback.print_exc()
                print(f"[docs-runner] FAILED: the block at {where} raised", flush=True)
                return 1
        else:
            sys.stdout.flush()
            sys.stderr.flush()
            proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", b["code"]])
            if proc.returncode:
                print(f"[docs-runner] FAILED: the commands at {where} exited {proc.returncode}", flush=True)
                return 1
    return 0


print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the page's process
        code = 1
        try:
            os.chdir(req["cwd"])
            for fd, name in ((1, "stdout"), (2, "stderr")):
                os.dup2(os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            signal.alarm(int(req["timeout"]))  # a hang ends the page, not the suite
            code = run_blocks(json.load(open(req["blocks"])), req["root"])
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


@dataclass
class PageRun:
    returncode: int
    stdout: str
    stderr: str


class Runner:
    """Runs pages in forks of one zygote process (see :data:`ZYGOTE`); ``close()`` ends it."""

    def __init__(self) -> None:
        env = {
            **os.environ,
            # The console script of this environment first on the PATH: `gradguard …` blocks run this gradguard.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            "PYTHONPATH": os.pathsep.join(p for p in [str(ROOT / "src"), os.environ.get("PYTHONPATH", "")] if p),
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "WANDB_MODE": "disabled",
            "MPLBACKEND": "Agg",
            "DS_ACCELERATOR": "cpu",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        self._reply(300)

    def _reply(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            raise RuntimeError(f"the docs runner's zygote did not answer within {timeout:.0f} s")
        return dict(json.loads(line))

    def run(self, path: Path, workdir: Path, timeout: float = TIMEOUT_S) -> PageRun:
        """Run the page's runnable blocks in ``workdir``; returns the exit status and the output."""
        blocks = [b for b in extract(path) if b.runs]
        for b in blocks:  # the suite must not start itself (the README's ./scripts/test.sh)
            if "scripts/test.sh" in b.code:
                raise ValueError(f"{b.page}:{b.line}: mark this block `<!-- docs-runner: skip (...) -->`")
        files = {name: workdir / f".docs-runner-{name}" for name in ("blocks", "stdout", "stderr")}
        files["blocks"].write_text(json.dumps([asdict(b) for b in blocks]))
        request = {**{k: str(v) for k, v in files.items()}, "cwd": str(workdir), "root": str(ROOT), "timeout": timeout}
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        code = int(self._reply(timeout + 60)["code"])
        return PageRun(code, files["stdout"].read_text(), files["stderr"].read_text())

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def runner() -> Iterator[Runner]:
    r = Runner()
    yield r
    r.close()


def _ids(pages: list[Path]) -> list[str]:
    return [str(p.relative_to(ROOT)) for p in pages]


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_page_runs_as_written(page: Path, tmp_path: Path, runner: Runner) -> None:
    if not any(b.runs for b in extract(page)):
        pytest.skip("no runnable block on this page")
    start = time.monotonic()
    proc = runner.run(page, tmp_path)
    took = time.monotonic() - start
    assert proc.returncode == 0, (
        f"{page.relative_to(ROOT)} ({took:.0f} s):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    )


def test_every_page_is_read_and_its_markers_are_well_formed() -> None:
    names = _ids(PAGES)
    assert "README.md" in names and "docs/getting-started.md" in names and "docs/frameworks/trl.md" in names
    assert not [n for n in names if n.startswith("docs/codes/")]
    runnable = {n: sum(b.runs for b in extract(p)) for n, p in zip(names, PAGES)}
    for page in ("README.md", "docs/getting-started.md", "docs/integrations.md", "docs/testing.md", "docs/groups.md"):
        assert runnable[page] >= 2, (page, runnable[page])
    skipped = [(Path(b.page).name, b.skip) for p in PAGES for b in extract(p) if b.skip]
    assert ("llamafactory.md", "needs llamafactory") in skipped, skipped


# -- the runner itself: it must fail where a page fails ----------------------------------------------------------


def _page(tmp_path: Path, text: str) -> Path:
    page = tmp_path / "page.md"
    page.write_text(textwrap.dedent(text))
    return page


def test_runner_fails_a_raising_block_and_points_at_its_line(tmp_path: Path, runner: Runner) -> None:
    page = _page(
        tmp_path,
        """\
        # A page

        ```python
        x = 1
        ```

        Prose, then a fragment that uses a name nothing defined:

        ```python
        y = x + undefined_name
        ```
        """,
    )
    proc = runner.run(page, tmp_path)
    assert proc.returncode == 1
    assert "NameError" in proc.stderr and f'File "{page}", line 10' in proc.stderr
    assert "FAILED: the block at" in proc.stdout and "page.md:10" in proc.stdout


def test_runner_shares_one_namespace_per_page_skips_marked_blocks_and_runs_gradguard_commands(
    tmp_path: Path, runner: Runner
) -> None:
    page = _page(
        tmp_path,
        """\
        ```python
        value = 41
        ```

        <!-- docs-runner: skip (needs a GPU) -->
        ```python
        raise RuntimeError("never run")
        ```

        ```python
        value += 1
        open("answer.txt", "w").write(str(value))
        ```

        ```bash
        gradguard explain GG101 --plain > explain.txt
        ```

        ```bash
        pip install something-that-is-not-run
        ```

        ```text
        not code at all
        ```
        """,
    )
    blocks = extract(page)
    assert [(b.lang, b.runs, b.skip) for b in blocks] == [
        ("python", True, None),
        ("python", False, "needs a GPU"),
        ("python", True, None),
        ("bash", True, None),
        ("bash", False, None),
        ("text", False, None),
    ]
    work = tmp_path / "work"
    work.mkdir()
    proc = runner.run(page, work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (work / "answer.txt").read_text() == "42"
    assert "nonfinite_loss" in (work / "explain.txt").read_text()


def test_runner_fails_a_failing_command_and_rejects_bad_markers(tmp_path: Path, runner: Runner) -> None:
    page = _page(tmp_path, "```bash\ngradguard explain GG999\n```\n")
    proc = runner.run(page, tmp_path)
    assert proc.returncode == 1 and "exited 2" in proc.stdout
    bad = _page(tmp_path, "<!-- docs-runner: skip needs a GPU -->\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="write the marker exactly"):
        extract(bad)
    loose = _page(tmp_path, "<!-- docs-runner: skip (needs a GPU) -->\n\n```python\npass\n```\n")
    with pytest.raises(ValueError, match="directly before a fence"):
        extract(loose)


if __name__ == "__main__":  # python tests/test_docs_run.py PAGE...: run pages by hand, with their output
    page_runner = Runner()
    try:
        for arg in sys.argv[1:] or [str(p) for p in PAGES]:
            with tempfile.TemporaryDirectory() as work:
                t0 = time.monotonic()
                result = page_runner.run(Path(arg).resolve(), Path(work))
                sys.stdout.write(result.stdout[-4000:] + result.stderr[-4000:])
                print(f"== {arg}: exit {result.returncode} in {time.monotonic() - t0:.1f} s")
    finally:
        page_runner.close()
