"""Files every stage writes: atomic writes, `metrics.json` (flat keys, numbers) and the resolved `config.yaml`."""

from __future__ import annotations

import json
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np
import torch


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call `write(file)` on a temp file next to `path`, fsync, then rename it over `path`:
    readers see the old file or the whole new one, never a part (an interrupted write leaves
    only a `.<name>.*.tmp` file, which nothing picks up)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (a newline is added) and fsync: a log that grows by a record per step costs the record, not
    the file. An interrupted append can leave a last line without its newline; readers drop it
    (:func:`read_jsonl`)."""
    with open(path, "ab") as f:
        f.write(line.encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """The records of a JSON-lines file (a run's `log.jsonl`, the federation's round log), in order. A last line
    without its newline (an append cut off) is not a record; any other line that does not parse is an error naming
    the file and line."""
    complete = Path(path).read_bytes().split(b"\n")[:-1]  # what follows the last newline: b"" or a cut-off append
    records = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not a JSON record ({error}); the file is damaged") from error
    return records


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dicts -> flat `a/b` keys; only numbers survive (bools become 0/1)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}/"))
        elif isinstance(value, (bool, np.bool_)):
            flat[name] = float(value)
        elif isinstance(value, (int, float, np.integer, np.floating)):
            flat[name] = float(value) if not isinstance(value, (int, np.integer)) else int(value)
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            flat[name] = float(value.item())
    return flat


def write_metrics(directory: str | os.PathLike, metrics: Mapping[str, Any]) -> Path:
    """Write `metrics.json` (flat, numbers only; NaN/inf written as null) atomically."""
    flat = flatten_metrics(metrics)
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in flat.items()}
    path = Path(directory) / "metrics.json"
    atomic_write_text(path, json.dumps(clean, indent=2, sort_keys=True) + "\n")
    return path


def save_config(directory: str | os.PathLike, cfg: Any) -> Path:
    """Write the resolved config next to a stage's outputs."""
    from omegaconf import OmegaConf

    path = Path(directory) / "config.yaml"
    atomic_write_text(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


def zip_integrity_error(path: str | os.PathLike) -> str | None:
    """Why the zip archive at `path` (a torch checkpoint since torch 1.6) is damaged, or None if it is
    intact: the central directory must read and every member must match the CRC-32 stored when it was
    written. torch.load itself checks neither, so flipped bytes in tensor data would load silently."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError) as exc:
        return f"not a complete zip archive ({type(exc).__name__}: {exc})"
    if bad is not None:
        return f"member {bad!r} does not match its stored CRC-32 (the file was modified or damaged after it was written)"
    return None


def read_text(path: str | os.PathLike, error: type[Exception] = ValueError) -> str:
    """A UTF-8 text file (manifest, transcript, tokenizer, k-means labels); a file that is not
    valid UTF-8 raises `error` naming the path and the offending byte, not a bare UnicodeDecodeError."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(f"{path}:{line}: not valid UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}: {e.reason}); "
                    "expected UTF-8 (re-encode the file, e.g. `iconv -f latin1 -t utf-8`)") from e


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (read in chunks), for formats without a checksum of their own."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
