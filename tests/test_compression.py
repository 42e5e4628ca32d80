import numpy as np
import pytest
import torch

from privacy.federated.compression import (
    Int8Quantizer,
    NoCompression,
    TopKSparsifier,
    MalformedPayload,
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
    assert isinstance(build_compressor("topk", topk_fraction=0.2), TopKSparsifier)
    with pytest.raises(ValueError, match="'zip'"):
        build_compressor("zip")
