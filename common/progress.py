"""Progress of a long phase, readable in a terminal and in a log file.

In a terminal (stderr is a TTY) a tqdm bar redraws in place. Anywhere else (a log
file, a batch job, CI) a bar would write one carriage-return update per item, so
instead a plain line is logged every `every` items or every `seconds` seconds,
whichever comes first:

    synthgrid 300/1200 (25%)  0.21 s/utt  4.8 utt/s  elapsed 1m03s  ETA 3m09s

A library call that runs a long loop of its own (k-means' `fit`) reports through a hook
into that loop (data/targets.py), so it gets the same lines with an ETA.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger(__name__)


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def format_duration(seconds: float) -> str:
    """3725 -> '1h02m05s', 63 -> '1m03s', 4.2 -> '4.2s'."""
    if seconds != seconds or seconds < 0:  # NaN or negative: unknown
        return "?"
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def progress_line(desc: str, done: int, total: int | None, elapsed: float, unit: str = "it", window_seconds: float | None = None,
                  window_items: int | None = None, extra: str = "") -> str:
    """One progress line: count, time per item, throughput, elapsed and ETA.

    Time per item comes from the last window (`window_seconds` over `window_items`) when
    given, else from the whole phase; the ETA uses the same rate.
    """
    if window_items:
        per_item = window_seconds / window_items
    else:
        per_item = elapsed / done if done else float("nan")
    parts = [f"{desc} {done}/{total} ({100 * done / total:.0f}%)" if total else f"{desc} {done}"]
    if per_item == per_item:
        parts.append(f"{per_item:.3g} s/{unit}")
        if per_item > 0:
            parts.append(f"{1 / per_item:.3g} {unit}/s")
    parts.append(f"elapsed {format_duration(elapsed)}")
    if total and per_item == per_item:
        parts.append(f"ETA {format_duration(max(0, total - done) * per_item)}")
    if extra:
        parts.append(extra)
    return "  ".join(parts)


class Progress:
    """Counts items of a phase; a tqdm bar in a terminal, periodic log lines otherwise.

        progress = Progress(total=len(jobs), desc="synthgrid", unit="utt")
        for job in jobs:
            ...
            progress.update()
        progress.close()          # logs the final line (count, rate, total time)

    `every`: also log after this many items (None: by time only); `seconds`: log at
    least this often while items arrive. `enabled=False` (e.g. non-zero DDP ranks)
    shows and logs nothing. `terminal` defaults to "is stderr a TTY".
    """

    def __init__(self, total: int | None, desc: str, unit: str = "it", *, every: int | None = None, seconds: float = 30.0,
                 initial: int = 0, enabled: bool = True, terminal: bool | None = None, logger: logging.Logger | None = None):
        self.total = total
        self.desc = desc
        self.unit = unit
        self.every = every
        self.seconds = seconds
        self.enabled = enabled
        self.log = logger or log
        self.terminal = stderr_is_terminal() if terminal is None else terminal
        self.done = initial
        self.start = time.perf_counter()
        self._start_count = initial
        self._last_time = self.start
        self._last_count = initial
        self._bar = None
        if enabled and self.terminal:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def update(self, n: int = 1, extra: str = "", quiet: bool = False, **postfix: Any) -> str | None:
        """Count `n` more items; returns the line it logged, if any (the bar shows `postfix`).

        `quiet=True`: the caller has just logged its own progress line (e.g. the training
        loop's step line), so count without logging and restart the time window.
        """
        self.done += n
        if not self.enabled:
            return None
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(**postfix, refresh=False)
            return None
        now = time.perf_counter()
        if quiet:
            self._last_time, self._last_count = now, self.done
            return None
        due = (self.every is not None and self.done - self._last_count >= self.every) or now - self._last_time >= self.seconds
        if not due:
            return None
        return self._emit(now, extra)

    def _emit(self, now: float, extra: str = "") -> str:
        line = progress_line(self.desc, self.done, self.total, now - self.start, self.unit,
                             window_seconds=now - self._last_time, window_items=self.done - self._last_count, extra=extra)
        self._last_time, self._last_count = now, self.done
        self.log.info("%s", line)
        return line

    def close(self, extra: str = "") -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            return
        if self.done != self._last_count or extra:
            now = time.perf_counter()
            items = self.done - self._start_count
            line = progress_line(self.desc, self.done, self.total, now - self.start, self.unit,
                                 window_seconds=now - self.start, window_items=items or None, extra=extra)
            self._last_time, self._last_count = now, self.done
            self.log.info("%s", line)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

