"""Reports that survive: close every open guard when the process is stopped or exits.

A run that is interrupted never reaches the end of training: the HF ``Trainer`` does not call
``on_train_end`` when an exception (a ``KeyboardInterrupt`` from Ctrl-C, a ``SIGTERM`` from a scheduler
or ``torchrun``) leaves ``trainer.train()``, and a plain loop may never call ``guard.close()``. So an
open guard is tracked here, and closed (hooks removed, report written) when

- the process gets ``SIGTERM`` or ``SIGINT``: gradguard's handler closes the open guards (status
  ``interrupted``), then hands the signal to the handler that was there before (``SIGINT`` still raises
  ``KeyboardInterrupt``; a default ``SIGTERM`` still ends the process with the same status), so the run's
  behaviour is unchanged but for the report on disk;
- an exception escapes to the top of the program (``sys.excepthook``): the guards close with status
  ``aborted`` (its type and message in the report), then the previous hook prints it as before;
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
import sys
import threading
import weakref
from types import FrameType, TracebackType
from typing import Any, Protocol

log = logging.getLogger("gradguard")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Closable(Protocol):
    model: Any

    def close(self, error: BaseException | None = None, *, signal: str | None = None) -> Any: ...


_open: weakref.WeakSet[Any] = weakref.WeakSet()
_previous: dict[int, Any] = {}  # signal -> the handler gradguard's replaced (and calls after its own work)
_lock = threading.Lock()
_atexit_registered = False
_previous_excepthook: Any = None


def register(guard: _Closable) -> None:
    """Track an open guard; on first use, install the exit and signal handlers."""
    global _atexit_registered
    for other in list(_open):
        if other is not guard and other.model is guard.model:
            log.info("gradguard: closing the guard of an earlier, interrupted run on the same model")
            _close(other)
    global _previous_excepthook
    with _lock:
        _open.add(guard)
        if not _atexit_registered:
            atexit.register(close_all)
            _atexit_registered = True
        if _previous_excepthook is None:
            _previous_excepthook, sys.excepthook = sys.excepthook, _on_uncaught
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
    global _previous_excepthook
    with _lock:
        _open.discard(guard)
        if _open:
            return
        if _previous_excepthook is not None and sys.excepthook is _on_uncaught:
            sys.excepthook, _previous_excepthook = _previous_excepthook, None
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


def close_all(error: BaseException | None = None, *, signal: str | None = None) -> None:
    """Close every open guard: remove its hooks and write its report (``error`` / ``signal``: what ended the run)."""
    for guard in list(_open):
        _close(guard, error, signal)


def _close(guard: _Closable, error: BaseException | None = None, signal: str | None = None) -> None:
    try:
        guard.close(error, signal=signal)
    except Exception as exc:  # closing is best effort here: the process is stopping
        log.error("gradguard: could not close a guard (%s: %s)", type(exc).__name__, exc)
    finally:
        _open.discard(guard)


def _on_uncaught(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    hook = _previous_excepthook or sys.__excepthook__  # before close_all(): the last close puts it back
    close_all(error)
    hook(kind, error, tb)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    prev = _previous.get(signum, signal.SIG_DFL)  # before close_all(): the last close puts it back
    close_all(signal=signal.Signals(signum).name)
    if callable(prev):
        prev(signum, frame)  # e.g. SIGINT's default_int_handler raises KeyboardInterrupt
        return
    # The default action (terminate): put it back and deliver the signal again, so the process ends
    # exactly as it would have without gradguard (exit status -SIGTERM).
    signal.signal(signum, signal.SIG_DFL)
    _previous.pop(signum, None)
    os.kill(os.getpid(), signum)
