"""Compression of client model updates (what a client actually uploads).

Flower has no update compression of its own, so it lives here, in user code.
A compressor turns the client's UPDATE ``delta = local_weights - global_weights``
(a dict ``parameter name -> array``) into a *payload*: a flat dict of small
numpy arrays whose keys are ``"<parameter name>::<field>"``. The payload is
exactly what goes into the reply ``ArrayRecord``; the server calls
:func:`decompress` to get the delta back.

Payload fields per parameter
----------------------------
* no compression: ``::dense`` float32, the delta itself.
* :class:`Int8Quantizer`: ``::q`` int8 (flattened), ``::scale`` float32 (one per
  block, or one per tensor), ``::block`` int64 (the block size, one value: it
  travels with the payload, because ``ceil(numel / n_blocks)`` is not the block
  size when the last block is short, e.g. 53 x 128 values in blocks of 256),
  ``::shape`` int64. Value ``x`` in a block with
  ``scale = max|block| / 127`` is sent as ``q = round(x / scale)``; the decoded
  ``q * scale`` differs from ``x`` by at most ``scale / 2`` (rounding), and
  ``scale <= max|block| / 127``. About 4x smaller than float32.
* :class:`TopKSparsifier`: ``::idx`` int32 flat indices and ``::val`` float32
  values of the ``k = ceil(fraction * numel)`` largest-magnitude entries, and
  ``::shape`` int64. 8 bytes per kept entry.

Packing: one array per update (what int8 and top-k actually send)
-----------------------------------------------------------------
Flower serialises every array of a reply with its own object id, dtype and
shape records (~0.45 KB each, measured): for a small update (the LoRA task's
8,756 values, 35 KB in float32) the per-tensor fields above would cost more in
overhead than the values themselves (int8 came out at 1.89x, top-k at 2.76x
on the wire). :class:`PackedCompressor` therefore concatenates the update's
parameters (in sorted name order) into one vector, compresses it as ONE tensor
with the quantiser/sparsifier above, and sends everything in ONE uint8 array
under the key ``"update::packed"``, little-endian:

* int8: header ``uint32[4] = (1, numel, block, n_scales)``, then, deflated
  (zlib, lossless), ``float32[n_scales]`` scales and ``int8[numel]``. Adam
  moves most coordinates by about the same amount, so most quantised values
  sit near +-127 and deflate saves ~20 % (measured on real client updates of
  the LoRA task): without it the packed int8 reply is 3.85x smaller than the
  dense one on the wire, Flower's ~1.3 KB of message overhead staying the same;
  with it, above 4x. The server inflates at most the size the header promises
  (a "zip bomb" cannot make it allocate more);
* top-k: header ``uint32[4] = (2, numel, k, index bytes)``, then the sorted
  indices as ``uint16[k]`` (``uint32`` when numel > 65,536), then the values as
  ``float16[k]`` (4 bytes per kept entry instead of 8; the fp16 rounding error
  goes into the error-feedback residual, so it is not lost either);
* top-k with int8 or int4 values (``value_bits`` 8 or 4): header ``uint32[4] = (3, numel, k, value_bits)``,
  then, deflated, a bitmask of the kept positions (``ceil(numel / 8)`` bytes,
  least significant bit first: 1 bit per value, cheaper than 16-bit indices once
  k > numel / 16, and deflate shrinks it further when it is sparse), one
  ``float32`` scale (``max|kept| / 127``, or ``/ 7`` for int4) and the values
  (``int8[k]``, or two int4 per byte, first in the low nibble).
  About 1 (int8) or 0.5 (int4) byte per kept entry plus N / 8 bytes: at the same
  bytes on the wire it keeps up to ~3x (int8) or ~5x (int4) more entries than fp16 values with 16-bit
  indices. Clients that run a few Adam steps move most coordinates by about the
  same amount, so what top-k drops is mostly entries about as large as those it
  keeps: on the population runs the largest half in int4 cost +0.1 WER points
  where the largest 5 % in fp16 cost 1.4, at 10.2x and 12.4x fewer bytes (18 % in int8
  was no better than 5 %; docs/results.md, session 12). The rounding error goes
  into the error-feedback residual like fp16's.

The server (:func:`decompress` with the global model's shapes) checks the
header against the global model (numel = its number of values) and the buffer
length against the header BEFORE allocating anything, then decodes through the
same per-tensor checks as above and splits the vector back into parameters.

Error feedback (top-k)
----------------------
What top-k drops is not lost: the client keeps it in a residual and adds it to
the next round's update before selecting (Stich et al. 2018; Karimireddy et al.
2019). The residual is per client and persists across rounds; the ClientApp
stores it in ``context.state`` (see :meth:`TopKSparsifier.state_dict`). Then the
sum of what was sent over T rounds equals the sum of the true updates minus the
current residual, whose size stays bounded, so the error of the sum does not
grow with T.

Compression and differential privacy
------------------------------------
With DP, compress AFTER clipping and noising. Anything computed from the
privatised update is post-processing and costs no privacy. The other order is
unsafe: the top-k support (which coordinates are sent) and the quantisation
scale (the max magnitude) are functions of the raw update, so sending them
un-noised leaks information that the DP analysis does not cover. The
error-feedback residual is computed from the noised update too, so it never
holds un-noised data. (With central DP the server clips and noises the
aggregate: there the client's compressed update is not privatised at all, and
the trust assumption is the usual one of central DP, a trusted server.)
"""

from __future__ import annotations

import math
import zlib
from typing import Mapping, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, torch.Tensor]
SEPARATOR = "::"
PAYLOAD_FIELDS = ("dense", "q", "scale", "block", "shape", "idx", "val", "packed")
PACKED_NAME = "update"  # the packed payload's one key is "update::packed"
FLAT = "__flat__"  # the name the packed update's concatenated vector has inside the per-tensor compressors
PACKED_INT8, PACKED_TOPK, PACKED_TOPK_QUANTIZED = 1, 2, 3
COMPRESSIONS = ("none", "int8", "topk")
TOPK_VALUE_BITS = (16, 8, 4)  # fp16 values + 16/32-bit indices (kind 2) | int8 / int4 values + a deflated bitmask (kind 3)
HEADER_WORDS = 4
MAX_DIMS = 8
# without a reference model, a payload may not declare more values than this (1 GiB of float32)
MAX_DECODED_VALUES = 2**28


class MalformedPayload(ValueError):
    """A payload that cannot be an update of the global model; the message says which field and why."""


def _as_numpy(value: ArrayLike) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().to(torch.float32).numpy()
    return np.asarray(value, dtype=np.float32)


def payload_key(name: str, field: str) -> str:
    return f"{name}{SEPARATOR}{field}"


def split_payload_key(key: str) -> tuple[str, str]:
    name, sep, field = key.rpartition(SEPARATOR)
    if not sep or not name or field not in PAYLOAD_FIELDS:
        raise ValueError(f"payload key {key!r} is not of the form '<parameter>{SEPARATOR}<field>' with field in {PAYLOAD_FIELDS}")
    return name, field


class NoCompression:
    """Sends the float32 delta as is (the baseline for byte counts)."""

    name = "none"

    def compress(self, delta: Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
        return {payload_key(name, "dense"): _as_numpy(value) for name, value in delta.items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        pass


class Int8Quantizer:
    """Symmetric int8 quantisation with one scale per tensor (`block_size=None`) or per block of `block_size` values."""

    name = "int8"

    def __init__(self, block_size: int | None = None):
        if block_size is not None and block_size < 1:
            raise ValueError(f"Int8Quantizer block_size must be >= 1 or None (per tensor), got {block_size}")
        self.block_size = block_size

    def quantize(self, value: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        return quantize_symmetric(_as_numpy(value), bits=8, block_size=self.block_size)

    def compress(self, delta: Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
        payload: dict[str, np.ndarray] = {}
        for name, value in delta.items():
            array = _as_numpy(value)
            q, scale = self.quantize(array)
            payload[payload_key(name, "q")] = q
            payload[payload_key(name, "scale")] = scale
            payload[payload_key(name, "block")] = np.asarray([self.block_size or max(array.size, 1)], dtype=np.int64)
            payload[payload_key(name, "shape")] = np.asarray(array.shape, dtype=np.int64)
        return payload

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        pass


class TopKSparsifier:
    """Keeps the `fraction` largest-magnitude entries of each tensor; with error feedback the rest is carried over."""

    name = "topk"

    def __init__(self, fraction: float, error_feedback: bool = True):
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"TopKSparsifier fraction must be in (0, 1], got {fraction}")
        self.fraction = fraction
        self.error_feedback = error_feedback
        self.residual: dict[str, np.ndarray] = {}

    def compress(self, delta: Mapping[str, ArrayLike], always: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """`always`: per tensor, a boolean mask (flat) of entries sent whatever their size; top-k keeps
        ``ceil(fraction x n)`` of the n others."""
        payload: dict[str, np.ndarray] = {}
        for name, value in delta.items():
            array = _as_numpy(value)
            flat = array.reshape(-1).copy()
            if self.error_feedback and name in self.residual:
                residual = self.residual[name]
                if residual.shape != flat.shape:
                    raise ValueError(
                        f"top-k residual for {name!r} has {residual.size} values but the update has {flat.size}; "
                        "the model changed between rounds"
                    )
                flat += residual
            forced = np.zeros(flat.size, dtype=bool) if always is None or name not in always else np.asarray(always[name], bool)
            if forced.shape != flat.shape:
                raise ValueError(f"top-k 'always' mask for {name!r} has shape {forced.shape}, the update has {flat.shape}")
            candidates = np.flatnonzero(~forced)
            k = min(candidates.size, max(1, math.ceil(self.fraction * candidates.size))) if candidates.size else 0
            if k == candidates.size:
                idx = np.arange(flat.size)
            else:
                chosen = candidates[np.argpartition(np.abs(flat[candidates]), candidates.size - k)[candidates.size - k:]]
                idx = np.concatenate([np.flatnonzero(forced), chosen])
            idx = np.sort(idx).astype(np.int32)
            val = flat[idx].astype(np.float32)
            if self.error_feedback:
                leftover = flat.copy()
                leftover[idx] = 0.0
                self.residual[name] = leftover
            payload[payload_key(name, "idx")] = idx
            payload[payload_key(name, "val")] = val
            payload[payload_key(name, "shape")] = np.asarray(array.shape, dtype=np.int64)
        return payload

    def state_dict(self) -> dict[str, np.ndarray]:
        """The per-client residual (kept on the client, never sent)."""
        return {name: value.copy() for name, value in self.residual.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.residual = {name: np.asarray(value, dtype=np.float32).reshape(-1).copy() for name, value in state.items()}


def flatten_update(delta: Mapping[str, ArrayLike]) -> np.ndarray:
    """The update's parameters concatenated in sorted name order (the order the server splits them back in)."""
    if not delta:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([_as_numpy(delta[name]).reshape(-1) for name in sorted(delta)])


class PackedCompressor:
    """int8 or top-k on the whole update as one vector, sent as one uint8 array (see "Packing" above).

    ``topk_value_bits`` (top-k only): 16 sends fp16 values with 16/32-bit indices, 8 / 4 int8 / int4 values with a bitmask.
    """

    def __init__(self, inner: Union[Int8Quantizer, TopKSparsifier], topk_value_bits: int = 16, topk_keep_biases: bool = False):
        if not isinstance(inner, (Int8Quantizer, TopKSparsifier)):
            raise TypeError(f"PackedCompressor packs Int8Quantizer or TopKSparsifier, got {type(inner).__name__}")
        if topk_value_bits not in TOPK_VALUE_BITS:
            raise ValueError(f"topk_value_bits must be one of {TOPK_VALUE_BITS}, got {topk_value_bits!r}")
        self.inner = inner
        self.name = inner.name
        self.topk_value_bits = topk_value_bits
        self.topk_keep_biases = topk_keep_biases

    def compress(self, delta: Mapping[str, ArrayLike]) -> dict[str, np.ndarray]:
        flat = flatten_update(delta)
        if isinstance(self.inner, TopKSparsifier) and self.topk_keep_biases:
            # every 1-d parameter (biases) in full, as PowerSGD and DGC leave vectors uncompressed: a few values
            # that every client moves the same way (the CTC head's bias sets blank vs letters) and that top-k
            # would otherwise drop for the many matrix entries Adam moves by about as much
            arrays = [_as_numpy(delta[n]) for n in sorted(delta)]
            keep = np.concatenate([np.full(a.size, a.ndim <= 1) for a in arrays]) if arrays else np.zeros(0, bool)
            fields = self.inner.compress({FLAT: flat}, always={FLAT: keep})
        else:
            fields = self.inner.compress({FLAT: flat})
        if isinstance(self.inner, Int8Quantizer):
            scale = fields[payload_key(FLAT, "scale")].astype("<f4")
            header = np.array([PACKED_INT8, flat.size, int(fields[payload_key(FLAT, "block")][0]), scale.size], dtype="<u4")
            body = zlib.compress(scale.tobytes() + fields[payload_key(FLAT, "q")].tobytes(), 9)
            parts = [header.view(np.uint8), np.frombuffer(body, dtype=np.uint8)]
        elif self.topk_value_bits in (8, 4):
            idx, val = fields[payload_key(FLAT, "idx")], fields[payload_key(FLAT, "val")]
            q, scale = quantize_symmetric(val, self.topk_value_bits)
            if self.inner.error_feedback:  # what the rounding drops is carried over like what top-k drops
                self.inner.residual[FLAT][idx] += val - q.astype(np.float32) * scale[0]
            mask = np.zeros(flat.size, dtype=bool)
            mask[idx] = True
            header = np.array([PACKED_TOPK_QUANTIZED, flat.size, idx.size, self.topk_value_bits], dtype="<u4")
            values = q.tobytes() if self.topk_value_bits == 8 else _pack_nibbles(q).tobytes()
            body = zlib.compress(np.packbits(mask, bitorder="little").tobytes() + scale.astype("<f4").tobytes() + values, 9)
            parts = [header.view(np.uint8), np.frombuffer(body, dtype=np.uint8)]
        else:
            idx, val = fields[payload_key(FLAT, "idx")], fields[payload_key(FLAT, "val")]
            index_dtype = "<u2" if flat.size <= 2**16 else "<u4"
            half = val.astype("<f2")
            if self.inner.error_feedback:  # what fp16 rounding drops is carried over like what top-k drops
                self.inner.residual[FLAT][idx] += val - half.astype(np.float32)
            header = np.array([PACKED_TOPK, flat.size, idx.size, np.dtype(index_dtype).itemsize], dtype="<u4")
            parts = [header.view(np.uint8), idx.astype(index_dtype).view(np.uint8), half.view(np.uint8)]
        return {payload_key(PACKED_NAME, "packed"): np.concatenate(parts)}

    def state_dict(self) -> dict[str, np.ndarray]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.inner.load_state_dict(state)


Compressor = Union[NoCompression, Int8Quantizer, TopKSparsifier, PackedCompressor]


def build_compressor(
    name: str, topk_fraction: float = 0.05, error_feedback: bool = True, int8_block_size: int | None = None,
    topk_value_bits: int = 16, topk_keep_biases: bool = False,
) -> Compressor:
    """What a client sends: ``none`` (float32 per parameter), ``int8`` / ``topk`` packed into one array
    (top-k values as fp16, or as int8 / int4 with a bitmask of the kept positions: ``topk_value_bits``; every
    1-d parameter in full with ``topk_keep_biases``)."""
    if name == "none":
        return NoCompression()
    if name == "int8":
        return PackedCompressor(Int8Quantizer(block_size=int8_block_size))
    if name == "topk":
        return PackedCompressor(TopKSparsifier(topk_fraction, error_feedback=error_feedback), topk_value_bits=topk_value_bits,
                                topk_keep_biases=topk_keep_biases)
    raise ValueError(f"unknown compression {name!r}; expected one of {', '.join(COMPRESSIONS)}")


def _unpack(buffer: np.ndarray, numel: int) -> dict[str, np.ndarray]:
    """A packed buffer -> the per-tensor fields of the one flat tensor; every size checked before use."""
    key = payload_key(PACKED_NAME, "packed")
    if buffer.dtype != np.uint8 or buffer.ndim != 1:
        raise MalformedPayload(f"{key!r} must be a 1-d uint8 array, got dtype {buffer.dtype} and shape {buffer.shape}")
    if buffer.size < 4 * HEADER_WORDS:
        raise MalformedPayload(f"{key!r} has {buffer.size} bytes, fewer than its {4 * HEADER_WORDS}-byte header")
    kind, declared, a, b = (int(v) for v in buffer[: 4 * HEADER_WORDS].view("<u4"))
    body = buffer[4 * HEADER_WORDS:]
    if declared != numel:
        raise MalformedPayload(f"{key!r} header declares {declared} values, the global model has {numel}")
    if kind == PACKED_INT8:
        block, n_scales = a, b
        if block < 1:
            raise MalformedPayload(f"{key!r} (int8): block size {block}, expected >= 1")
        need = max(math.ceil(numel / block), 1)
        if n_scales != need:
            raise MalformedPayload(f"{key!r} (int8): {n_scales} scales, but {numel} values in blocks of {block} need {need}")
        expected = 4 * n_scales + numel
        body = _inflate_exactly(body, expected, f"{key!r} (int8)", f"4 x {n_scales} scales + {numel} values")
        return {"scale": body[: 4 * n_scales].view("<f4").astype(np.float32), "q": body[4 * n_scales:].view(np.int8),
                "block": np.array([block], dtype=np.int64), "shape": np.array([numel], dtype=np.int64)}
    if kind == PACKED_TOPK:
        k, width = a, b
        if width not in (2, 4) or (width == 2 and numel > 2**16):
            raise MalformedPayload(f"{key!r} (top-k): index width {width} bytes, expected 2 (numel <= 65,536) or 4")
        if k > numel:
            raise MalformedPayload(f"{key!r} (top-k): {k} kept entries for {numel} values")
        if body.size != (width + 2) * k:
            raise MalformedPayload(f"{key!r} (top-k): {body.size} bytes after the header, expected {k} x ({width} + 2)")
        return {"idx": body[: width * k].view("<u2" if width == 2 else "<u4").astype(np.int64),
                "val": body[width * k:].view("<f2").astype(np.float32), "shape": np.array([numel], dtype=np.int64)}
    if kind == PACKED_TOPK_QUANTIZED:
        k, bits = a, b
        what = f"{key!r} (top-k, int{bits} values)"
        if bits not in TOPK_VALUE_BITS[1:]:
            raise MalformedPayload(f"{key!r} (top-k, quantised values): {bits}-bit values, expected 8 or 4")
        if k > numel:
            raise MalformedPayload(f"{what}: {k} kept entries for {numel} values")
        mask_bytes, value_bytes = (numel + 7) // 8, k if bits == 8 else (k + 1) // 2
        expected = mask_bytes + 4 + value_bytes
        raw = _inflate_exactly(body, expected, what, f"a {mask_bytes}-byte bitmask + 4 (scale) + {value_bytes} bytes of {k} values")
        mask = np.unpackbits(raw[:mask_bytes], bitorder="little")
        if mask[numel:].any():
            raise MalformedPayload(f"{what}: bitmask bits set beyond the {numel} values")
        idx = np.flatnonzero(mask[:numel])
        if idx.size != k:
            raise MalformedPayload(f"{what}: the bitmask marks {idx.size} positions, the header says {k}")
        scale = raw[mask_bytes: mask_bytes + 4].view("<f4").astype(np.float32)
        if not np.all(np.isfinite(scale)):
            raise MalformedPayload(f"{what}: the scale is not finite ({scale[0]})")
        packed = raw[mask_bytes + 4:]
        q = packed.view(np.int8) if bits == 8 else _unpack_nibbles(packed, k)
        if bits == 4 and k % 2 and packed[-1] >> 4:
            raise MalformedPayload(f"{what}: the unused high nibble of the last byte is not zero")
        return {"idx": idx.astype(np.int64), "val": q.astype(np.float32) * scale[0], "shape": np.array([numel], dtype=np.int64)}
    raise MalformedPayload(f"{key!r}: unknown kind {kind} in the header, expected {PACKED_INT8} (int8), {PACKED_TOPK} (top-k) "
                           f"or {PACKED_TOPK_QUANTIZED} (top-k, quantised values)")


def quantize_symmetric(values: np.ndarray, bits: int = 8, block_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Values (flattened) -> (int8 array in [-L, L], float32 scale per block) with L = 2^(bits-1) - 1 and scale =
    max|block| / L: the decoded q x scale is within scale / 2 of each value. One block (`block_size=None`) for
    int8 per tensor and for top-k's kept values (of similar size in an Adam-trained update; the rounding error is
    carried over by error feedback)."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    levels = 2 ** (bits - 1) - 1
    block = block_size or max(flat.size, 1)
    num_blocks = max(math.ceil(flat.size / block), 1)
    padded = np.zeros(num_blocks * block, dtype=np.float32)
    padded[: flat.size] = flat
    blocks = padded.reshape(num_blocks, block)
    scale = (np.abs(blocks).max(axis=1) / float(levels)).astype(np.float32)
    # an all-zero block has scale 0: any q decodes to 0, so divide by 1 instead
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / safe[:, None]), -levels, levels).astype(np.int8)
    return q.reshape(-1)[: flat.size], scale


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """int4 values in [-7, 7] -> bytes, two per byte (the first value in the low nibble, two's complement)."""
    nibbles = (q.astype(np.int16) & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _unpack_nibbles(packed: np.ndarray, count: int) -> np.ndarray:
    nibbles = np.empty(packed.size * 2, dtype=np.uint8)
    nibbles[0::2], nibbles[1::2] = packed & 0xF, packed >> 4
    signed = nibbles[:count].astype(np.int8)
    return np.where(signed > 7, signed - 16, signed).astype(np.int8)


def _inflate_exactly(body: np.ndarray, expected: int, what: str, layout: str) -> np.ndarray:
    """Inflate a deflated body that must be exactly `expected` bytes; never allocates more than the header promises
    (+1 to see excess), so a "zip bomb" cannot make the server allocate more."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(body.tobytes(), expected + 1)
    except zlib.error as error:
        raise MalformedPayload(f"{what}: the body does not inflate ({error})") from None
    if len(raw) != expected or not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
        raise MalformedPayload(f"{what}: the body inflates to {len(raw)}{'+' if inflater.unconsumed_tail else ''} bytes "
                               f"(complete stream: {inflater.eof}), expected exactly {layout} = {expected}")
    return np.frombuffer(raw, dtype=np.uint8)


def decompress(
    payload: Mapping[str, np.ndarray],
    reference_shapes: Mapping[str, tuple[int, ...]] | None = None,
    max_values: int = MAX_DECODED_VALUES,
) -> dict[str, np.ndarray]:
    """Payload -> float32 delta per parameter. Raises :class:`MalformedPayload` (a ValueError) with the reason.

    Every declared shape is checked BEFORE anything of that size is allocated:
    against ``reference_shapes`` (the global model's, on the server: names must
    match exactly and shapes be equal) or, without a reference, against
    ``max_values``. Any other exception while decoding (a crafted array that
    numpy cannot handle) is turned into MalformedPayload too, so one client's
    payload can never end a federation.
    """
    try:
        return _decompress(payload, reference_shapes, max_values)
    except MalformedPayload:
        raise
    except Exception as error:  # MemoryError, OverflowError, TypeError ... from a crafted payload
        raise MalformedPayload(f"payload does not decode ({type(error).__name__}: {error})") from None


def _decompress(payload, reference_shapes, max_values) -> dict[str, np.ndarray]:
    packed_key = payload_key(PACKED_NAME, "packed")
    if packed_key in payload:
        if len(payload) != 1:
            raise MalformedPayload(f"a packed payload is the one array {packed_key!r}, got {len(payload)} arrays: {sorted(payload)[:4]}")
        if reference_shapes is None:
            raise MalformedPayload(f"{packed_key!r}: a packed update decodes only against the global model's parameter shapes")
        names = sorted(reference_shapes)
        sizes = [math.prod(int(d) for d in reference_shapes[n]) for n in names]
        fields = _unpack(np.asarray(payload[packed_key]), sum(sizes))
        try:
            flat = _decompress({payload_key(FLAT, f): v for f, v in fields.items()}, {FLAT: (sum(sizes),)}, max_values)[FLAT]
        except MalformedPayload as error:  # the per-tensor checks, named after the array that was actually sent
            raise MalformedPayload(f"{packed_key!r}: {str(error).replace(repr(FLAT), 'the update')}") from None
        delta, offset = {}, 0
        for name, size in zip(names, sizes):
            delta[name] = flat[offset: offset + size].reshape(tuple(int(d) for d in reference_shapes[name]))
            offset += size
        return delta
    fields: dict[str, dict[str, np.ndarray]] = {}
    for key, value in payload.items():
        try:
            name, field = split_payload_key(key)
        except ValueError as error:
            raise MalformedPayload(str(error)) from None
        fields.setdefault(name, {})[field] = np.asarray(value)
    if reference_shapes is not None:
        missing, unexpected = sorted(set(reference_shapes) - set(fields)), sorted(set(fields) - set(reference_shapes))
        if missing or unexpected:
            raise MalformedPayload(f"parameter names differ from the global model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    delta: dict[str, np.ndarray] = {}
    for name, parts in fields.items():
        kinds = set(parts)
        expected = None if reference_shapes is None else tuple(int(d) for d in reference_shapes[name])
        if kinds == {"dense"}:
            dense = parts["dense"]
            if dense.dtype.kind != "f":
                raise MalformedPayload(f"dense payload for {name!r} has dtype {dense.dtype}, expected floating point")
            if expected is not None and dense.shape != expected:
                raise MalformedPayload(f"{name!r} has shape {dense.shape}, the global model has {expected}")
            delta[name] = dense.astype(np.float32)
            continue
        if kinds not in ({"q", "scale", "block", "shape"}, {"idx", "val", "shape"}):
            raise MalformedPayload(
                f"payload for {name!r} has fields {sorted(kinds)}; expected one of dense | q+scale+block+shape | idx+val+shape"
            )
        shape = _shape(name, parts["shape"])
        if expected is not None and shape != expected:
            raise MalformedPayload(f"{name!r} declares shape {shape}, the global model has {expected}")
        numel = math.prod(shape)
        if expected is None and numel > max_values:
            raise MalformedPayload(f"payload for {name!r} declares shape {shape} = {numel} values, more than the limit {max_values}")
        if kinds == {"q", "scale", "block", "shape"}:
            q, scale, block = parts["q"], parts["scale"], parts["block"]
            if q.dtype != np.int8 or q.size != numel:
                raise MalformedPayload(f"int8 payload for {name!r}: q has dtype {q.dtype} and {q.size} values, expected int8 x {numel}")
            if scale.dtype.kind != "f" or not np.all(np.isfinite(scale)):
                raise MalformedPayload(f"int8 payload for {name!r}: '::scale' must be finite floating point, got dtype {scale.dtype}")
            if block.dtype.kind not in "iu" or block.size != 1 or int(block.reshape(-1)[0]) < 1:
                raise MalformedPayload(f"int8 payload for {name!r}: '::block' must be one integer >= 1, got {block!r}")
            block_size = int(block.reshape(-1)[0])
            num_blocks = max(math.ceil(numel / block_size), 1)
            if scale.size != num_blocks:
                raise MalformedPayload(
                    f"int8 payload for {name!r}: {scale.size} scales, but {numel} values in blocks of {block_size} need {num_blocks}"
                )
            per_value = np.repeat(scale.reshape(-1).astype(np.float32), block_size)[:numel]
            delta[name] = (q.reshape(-1).astype(np.float32) * per_value).reshape(shape)
        else:
            idx, val = parts["idx"].reshape(-1), parts["val"].reshape(-1)
            if idx.dtype.kind not in "iu":
                raise MalformedPayload(f"top-k payload for {name!r}: indices have dtype {idx.dtype}, expected integers")
            if val.dtype.kind != "f":
                raise MalformedPayload(f"top-k payload for {name!r}: values have dtype {val.dtype}, expected floating point")
            if idx.size != val.size or idx.size > numel:
                raise MalformedPayload(f"top-k payload for {name!r}: {idx.size} indices and {val.size} values for {numel} entries")
            if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= numel):
                raise MalformedPayload(f"top-k payload for {name!r}: indices must be integers in [0, {numel})")
            seen = np.zeros(numel, dtype=bool)  # O(numel): np.unique hashes, ~0.3 s for 435 k indices
            seen[idx] = True
            if int(np.count_nonzero(seen)) != idx.size:
                raise MalformedPayload(f"top-k payload for {name!r}: repeated indices")
            dense = np.zeros(numel, dtype=np.float32)
            dense[idx] = val.astype(np.float32)
            delta[name] = dense.reshape(shape)
    return delta


def _shape(name: str, shape: np.ndarray) -> tuple[int, ...]:
    if shape.ndim != 1 or shape.dtype.kind not in "iu" or shape.size > MAX_DIMS or (shape.size and int(shape.min()) < 0):
        raise MalformedPayload(
            f"payload for {name!r}: '::shape' must be a 1-d array of at most {MAX_DIMS} non-negative integers, got {shape!r}"
        )
    return tuple(int(s) for s in shape)


def wire_nbytes(obj) -> int:
    """Bytes Flower puts on the wire for a Message, RecordDict or ArrayRecord.

    Flower (>= 1.20) sends a message as a tree of "inflatable" objects (the
    message, its RecordDict, each record, each Array and its <= 5 MB ArrayChunks),
    each pushed as its serialised content plus its object id; an object already
    sent in the same tree (same id) is not sent again. This sums exactly those
    bytes; the gRPC/HTTP-2 framing around them is not counted.
    """
    return wire_nbytes_with_part(obj)[0]


def wire_nbytes_with_part(obj, part=None) -> tuple[int, int]:
    """(bytes on the wire of ``obj``, of which those of ``part``, an object nested in it, e.g. a reply's ArrayRecord).

    Each object is deflated once for its id and once for its size, inside Flower's ``no_object_id_recompute`` (an
    object's id is the hash of its content, which holds its children's ids: without it every id was recomputed,
    down the whole tree, each time a parent was deflated). The server measures every reply this way:
    benchmarks/bench_fl_dp.py, "message_path".
    """
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, no_object_id_recompute

    with no_object_id_recompute():
        sizes = {object_id: len(child.deflate()) + len(object_id) for object_id, child in get_all_nested_objects(obj).items()}
        part_ids = get_all_nested_objects(part).keys() if part is not None else ()
        missing = [object_id for object_id in part_ids if object_id not in sizes]
        if missing:
            raise ValueError(f"wire_nbytes_with_part: {type(part).__name__} is not nested in the {type(obj).__name__} measured")
        return int(sum(sizes.values())), int(sum(sizes[object_id] for object_id in part_ids))


def payload_nbytes(payload: Mapping[str, np.ndarray]) -> int:
    """Wire bytes of a payload's ArrayRecord (see :func:`wire_nbytes`)."""
    from flwr.app import Array, ArrayRecord

    return wire_nbytes(ArrayRecord({key: Array(np.ascontiguousarray(value)) for key, value in payload.items()}))


def dense_nbytes(delta: Mapping[str, ArrayLike]) -> int:
    """Wire bytes the same update would take uncompressed (float32), for the compression ratio."""
    return payload_nbytes(NoCompression().compress(delta))
