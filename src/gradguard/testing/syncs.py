"""Count host syncs, and say which ones gradguard caused: the check behind "one host sync per step".

:class:`SyncCounter` is a context manager that counts every call that forces a device-to-host read and
splits them into gradguard's (a ``gradguard`` frame other than ``gradguard.testing`` is on the Python stack)
and everyone's:

- everywhere, the Python-level calls ``Tensor.item/tolist/cpu/numpy/__bool__/__float__/__int__/__index__``
  (on CPU nothing waits, so these are the calls that *would* wait on a GPU; a C++ ``.item()`` inside a
  torch op is invisible here);
- with ``cuda=True``, also every synchronizing CUDA call, as ``torch.cuda.set_sync_debug_mode("warn")``
  reports it (blocking copies and ``nonzero`` too). A warning is attributed by the Python stack it is
  raised on: the autograd thread's, for a gradient hook.

Used by ``benchmarks/run.py`` and ``tests/test_gpu.py``.

>>> import torch
>>> with SyncCounter() as syncs:
...     _ = torch.ones(()).item()
>>> syncs.total, syncs.gradguard
(1, 0)
"""

from __future__ import annotations

import sys
import warnings
from types import FrameType
from typing import Any

import torch

_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def gradguard_site(frame: FrameType | None) -> str | None:
    """``module:function:line`` of the innermost gradguard frame on the stack (not ``gradguard.testing``:
    that is the harness), or ``None`` when gradguard is not on it."""
    while frame is not None:
        mod = frame.f_globals.get("__name__", "")
        if mod == "gradguard" or (mod.startswith("gradguard.") and not mod.startswith("gradguard.testing")):
            return f"{mod}:{frame.f_code.co_name}:{frame.f_lineno}"
        frame = frame.f_back
    return None


class SyncCounter:
    """Host syncs while active: ``total`` and ``gradguard`` (Python-level calls, with gradguard's ``sites``
    and ``by_method``), and with ``cuda=True`` ``cuda_total`` / ``cuda_gradguard`` / ``cuda_sites`` (what
    CUDA's sync-debug mode reports). A ``.tolist()`` on a CUDA tensor counts in both."""

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self.total = 0
        self.gradguard = 0
        self.sites: dict[str, int] = {}
        self.by_method: dict[str, int] = {}
        self.cuda_total = 0
        self.cuda_gradguard = 0
        self.cuda_sites: dict[str, int] = {}
        self._saved: list[tuple[str, Any, bool]] = []

    def _wrap(self, name: str, orig: Any) -> Any:
        counter = self

        def wrapper(self_: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            counter.total += 1
            site = gradguard_site(sys._getframe(1))
            if site is not None:
                counter.gradguard += 1
                counter.sites[site] = counter.sites.get(site, 0) + 1
                counter.by_method[name] = counter.by_method.get(name, 0) + 1
            return orig(self_, *args, **kwargs)

        return wrapper

    def _on_warning(self, message: Any, category: Any, *rest: Any, **kw: Any) -> None:
        if "synchroniz" not in str(message).lower():
            self._show(message, category, *rest, **kw)
            return
        self.cuda_total += 1
        site = gradguard_site(sys._getframe(1))  # the raiser's stack is below this call
        if site is not None:
            self.cuda_gradguard += 1
            self.cuda_sites[site] = self.cuda_sites.get(site, 0) + 1

    def __enter__(self) -> SyncCounter:
        for name in _METHODS:
            orig = getattr(torch.Tensor, name)
            self._saved.append((name, orig, name in torch.Tensor.__dict__))
            setattr(torch.Tensor, name, self._wrap(name, orig))
        if self.cuda:
            self._ctx = warnings.catch_warnings()
            self._ctx.__enter__()
            # "always": the default action shows a warning once per line, which would undercount
            warnings.filterwarnings("always", message=".*synchroniz")
            self._show = warnings.showwarning
            warnings.showwarning = self._on_warning
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = self._show
            self._ctx.__exit__(None, None, None)
        for name, orig, own in reversed(self._saved):
            if own:
                setattr(torch.Tensor, name, orig)
            else:
                delattr(torch.Tensor, name)
        self._saved.clear()
