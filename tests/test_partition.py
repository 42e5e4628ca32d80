import pytest

from privacy.federated.partition import partition_by_speaker, speakers_of_partition


def _speakers(counts: dict[str, int]) -> list[str]:
    out = []
    for speaker, n in counts.items():
        out += [speaker] * n
    # interleave so that utterances of one speaker are not contiguous
    return sorted(out, key=lambda s: hash(s) % 7)


def test_partitions_are_disjoint_cover_everything_and_hold_whole_speakers():
    speaker_ids = _speakers({f"s{i}": 3 + i % 4 for i in range(10)})
    parts = partition_by_speaker(speaker_ids, num_clients=4, seed=0)
    assert len(parts) == 4
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(speaker_ids)))  # disjoint and complete
    seen: set[str] = set()
    for p in parts:
        assert p, "every client holds at least one speaker"
        speakers = speakers_of_partition(speaker_ids, p)
        assert not speakers & seen  # no speaker on two clients
        seen |= speakers
        for s in speakers:  # whole speakers: every utterance of s is on this client
            assert {i for i, x in enumerate(speaker_ids) if x == s} <= set(p)


def test_partition_is_deterministic_and_seed_dependent():
    speaker_ids = [f"s{i % 12}" for i in range(60)]
    a = partition_by_speaker(speaker_ids, 3, seed=1)
    assert a == partition_by_speaker(speaker_ids, 3, seed=1)
    assert any(partition_by_speaker(speaker_ids, 3, seed=s) != a for s in range(2, 6))
    # equal-sized speakers are dealt out evenly
    assert sorted(len(p) for p in a) == [20, 20, 20]


def test_one_speaker_per_client_when_counts_match():
    speaker_ids = ["a", "b", "a", "c", "b", "c"]
    parts = partition_by_speaker(speaker_ids, 3, seed=0)
    assert sorted(len(speakers_of_partition(speaker_ids, p)) for p in parts) == [1, 1, 1]


def test_too_many_clients_names_both_numbers():
    with pytest.raises(ValueError, match=r"5 clients.*only 2 speaker"):
        partition_by_speaker(["a", "b", "a"], num_clients=5, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        partition_by_speaker(["a"], num_clients=0, seed=0)

