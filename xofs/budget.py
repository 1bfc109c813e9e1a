"""A bound on the CPU time of a computation Python offers no other way to stop: a regular expression that
backtracks (`/search/name_label:／^(a|a)+$／` against a long name runs for minutes in Python's `re`, as in
XO's JavaScript). The daemon answers every FUSE request from one thread, so such a search would stop the
whole mount.

`CpuBudget` arms the process's virtual timer (user CPU time, `ITIMER_VIRTUAL`, signal SIGVTALRM, which
nothing else here uses: pytest-timeout's SIGALRM is left alone). Python runs the handler in the main thread
between bytecodes, and `re` checks for signals while it matches, so the handler can end a match. It raises
only inside `CpuBudget.run`: elsewhere it just notes that the time is up, and the next `run` raises. So the
exception comes out of the bounded function, never out of the code around it.

Outside the main thread (where Python cannot install a handler) the budget bounds nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import TypeVar

from xofs.errors import XofsError

T = TypeVar("T")


class OverBudget(XofsError):
    """The computation used up its CPU time."""


class CpuBudget:
    """`with CpuBudget(seconds) as budget: budget.run(f, x)`: each `run` raises `OverBudget` once the block
    has used `seconds` of user CPU time."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._inside = False
        self._armed = False
        self._old_handler: signal.Handlers | Callable | int | None = None

    def __enter__(self) -> CpuBudget:
        if threading.current_thread() is threading.main_thread():
            self._old_handler = signal.signal(signal.SIGVTALRM, self._on_signal)
            signal.setitimer(signal.ITIMER_VIRTUAL, self.seconds)
            self._armed = True
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._armed:
            self._armed = False
            signal.setitimer(signal.ITIMER_VIRTUAL, 0)
            signal.signal(signal.SIGVTALRM, self._old_handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.expired = True
        if self._inside:
            raise OverBudget(f"used up its {self.seconds:g} s of CPU time")

    def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)`, ended by `OverBudget` if the budget runs out meanwhile (or ran out before)."""
        if self.expired:
            raise OverBudget(f"used up its {self.seconds:g} s of CPU time")
        self._inside = True
        try:
            return fn(*args)
        finally:
            self._inside = False
