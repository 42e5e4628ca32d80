import numpy as np
import pytest
import torch

from privacy.federated.compression import (
    Int8Quantizer,
    NoCompression,
    TopKSparsifier,
    MalformedPayload,
    PackedCompressor,
    build_compressor,
    decompress,
    dense_nbytes,
    payload_nbytes,
    wire_nbytes,
)


def _delta(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(32, 48, generator=g),
        "layer.bias": torch.randn(48, generator=g) * 1e-3,
        "head.weight": torch.zeros(5, 7),
        "scalar": torch.tensor(2.5),
    }


@pytest.mark.parametrize("block_size", [None, 64, 7])
def test_int8_round_trip_error_is_at_most_half_a_scale(block_size):
    delta = _delta()
    quantizer = Int8Quantizer(block_size=block_size)
    payload = quantizer.compress(delta)
    restored = decompress(payload)
    assert set(restored) == set(delta)
    for name, value in delta.items():
        x = value.numpy().reshape(-1)
        y = restored[name].reshape(-1)
        assert restored[name].shape == tuple(value.shape)
        block = block_size or max(x.size, 1)
        for start in range(0, x.size, block):
            chunk = x[start : start + block]
            scale = np.abs(chunk).max() / 127.0
            assert np.abs(chunk - y[start : start + block]).max() <= scale / 2 + 1e-7
    assert payload["layer.weight::q"].dtype == np.int8


def test_int8_blockwise_is_tighter_on_mixed_magnitudes():
    x = {"w": torch.cat([torch.full((64,), 100.0), torch.linspace(-0.01, 0.01, 64)])}
    per_tensor = decompress(Int8Quantizer().compress(x))["w"][64:]
    blockwise = decompress(Int8Quantizer(block_size=64).compress(x))["w"][64:]
    small = x["w"][64:].numpy()
    assert np.abs(blockwise - small).max() < np.abs(per_tensor - small).max() / 100


def test_topk_keeps_the_largest_entries_and_residual_holds_the_rest():
    delta = {"w": torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05, 0.0, 1.0, -0.3])}
    sparsifier = TopKSparsifier(fraction=0.25)
    payload = sparsifier.compress(delta)
    assert sorted(payload["w::idx"].tolist()) == [1, 3]
    restored = decompress(payload)["w"]
    np.testing.assert_allclose(restored + sparsifier.residual["w"], delta["w"].numpy())


def test_topk_error_feedback_makes_the_sum_over_rounds_converge():
    g = torch.Generator().manual_seed(3)
    true_update = {"w": torch.randn(400, generator=g)}
    with_feedback, without = TopKSparsifier(0.05, error_feedback=True), TopKSparsifier(0.05, error_feedback=False)
    sent_fb = np.zeros(400, dtype=np.float32)
    sent_plain = np.zeros(400, dtype=np.float32)
    errors = []
    for t in range(1, 201):
        sent_fb += decompress(with_feedback.compress(true_update))["w"]
        sent_plain += decompress(without.compress(true_update))["w"]
        target = t * true_update["w"].numpy()
        errors.append(np.linalg.norm(target - sent_fb) / np.linalg.norm(target))
        # the error of the sum is exactly the residual: nothing is lost
        np.testing.assert_allclose(target - sent_fb, with_feedback.residual["w"], rtol=1e-4, atol=1e-3)
    assert errors[-1] < 0.1 and errors[-1] < errors[20] / 5  # relative error of the sum -> 0
    # without feedback, 95% of the coordinates are never sent
    plain_error = np.linalg.norm(200 * true_update["w"].numpy() - sent_plain) / np.linalg.norm(200 * true_update["w"].numpy())
    assert plain_error > 0.5


def test_topk_residual_state_round_trips():
    a = TopKSparsifier(0.1)
    a.compress(_delta(1))
    b = TopKSparsifier(0.1)
    b.load_state_dict(a.state_dict())
    nxt = _delta(2)
    pa, pb = a.compress(nxt), b.compress(nxt)
    for key in pa:
        np.testing.assert_array_equal(pa[key], pb[key])


def test_bytes_are_measured_on_the_serialised_payload():
    from flwr.app import Array, ArrayRecord

    delta = {"w": torch.randn(256, 256)}
    dense = payload_nbytes(NoCompression().compress(delta))
    assert dense == dense_nbytes(delta)
    # Flower's wire form: the float32 data in an ArrayChunk, plus the Array / ArrayRecord objects and their ids
    assert 256 * 256 * 4 < dense < 256 * 256 * 4 + 1024
    record = ArrayRecord({"w::dense": Array(NoCompression().compress(delta)["w::dense"])})
    assert dense == wire_nbytes(record) > record.count_bytes()  # more than the bare array bytes
    int8 = payload_nbytes(Int8Quantizer(block_size=256).compress(delta))
    assert 3.5 < dense / int8 < 4.1
    topk = payload_nbytes(TopKSparsifier(0.01).compress(delta))
    k = int(np.ceil(0.01 * 256 * 256))
    assert 8 * k <= topk < 8 * k + 2048
    assert dense / topk > 10


def test_int8_block_size_travels_with_the_payload_and_a_short_last_block_decodes_exactly():
    # 53 x 128 = 6784 values = 26 full blocks of 256 + one of 128: ceil(6784 / 27) = 252 would be the wrong block
    g = torch.Generator().manual_seed(0)
    delta = {"w": torch.randn(53, 128, generator=g) * torch.linspace(0.01, 10, 53)[:, None]}
    payload = Int8Quantizer(block_size=256).compress(delta)
    assert payload["w::block"].tolist() == [256] and payload["w::scale"].size == 27
    restored = decompress(payload)["w"]
    x = delta["w"].numpy().reshape(-1)
    y = restored.reshape(-1)
    for start in range(0, x.size, 256):
        chunk = x[start : start + 256]
        assert np.abs(chunk - y[start : start + 256]).max() <= np.abs(chunk).max() / 127 / 2 + 1e-6
    assert np.linalg.norm(x - y) / np.linalg.norm(x) < 0.01
    # the block size is part of the payload: without it, or with one that does not tile, the payload is rejected
    with pytest.raises(MalformedPayload, match="fields"):
        decompress({k: v for k, v in payload.items() if not k.endswith("::block")})
    # what the old decoder inferred, ceil(6784 / 27) = 252, also tiles 27 blocks but decodes wrongly
    wrong = decompress({**payload, "w::block": np.array([252])})["w"].reshape(-1)
    assert np.linalg.norm(x - wrong) / np.linalg.norm(x) > 10 * np.linalg.norm(x - y) / np.linalg.norm(x)
    with pytest.raises(MalformedPayload, match="need 14"):
        decompress({**payload, "w::block": np.array([512])})


REFERENCE = {"w": (4,)}


@pytest.mark.parametrize(
    "payload, reason",
    [
        # a top-k payload declaring 2**40 values: rejected from the declaration, nothing of that size is allocated
        ({"w::idx": np.array([0], np.int32), "w::val": np.ones(1, np.float32), "w::shape": np.array([2**40])}, "declares shape \\(1099511627776,\\)"),
        ({"w::idx": np.array([0], np.int32), "w::val": np.ones(1, np.float32), "w::shape": np.array([2**62, 2**62])}, "declares shape"),
        # ::shape missing (raised KeyError before)
        ({"w::idx": np.array([0], np.int32), "w::val": np.ones(1, np.float32)}, "fields \\['idx', 'val'\\]"),
        ({"w::q": np.zeros(4, np.int8), "w::scale": np.ones(1, np.float32), "w::block": np.array([4])}, "fields"),
        ({"w::idx": np.array([0, 99], np.int32), "w::val": np.ones(2, np.float32), "w::shape": np.array([4])}, "indices must be"),
        ({"w::idx": np.array([1, 1], np.int32), "w::val": np.ones(2, np.float32), "w::shape": np.array([4])}, "repeated indices"),
        ({"w::idx": np.array([0.5]), "w::val": np.ones(1, np.float32), "w::shape": np.array([4])}, "indices have dtype float64"),
        ({"w::idx": np.array([0], np.int32), "w::val": np.array(["x"]), "w::shape": np.array([4])}, "values have dtype"),
        ({"w::idx": np.arange(4, dtype=np.int32), "w::val": np.ones(3, np.float32), "w::shape": np.array([4])}, "4 indices and 3 values"),
        ({"w::q": np.zeros(3, np.int8), "w::scale": np.ones(1, np.float32), "w::block": np.array([4]), "w::shape": np.array([4])}, "int8"),
        ({"w::q": np.zeros(4, np.int8), "w::scale": np.array([np.inf], np.float32), "w::block": np.array([4]), "w::shape": np.array([4])}, "finite"),
        ({"w::q": np.zeros(4, np.int8), "w::scale": np.ones(1, np.float32), "w::block": np.array([0]), "w::shape": np.array([4])}, "'::block'"),
        ({"w::q": np.zeros(4, np.int8), "w::scale": np.ones(1, np.float32), "w::block": np.array([4]), "w::shape": np.array([[4]])}, "'::shape'"),
        ({"w::q": np.zeros(4, np.int8), "w::scale": np.ones(1, np.float32), "w::block": np.array([4]), "w::shape": np.array([-4])}, "'::shape'"),
        ({"w::q": np.zeros(4, np.int8), "w::scale": np.ones(1, np.float32), "w::block": np.array([4]), "w::shape": np.array([2, 2])}, "the global model has \\(4,\\)"),
        ({"w::dense": np.zeros(5, np.float32)}, "shape \\(5,\\), the global model has \\(4,\\)"),
        ({"w::dense": np.zeros(4, np.int64)}, "dtype int64"),
        ({"v::dense": np.zeros(4, np.float32)}, "missing \\['w'\\], unexpected \\['v'\\]"),
        ({"w": np.zeros(4, np.float32)}, "payload key"),
    ],
)
def test_every_malformed_payload_is_rejected_with_a_reason(payload, reason):
    with pytest.raises(MalformedPayload, match=reason):
        decompress(payload, REFERENCE)


def test_without_a_reference_declared_sizes_are_capped_before_allocation():
    with pytest.raises(MalformedPayload, match="more than the limit"):
        decompress({"w::idx": np.array([0], np.int32), "w::val": np.ones(1, np.float32), "w::shape": np.array([2**40])})
    with pytest.raises(MalformedPayload, match="more than the limit 100"):
        decompress({"w::q": np.zeros(101, np.int8), "w::scale": np.ones(1, np.float32), "w::block": np.array([101]),
                    "w::shape": np.array([101])}, max_values=100)


def test_an_unexpected_exception_while_decoding_becomes_a_rejection(monkeypatch):
    import privacy.federated.compression as compression

    def explode(*args, **kwargs):
        raise MemoryError("cannot allocate 4 TiB")

    monkeypatch.setattr(compression.np, "zeros", explode)
    with pytest.raises(MalformedPayload, match="MemoryError: cannot allocate"):
        decompress({"w::idx": np.array([0], np.int32), "w::val": np.ones(1, np.float32), "w::shape": np.array([4])}, REFERENCE)


def test_build_compressor_rejects_unknown_names():
    packed = build_compressor("topk", topk_fraction=0.2)
    assert isinstance(packed, PackedCompressor) and isinstance(packed.inner, TopKSparsifier)
    with pytest.raises(ValueError, match="'zip'"):
        build_compressor("zip")


# --------------------------------------------------------------------------- packed: one array per update
# the LoRA task's trainable parameters (8,756 values in 6 arrays)
LORA_SHAPES = {
    "layers.0.attention.q_proj.lora_A.default.weight": (4, 128), "layers.0.attention.q_proj.lora_B.default.weight": (128, 4),
    "layers.0.attention.v_proj.lora_A.default.weight": (4, 128), "layers.0.attention.v_proj.lora_B.default.weight": (128, 4),
    "lm_head.weight": (52, 128), "lm_head.bias": (52,),
}


def _lora_delta(seed=0, adam_like=True):
    """A delta shaped like a LoRA client's: 5 local Adam steps move most coordinates by about 5 x lr (sign-like)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in LORA_SHAPES.items():
        x = torch.randn(shape, generator=g)
        out[name] = 0.015 * torch.tanh(3 * x) if adam_like else 0.01 * x
    return out


def _reply_bytes(payload, dp=False):
    """Wire bytes of the reply a client sends (the payload + its MetricRecord), as the server counts them."""
    from flwr.app import Message, MetricRecord, RecordDict

    from privacy.federated.runner import _set_task_identity
    from privacy.federated.task import state_to_arrays

    _set_task_identity(1)
    metrics = MetricRecord({"epsilon": 7.99, "partition-id": 123} if dp else {"num-examples": 50, "train_loss": 1.5, "partition-id": 123})
    return wire_nbytes(Message(RecordDict({"arrays": state_to_arrays(payload), "metrics": metrics}), dst_node_id=5, message_type="train"))


@pytest.mark.parametrize("name, kwargs", [("int8", {"int8_block_size": 256}), ("int8", {}), ("topk", {"topk_fraction": 0.05})])
def test_packed_update_is_one_uint8_array_and_round_trips(name, kwargs):
    delta = _lora_delta()
    payload = build_compressor(name, **kwargs).compress(delta)
    assert list(payload) == ["update::packed"] and payload["update::packed"].dtype == np.uint8
    restored = decompress(payload, LORA_SHAPES)
    assert set(restored) == set(LORA_SHAPES)
    x = np.concatenate([delta[n].numpy().ravel() for n in sorted(delta)])
    y = np.concatenate([restored[n].ravel() for n in sorted(delta)])
    for n in LORA_SHAPES:
        assert restored[n].shape == LORA_SHAPES[n] and restored[n].dtype == np.float32
    if name == "int8":  # each value within half a quantisation step of its block (or of the whole vector)
        block = kwargs.get("int8_block_size") or x.size
        for start in range(0, x.size, block):
            chunk = x[start:start + block]
            assert np.abs(chunk - y[start:start + block]).max() <= np.abs(chunk).max() / 127 / 2 + 1e-7
    else:  # the 5 % largest entries, in fp16; the rest zero
        k = int(np.ceil(0.05 * x.size))
        kept = np.flatnonzero(y)
        dropped = np.setdiff1d(np.arange(x.size), kept)
        assert kept.size == k and np.abs(x[kept]).min() >= np.abs(x[dropped]).max()  # (ties at the boundary either way)
        np.testing.assert_allclose(y[kept], x[kept], rtol=1e-3)


def test_packed_replies_are_4x_int8_and_10x_topk_smaller_on_the_wire_than_dense():
    from privacy.federated.compression import Int8Quantizer as _Q, PackedCompressor as _P

    delta = _lora_delta()
    for dp in (False, True):
        dense = _reply_bytes(NoCompression().compress(delta), dp)
        assert dense > 35_024  # 8,756 float32 + Flower's records
        int8 = _reply_bytes(build_compressor("int8", int8_block_size=256).compress(delta), dp)
        topk = _reply_bytes(build_compressor("topk", topk_fraction=0.05).compress(delta), dp)
        assert dense / int8 >= 4.0, (dense, int8)
        assert dense / topk >= 10.0, (dense, topk)
        # the per-tensor payload of the same int8 values is far from 4x: Flower's per-array records dominate
        assert dense / _reply_bytes(_Q(block_size=256).compress(delta), dp) < 2.5


def test_packed_topk_error_feedback_keeps_the_fp16_rounding_too():
    delta = {"w": torch.tensor([1.0 + 1e-4, -3.0, 0.001, 0.002])}
    c = build_compressor("topk", topk_fraction=0.5)
    payload = c.compress(delta)
    sent = decompress(payload, {"w": (4,)})["w"]
    residual = c.state_dict()["__flat__"]
    # what was sent plus what is carried over is exactly the update
    np.testing.assert_allclose(sent + residual, delta["w"].numpy(), rtol=0, atol=1e-7)
    assert sent[0] != np.float32(1.0 + 1e-4)  # fp16 rounded ...
    assert residual[0] != 0  # ... and the rounding is kept for the next round


def test_packed_topk_int8_values_round_trip_within_half_a_step_and_keep_the_same_entries():
    delta = _lora_delta(seed=3)
    x = np.concatenate([delta[n].numpy().ravel() for n in sorted(delta)])
    fp16 = decompress(build_compressor("topk", topk_fraction=0.18).compress(delta), LORA_SHAPES)
    payload = build_compressor("topk", topk_fraction=0.18, topk_value_bits=8).compress(delta)
    assert list(payload) == ["update::packed"] and payload["update::packed"][:16].view("<u4")[0] == 3
    int8 = decompress(payload, LORA_SHAPES)
    y16 = np.concatenate([fp16[n].ravel() for n in sorted(delta)])
    y8 = np.concatenate([int8[n].ravel() for n in sorted(delta)])
    kept = np.flatnonzero(y8)
    assert kept.size == int(np.ceil(0.18 * x.size))
    np.testing.assert_array_equal(kept, np.flatnonzero(y16))  # the same top-k support, only the values' width differs
    step = np.abs(x[kept]).max() / 127
    assert np.abs(y8[kept] - x[kept]).max() <= step / 2 + 1e-7


def test_topk_int8_values_send_more_entries_than_fp16_for_the_same_bytes():
    """The point of value_bits=8: at 10x fewer bytes than dense on the wire, 18 % of the entries instead of ~7 %."""
    delta = _lora_delta()
    dense = _reply_bytes(NoCompression().compress(delta))
    v8 = _reply_bytes(build_compressor("topk", topk_fraction=0.18, topk_value_bits=8).compress(delta))
    v16 = _reply_bytes(build_compressor("topk", topk_fraction=0.18).compress(delta))
    assert dense / v8 >= 10.0, (dense, v8)
    assert dense / v16 < 7.0, (dense, v16)  # fp16 values + 16-bit indices: 4 bytes per kept entry


def test_packed_topk_int8_error_feedback_keeps_the_int8_rounding():
    delta = {"w": torch.tensor([1.0, -3.0, 0.001, 0.002, 2.9, 0.5])}
    c = build_compressor("topk", topk_fraction=0.5, topk_value_bits=8)
    sent = decompress(c.compress(delta), {"w": (6,)})["w"]
    residual = c.state_dict()["__flat__"]
    np.testing.assert_allclose(sent + residual, delta["w"].numpy(), rtol=0, atol=1e-6)
    assert np.count_nonzero(sent) == 3 and residual[4] != 0  # 2.9 is not a multiple of 3 / 127: rounded, carried over


def test_topk_value_bits_must_be_16_8_or_4():
    with pytest.raises(ValueError, match="topk_value_bits must be one of"):
        build_compressor("topk", topk_value_bits=2)


@pytest.mark.parametrize("k_fraction", [0.4, 0.4003])  # an even and an odd number of kept values (two int4 per byte)
def test_packed_topk_int4_values_round_trip_within_half_a_step(k_fraction):
    delta = _lora_delta(seed=5)
    x = np.concatenate([delta[n].numpy().ravel() for n in sorted(delta)])
    c = build_compressor("topk", topk_fraction=k_fraction, topk_value_bits=4)
    payload = c.compress(delta)
    assert payload["update::packed"][:16].view("<u4").tolist()[::3] == [3, 4]
    y = np.concatenate([v.ravel() for _, v in sorted(decompress(payload, LORA_SHAPES).items())])
    kept = np.flatnonzero(y)
    k = int(np.ceil(k_fraction * x.size))
    assert kept.size == k
    step = np.abs(x[kept]).max() / 7
    assert np.abs(y[kept] - x[kept]).max() <= step / 2 + 1e-7
    np.testing.assert_array_equal(np.sign(y[kept]), np.sign(x[kept]))
    np.testing.assert_allclose(y + c.state_dict()["__flat__"], x, rtol=0, atol=1e-6)  # error feedback keeps the rest


def _bitmask_body(positions, numel, values, scale=1.0, extra_bits=()):
    mask = np.zeros(((numel + 7) // 8) * 8, dtype=bool)
    mask[list(positions) + list(extra_bits)] = True
    raw = np.packbits(mask, bitorder="little").tobytes() + np.float32(scale).tobytes() + np.asarray(values, np.int8).tobytes()
    return __import__("zlib").compress(raw)


def _packed(kind, numel, a, b, body: bytes) -> dict:
    header = np.array([kind, numel, a, b], dtype="<u4").view(np.uint8)
    return {"update::packed": np.concatenate([header, np.frombuffer(body, dtype=np.uint8)])}


PACKED_REF = {"a": (2, 3), "b": (2,)}  # 8 values


@pytest.mark.parametrize(
    "payload, reason",
    [
        (_packed(1, 9, 8, 1, b""), "header declares 9 values, the global model has 8"),
        (_packed(1, 8, 8, 2, b""), "2 scales, but 8 values in blocks of 8 need 1"),
        (_packed(1, 8, 0, 1, b""), "block size 0"),
        (_packed(1, 8, 8, 1, b"not zlib"), "does not inflate"),
        (_packed(1, 8, 8, 1, __import__("zlib").compress(b"\0" * 11)), "inflates to 11 bytes .* expected exactly .* = 12"),
        (_packed(1, 8, 8, 1, __import__("zlib").compress(b"\0" * 10**6)), r"inflates to 13\+ bytes"),  # a zip bomb: at most 13 inflated
        (_packed(2, 8, 9, 2, b"\0" * 36), "9 kept entries for 8 values"),
        (_packed(2, 8, 2, 3, b"\0" * 10), "index width 3 bytes"),
        (_packed(2, 8, 2, 2, b"\0" * 7), r"7 bytes after the header, expected 2 x \(2 \+ 2\)"),
        (_packed(2, 8, 2, 2, np.array([1, 1], "<u2").tobytes() + np.ones(2, "<f2").tobytes()), "repeated indices"),
        (_packed(2, 8, 1, 2, np.array([8], "<u2").tobytes() + np.ones(1, "<f2").tobytes()), r"indices must be integers in \[0, 8\)"),
        (_packed(3, 8, 9, 8, b""), "9 kept entries for 8 values"),
        (_packed(3, 8, 2, 0, b""), "0-bit values, expected 8 or 4"),
        (_packed(3, 8, 2, 8, b"not zlib"), "does not inflate"),
        (_packed(3, 8, 2, 8, __import__("zlib").compress(b"\0" * 10**6)), r"inflates to 8\+ bytes"),  # 1 + 4 + 2 = 7 at most
        (_packed(3, 8, 3, 4, __import__("zlib").compress(b"\0" * 8)), r"expected exactly .* 2 bytes of 3 values = 7"),
        (_packed(3, 8, 2, 8, _bitmask_body([1], 8, [5, 6])), "the bitmask marks 1 positions, the header says 2"),
        (_packed(3, 8, 2, 8, _bitmask_body([1, 2], 8, [5, 6], scale=np.inf)), "scale is not finite"),
        (_packed(3, 8, 1, 4, _bitmask_body([1], 8, [0x35])), "unused high nibble"),
        (_packed(7, 8, 0, 0, b""), "unknown kind 7"),
        ({"update::packed": np.zeros(10, np.uint8)}, "10 bytes, fewer than its 16-byte header"),
        ({"update::packed": np.zeros(16, np.int8)}, "must be a 1-d uint8 array"),
        ({**_packed(2, 8, 0, 2, b""), "b::dense": np.zeros(2, np.float32)}, "a packed payload is the one array"),
    ],
)
def test_malformed_packed_payloads_are_refused_naming_the_field(payload, reason):
    with pytest.raises(MalformedPayload, match=reason) as error:
        decompress(payload, PACKED_REF)
    assert "update::packed" in str(error.value)


def test_a_topk_bitmask_with_bits_past_the_last_value_is_refused():
    with pytest.raises(MalformedPayload, match="bitmask bits set beyond the 6 values"):
        decompress(_packed(3, 6, 2, 8, _bitmask_body([1, 2], 6, [5, 6], extra_bits=[7])), {"a": (6,)})
    restored = decompress(_packed(3, 6, 2, 8, _bitmask_body([1, 2], 6, [5, -6], scale=0.5)), {"a": (6,)})["a"]
    np.testing.assert_array_equal(restored, [0, 2.5, -3.0, 0, 0, 0])


def test_a_packed_payload_needs_the_global_models_shapes():
    payload = build_compressor("int8").compress({"a": torch.ones(2, 3), "b": torch.ones(2)})
    with pytest.raises(MalformedPayload, match="decodes only against the global model"):
        decompress(payload)
    # names are split back in sorted order whatever order the client's dict had
    restored = decompress(payload, {"b": (2,), "a": (2, 3)})
    np.testing.assert_allclose(restored["a"], np.ones((2, 3)), atol=1e-2)


def test_topk_keep_biases_sends_every_1d_parameter_and_picks_topk_among_the_matrices():
    delta = _lora_delta(seed=7)
    delta["lm_head.bias"] = torch.full((52,), 1e-4)  # small: plain top-k would drop all of it
    x = np.concatenate([delta[n].numpy().ravel() for n in sorted(delta)])
    restored = decompress(build_compressor("topk", topk_fraction=0.05, topk_keep_biases=True).compress(delta), LORA_SHAPES)
    np.testing.assert_allclose(restored["lm_head.bias"], delta["lm_head.bias"].numpy(), rtol=1e-3)  # fp16
    matrices = np.concatenate([restored[n].ravel() for n in sorted(delta) if restored[n].ndim == 2])
    assert np.count_nonzero(matrices) == int(np.ceil(0.05 * (x.size - 52)))
    plain = decompress(build_compressor("topk", topk_fraction=0.05).compress(delta), LORA_SHAPES)
    assert not plain["lm_head.bias"].any()


@pytest.mark.parametrize("name, kwargs", [("none", {}), ("int8", {"int8_block_size": 256}), ("topk", {"topk_fraction": 0.05})])
def test_wire_bytes_with_part_are_the_sum_over_the_message_tree(name, kwargs):
    """The cached-id measurement (one pass, Flower's no_object_id_recompute) gives the bytes of the plain definition:
    every distinct object of the tree, deflated, plus its id; the part is the reply's ArrayRecord subtree."""
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from privacy.federated.compression import wire_nbytes_with_part
    from privacy.federated.runner import _set_task_identity
    from privacy.federated.task import state_to_arrays

    def plain(obj):
        return sum(len(child.deflate()) + len(object_id) for object_id, child in get_all_nested_objects(obj).items())

    _set_task_identity(1)
    arrays = state_to_arrays(build_compressor(name, **kwargs).compress(_lora_delta()))
    reply = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 2, "partition-id": 7})}),
                    dst_node_id=5, message_type="train")
    total, part = wire_nbytes_with_part(reply, reply.content["arrays"])
    assert total == plain(reply) == wire_nbytes(reply)
    assert part == plain(reply.content["arrays"]) and 0 < part < total
    assert total - part < 1_000  # the message, its RecordDict and the metrics around the update
    with pytest.raises(ValueError, match="not nested"):
        wire_nbytes_with_part(reply, state_to_arrays({"w": np.ones(3, np.float32)}))
