"""The differences of two flat configurations as lines a user reads in an error ("key: old -> new")."""

from __future__ import annotations

import json
from typing import Any, Mapping


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 20) -> list[str]:
    """Human-readable differences "key: old -> new" (keys only one side has show <absent>); at most `limit` lines
    and a count of the rest. Used for stage fingerprints (training/fingerprint.py) and federated checkpoints."""
    missing = object()
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, missing), new.get(key, missing)
        # key order inside a nested mapping is not a difference (training/fingerprint.py's digest sorts keys too)
        if json.dumps(a, default=str, sort_keys=True) != json.dumps(b, default=str, sort_keys=True):
            show = lambda v: "<absent>" if v is missing else repr(v)  # noqa: E731
            lines.append(f"{key}: {show(a)} -> {show(b)}")
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])
