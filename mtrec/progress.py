"""Progress on a stream: a tqdm bar on a terminal, plain periodic lines otherwise (logs, CI).

The one owner of progress display for training and scoring. What a line says belongs to the
caller; this class keeps the clock, the bar and the choice between the two.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO, cast

__all__ = ["Progress", "format_seconds", "say"]


def say(stream: TextIO, enabled: bool, text: str) -> None:
    """Prints one line of progress (``enabled`` is the caller's ``progress=`` switch)."""
    if enabled:
        print(text, file=stream, flush=True)


def format_seconds(s: float) -> str:
    """``h:mm:ss``."""
    s = max(0, int(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Counts towards ``total`` units of work.

    On a terminal a tqdm bar moves with :meth:`advance` and refreshes its ``postfix`` at most
    every ``refresh_s`` seconds; elsewhere nothing moves and the caller prints lines with
    :meth:`line` when :attr:`plain` (enabled, no bar) says lines are wanted.
    """

    def __init__(
        self,
        total: int,
        *,
        desc: str,
        unit: str,
        stream: TextIO,
        enabled: bool,
        unit_scale: bool = False,
        refresh_s: float = 0.5,
    ) -> None:
        self.total, self.stream, self.enabled, self.refresh_s = total, stream, enabled, refresh_s
        self.start = self.shown = time.perf_counter()
        self.done = 0
        self.bar = None
        if enabled and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=stream, leave=False)

    @property
    def plain(self) -> bool:
        """Progress is wanted as printed lines (enabled, not a terminal)."""
        return self.enabled and self.bar is None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rate(self, amount: float) -> float:
        """``amount`` per second since the start (0 before any time has passed)."""
        elapsed = self.elapsed()
        return amount / elapsed if elapsed > 0 else 0.0

    def advance(self, done: int, postfix: Callable[[], dict[str, str]] | None = None) -> None:
        """Moves the bar to ``done``; ``postfix()`` is called only when the bar shows it."""
        self.done = done
        if self.bar is None:
            return
        self.bar.update(done - self.bar.n)
        now = time.perf_counter()
        if postfix is not None and (now - self.shown >= self.refresh_s or done == self.total):
            self.shown = now
            self.bar.set_postfix(**cast("dict[str, Any]", postfix()))

    def due(self, every_s: float) -> bool:
        """For plain lines by time: whether ``every_s`` seconds passed since the last one."""
        now = time.perf_counter()
        if self.plain and now - self.shown >= every_s:
            self.shown = now
            return True
        return False

    def line(self, text: str) -> None:
        say(self.stream, self.plain, text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
