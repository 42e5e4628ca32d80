"""Speaker-partitioned federated clients.

A federated ASR client is a device that belongs to one (or a few) speakers, so
the natural split is by speaker: every client holds whole speakers, and no
speaker's utterances are spread over two clients. This makes the federation
non-IID (each client sees few voices) and makes user-level DP meaningful
(one client = one or a few users).
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Sequence


def partition_by_speaker(speaker_ids: Sequence[str], num_clients: int, seed: int) -> list[list[int]]:
    """Split utterance indices into `num_clients` disjoint groups of whole speakers.

    `speaker_ids[i]` is the speaker of utterance `i`. Speakers are shuffled with
    `seed` and then dealt out greedily, largest first, to the client that
    currently holds the fewest utterances, so clients get similar amounts of data
    while each holds >= 1 whole speaker. Returns, per client, the sorted
    utterance indices. Deterministic given `seed`.
    """
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    by_speaker: dict[str, list[int]] = defaultdict(list)
    for index, speaker in enumerate(speaker_ids):
        by_speaker[str(speaker)].append(index)
    speakers = sorted(by_speaker)
    if num_clients > len(speakers):
        raise ValueError(
            f"cannot give {num_clients} clients whole speakers: the data has only {len(speakers)} "
            f"speaker(s) ({len(speaker_ids)} utterances); use num_clients <= {len(speakers)}"
        )
    rng = random.Random(seed)
    rng.shuffle(speakers)
    # stable sort after the shuffle: ties between equally large speakers keep the seeded order
    speakers.sort(key=lambda s: -len(by_speaker[s]))
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    # the first num_clients speakers go one per client so that nobody is empty
    for client, speaker in enumerate(speakers[:num_clients]):
        clients[client].extend(by_speaker[speaker])
    for speaker in speakers[num_clients:]:
        smallest = min(range(num_clients), key=lambda c: (len(clients[c]), c))
        clients[smallest].extend(by_speaker[speaker])
    return [sorted(indices) for indices in clients]


def speakers_of_partition(speaker_ids: Sequence[str], indices: Sequence[int]) -> set[str]:
    return {str(speaker_ids[i]) for i in indices}
