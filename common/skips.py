"""Counting the items a stage skips under `data.on_error=skip`, reported once per stage."""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger(__name__)


class SkipCounter:
    """Counts skipped items per reason (`data.on_error=skip`) and reports them once."""

    def __init__(self, stage: str):
        self.stage = stage
        self.reasons: Counter[str] = Counter()
        self.examples: dict[str, str] = {}

    def skip(self, reason: str, detail: str) -> None:
        self.reasons[reason] += 1
        self.examples.setdefault(reason, detail)
        log.warning("%s: skipped (%s): %s", self.stage, reason, detail)

    @property
    def total(self) -> int:
        return sum(self.reasons.values())

    def report(self) -> dict[str, int]:
        if self.total:
            lines = [f"  {n} x {r} (e.g. {self.examples[r]})" for r, n in self.reasons.most_common()]
            log.warning("%s: %d items skipped:\n%s", self.stage, self.total, "\n".join(lines))
        return {f"skipped/{r}": n for r, n in self.reasons.items()} | {"skipped/total": self.total}
