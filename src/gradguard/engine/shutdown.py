"""Reports that survive: close every open guard when the process is stopped or exits.

A run that is interrupted never reaches the end of training: the HF ``Trainer`` does not call
``on_train_end`` when an exception (a ``KeyboardInterrupt`` from Ctrl-C, a ``SIGTERM`` from a scheduler
or ``torchrun``) leaves ``trainer.train()``, and a plain loop may never call ``guard.close()``. So an
open guard is tracked here, and closed (hooks removed, report written) when

- the process gets ``SIGTERM`` or ``SIGINT``: gradguard's handler closes the open guards, then hands
  the signal to the handler that was there before (``SIGINT`` still raises ``KeyboardInterrupt``;
  a default ``SIGTERM`` still ends the process with the same status), so the run's behaviour is
  unchanged but for the report on disk;
- the interpreter exits (``atexit``);
- a new guard starts on the same model (a stale guard of an interrupted run would count twice).

Handlers are installed only from the main thread (Python allows no other), never over a signal that is
ignored or handled outside Python, and put back when the last guard closes. Guards are held weakly:
tracking one never keeps a model alive.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import weakref
from types import FrameType
from typing import Any, Protocol

log = logging.getLogger("gradguard")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Closable(Protocol):
    model: Any

    def close(self) -> Any: ...


_open: weakref.WeakSet[Any] = weakref.WeakSet()
_previous: dict[int, Any] = {}  # signal -> the handler gradguard's replaced (and calls after its own work)
_lock = threading.Lock()
_atexit_registered = False


def register(guard: _Closable) -> None:
    """Track an open guard; on first use, install the exit and signal handlers."""
    global _atexit_registered
    for other in list(_open):
        if other is not guard and other.model is guard.model:
            log.info("gradguard: closing the guard of an earlier, interrupted run on the same model")
            _close(other)
    with _lock:
        _open.add(guard)
        if not _atexit_registered:
            atexit.register(close_all)
            _atexit_registered = True
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _SIGNALS:
        if sig in _previous:
            continue
        try:
            prev = signal.getsignal(sig)
            if prev is None or prev == signal.SIG_IGN:  # handled outside Python, or ignored on purpose
                continue
            signal.signal(sig, _on_signal)
            _previous[sig] = prev
        except (ValueError, OSError) as exc:  # pragma: no cover - e.g. an embedded interpreter
            log.debug("gradguard: cannot handle signal %s (%s)", sig, exc)


def unregister(guard: _Closable) -> None:
    """Stop tracking a closed guard; when none is left, put the previous signal handlers back."""
    with _lock:
        _open.discard(guard)
        if _open:
            return
    if threading.current_thread() is not threading.main_thread():
        return
    for sig, prev in list(_previous.items()):
        try:
            if signal.getsignal(sig) is _on_signal:
                signal.signal(sig, prev)
                del _previous[sig]
            # else someone installed a handler over ours: keep ours callable in their chain
        except (ValueError, OSError):  # pragma: no cover
            pass


def open_guards() -> list[Any]:
    """The guards currently open in this process (for tests and debugging)."""
    return list(_open)


def close_all() -> None:
    """Close every open guard: remove its hooks and write its report."""
    for guard in list(_open):
        _close(guard)


def _close(guard: _Closable) -> None:
    try:
        guard.close()
    except Exception as exc:  # closing is best effort here: the process is stopping
        log.error("gradguard: could not close a guard (%s: %s)", type(exc).__name__, exc)
    finally:
        _open.discard(guard)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    prev = _previous.get(signum, signal.SIG_DFL)  # before close_all(): the last close puts it back
    close_all()
    if callable(prev):
        prev(signum, frame)  # e.g. SIGINT's default_int_handler raises KeyboardInterrupt
        return
    # The default action (terminate): put it back and deliver the signal again, so the process ends
    # exactly as it would have without gradguard (exit status -SIGTERM).
    signal.signal(signum, signal.SIG_DFL)
    _previous.pop(signum, None)
    os.kill(os.getpid(), signum)
