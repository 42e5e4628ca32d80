import numpy as np
import pytest
import torch

from privacy.federated.compression import (
    Int8Quantizer,
    NoCompression,
    TopKSparsifier,
    build_compressor,
    decompress,
    dense_nbytes,
    payload_nbytes,
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
    delta = {"w": torch.randn(256, 256)}
    dense = payload_nbytes(NoCompression().compress(delta))
    assert dense == dense_nbytes(delta)
    assert 256 * 256 * 4 <= dense < 256 * 256 * 4 + 512  # float32 data + npy header + key
    int8 = payload_nbytes(Int8Quantizer(block_size=256).compress(delta))
    assert 3.5 < dense / int8 < 4.1
    topk = payload_nbytes(TopKSparsifier(0.01).compress(delta))
    k = int(np.ceil(0.01 * 256 * 256))
    assert 8 * k <= topk < 8 * k + 1024
    assert dense / topk > 10


def test_malformed_payloads_are_rejected_with_the_parameter_name():
    with pytest.raises(ValueError, match="'w'.*indices"):
        decompress({"w::idx": np.array([0, 99], dtype=np.int32), "w::val": np.ones(2, np.float32), "w::shape": np.array([4])})
    with pytest.raises(ValueError, match="'w'.*int8"):
        decompress({"w::q": np.zeros(3, np.int8), "w::scale": np.ones(1, np.float32), "w::shape": np.array([4])})
    with pytest.raises(ValueError, match="fields"):
        decompress({"w::idx": np.array([0], dtype=np.int32), "w::shape": np.array([4])})
    with pytest.raises(ValueError, match="payload key"):
        decompress({"w": np.zeros(3, np.float32)})


def test_build_compressor_rejects_unknown_names():
    assert isinstance(build_compressor("topk", topk_fraction=0.2), TopKSparsifier)
    with pytest.raises(ValueError, match="'zip'"):
        build_compressor("zip")
