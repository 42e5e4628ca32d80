"""Batch samplers: coverage, P x K structure, determinism, DDP disjointness, exact mid-epoch resume."""

from collections import Counter

import numpy as np
import pytest

from data.samplers import BucketBatchSampler, SpeakerBatchSampler

LENGTHS = [int(x) for x in np.random.default_rng(0).integers(10, 100, size=103)]
# 9 speakers with 3..9 utterances, interleaved in index order
SPEAKERS = [f"spk{s}" for s in range(9) for _ in range(3 + s)]
SPEAKERS = [SPEAKERS[i] for i in np.random.default_rng(1).permutation(len(SPEAKERS))]


def _flat(batches):
    return [i for b in batches for i in b]


def test_bucket_covers_every_index_once_and_buckets_lengths():
    s = BucketBatchSampler(LENGTHS, batch_size=8, shuffle=True, seed=3, bucket_batches=4)
    batches = list(s)
    assert len(batches) == len(s) == 13
    assert sorted(_flat(batches)) == list(range(len(LENGTHS)))
    # length-sorted pools: spread within a batch is far below the random spread
    spread = np.mean([np.ptp([LENGTHS[i] for i in b]) for b in batches if len(b) > 1])
    assert spread < 40


def test_bucket_deterministic_per_seed_and_epoch():
    a = BucketBatchSampler(LENGTHS, 8, shuffle=True, seed=5)
    b = BucketBatchSampler(LENGTHS, 8, shuffle=True, seed=5)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(BucketBatchSampler(LENGTHS, 8, shuffle=True, seed=6)) != list(a)


def test_bucket_eval_is_sorted_and_drop_last():
    s = BucketBatchSampler(LENGTHS, 10, shuffle=False)
    flat = _flat(list(s))
    assert [LENGTHS[i] for i in flat] == sorted(LENGTHS)
    assert all(len(b) == 10 for b in BucketBatchSampler(LENGTHS, 10, shuffle=True, drop_last=True))


@pytest.mark.parametrize("drop_last", [True, False])
def test_bucket_ddp_ranks(drop_last):
    ranks = [list(BucketBatchSampler(LENGTHS, 8, shuffle=True, seed=2, drop_last=drop_last, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1  # every rank runs the same number of steps
    if drop_last:
        sets = [set(_flat(r)) for r in ranks]
        assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    else:  # padded by repeating batches, so every index is still covered
        assert set(_flat([b for r in ranks for b in r])) == set(range(len(LENGTHS)))


def _check_pk(batch, P, K):
    counts = Counter(SPEAKERS[i] for i in batch)
    assert len(batch) == P * K and len(counts) == P and set(counts.values()) == {K}
    assert len(set(batch)) == P * K  # no utterance twice


def test_speaker_batches_are_p_by_k():
    s = SpeakerBatchSampler(SPEAKERS, P=3, K=4, seed=0)
    assert s.dropped_speakers == ["spk0"]  # 3 utterances < K
    batches = list(s)
    assert len(batches) == len(s) > 5
    for b in batches:
        _check_pk(b, 3, 4)
        # speaker-major layout
        assert all(len({SPEAKERS[i] for i in b[k * 4 : (k + 1) * 4]}) == 1 for k in range(3))
    eligible = {i for i, sp in enumerate(SPEAKERS) if sp != "spk0"}
    assert set(_flat(batches)) <= eligible and len(set(_flat(batches))) > 0.8 * len(eligible)


def test_speaker_small_speakers_with_replacement():
    s = SpeakerBatchSampler(SPEAKERS, P=3, K=4, seed=0, small_speakers="replace")
    assert not s.dropped_speakers
    assert any(SPEAKERS[i] == "spk0" for b in s for i in b)
    for b in s:
        counts = Counter(SPEAKERS[i] for i in b)
        assert len(counts) == 3 and set(counts.values()) == {4}


def test_speaker_sampler_errors_and_determinism():
    with pytest.raises(ValueError, match="P=20"):
        SpeakerBatchSampler(SPEAKERS, P=20, K=2)
    a, b = SpeakerBatchSampler(SPEAKERS, 2, 2, seed=4), SpeakerBatchSampler(SPEAKERS, 2, 2, seed=4)
    assert list(a) == list(b)
    b.set_epoch(7)
    assert list(a) != list(b)


def test_speaker_ddp_ranks_disjoint():
    ranks = [list(SpeakerBatchSampler(SPEAKERS, 2, 3, seed=1, num_replicas=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) > 0
    whole = list(SpeakerBatchSampler(SPEAKERS, 2, 3, seed=1))
    assert sorted(ranks[0] + ranks[1]) == sorted(whole[: len(whole) - len(whole) % 2])
    for b in ranks[0] + ranks[1]:
        _check_pk(b, 2, 3)


@pytest.mark.parametrize("make", [
    lambda: BucketBatchSampler(LENGTHS, 8, shuffle=True, seed=11, num_replicas=2, rank=1),
    lambda: SpeakerBatchSampler(SPEAKERS, 2, 2, seed=11),
])
def test_resume_mid_epoch_gives_remaining_batches(make):
    ref = make()
    ref.set_epoch(2)
    full = list(ref)
    first = make()
    first.set_epoch(2)
    it = iter(first)
    consumed = [next(it) for _ in range(3)]
    assert consumed == full[:3]
    state = first.state_dict(batches_consumed=3)
    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the loop re-announces the epoch it resumes in
    assert list(resumed) == full[3:]
    assert list(resumed) == full  # the next pass over the same epoch is whole again
    # default count = batches handed out so far
    assert first.state_dict()["batches_consumed"] == 3
    resumed.set_epoch(3)
    assert len(list(resumed)) == len(resumed)
