"""Batch samplers: length buckets for ASR, P speakers x K utterances for the contrastive loss.

Both are deterministic functions of (seed, epoch), split batches disjointly over DDP
ranks (rank r takes batches r, r + R, r + 2R, ... of the epoch's global list, which is
first cut or padded to a multiple of R so every rank runs the same number of steps),
and resume mid-epoch: `state_dict(batches_consumed=n)` records how many batches of
the current epoch this rank has trained on; after `load_state_dict` the next
iteration yields exactly the remaining batches of that epoch, then epochs start
from the beginning again.

Pass the number of batches the training loop actually consumed: a DataLoader
prefetches, so the count of batches the sampler has handed out (the default when
`batches_consumed` is None) can run ahead of the optimiser.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Hashable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class _ResumableBatchSampler(Sampler[list[int]]):
    def __init__(self, seed: int, num_replicas: int, rank: int):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank={rank}, num_replicas={num_replicas}")
        self.seed = int(seed)
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._skip = 0  # batches of `self.epoch` to skip once (resume)
        self._handed_out = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = int(epoch)

    def _global_batches(self, rng: np.random.Generator) -> list[list[int]]:
        raise NotImplementedError

    def _pad_to_replicas(self, batches: list[list[int]]) -> list[list[int]]:
        return batches[: len(batches) - len(batches) % self.num_replicas]

    def rank_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All of this rank's batches for `epoch` (default: the current one), in order."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch])
        batches = self._pad_to_replicas(self._global_batches(rng))
        return batches[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.rank_batches()
        skip, self._skip = self._skip, 0
        self._handed_out = skip
        for batch in batches[skip:]:
            self._handed_out += 1
            yield batch

    def __len__(self) -> int:
        """Batches per full epoch on this rank (a resumed epoch yields fewer: len - batches_consumed)."""
        return len(self.rank_batches())

    def state_dict(self, batches_consumed: int | None = None) -> dict[str, Any]:
        n = self._handed_out if batches_consumed is None else int(batches_consumed)
        return {"seed": self.seed, "epoch": self.epoch, "batches_consumed": n, "num_replicas": self.num_replicas, "rank": self.rank}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "num_replicas"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state[key]}, this sampler has {getattr(self, key)}; resume needs the same value")
        self.epoch = int(state["epoch"])
        self._skip = int(state["batches_consumed"])
        self._handed_out = self._skip


class BucketBatchSampler(_ResumableBatchSampler):
    """Batches of `batch_size` utterances of similar length.

    shuffle=True: indices are permuted, cut into pools of `batch_size * bucket_batches`,
    each pool is sorted by length and cut into batches, and the batch order is shuffled,
    so padding stays small while batches still differ between epochs. shuffle=False:
    the whole set sorted by length (stable), batches in that order.
    Every index appears exactly once per epoch over all ranks, except that the global
    batch list is cut (drop_last=True, or also the last incomplete batch) or padded by
    repeating its first batches (drop_last=False) to a multiple of num_replicas.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        bucket_batches: int = 50,
    ):
        super().__init__(seed, num_replicas, rank)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(lengths) == 0:
            raise ValueError("BucketBatchSampler: the dataset is empty")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.bucket_batches = bucket_batches

    def _global_batches(self, rng: np.random.Generator) -> list[list[int]]:
        n, bs = len(self.lengths), self.batch_size
        if self.shuffle:
            order = rng.permutation(n)
            pool = bs * self.bucket_batches
            batches = []
            for start in range(0, n, pool):
                chunk = order[start : start + pool]
                chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
                batches.extend(chunk[i : i + bs].tolist() for i in range(0, len(chunk), bs))
            if self.drop_last:
                batches = [b for b in batches if len(b) == bs]
            batches = [batches[i] for i in rng.permutation(len(batches))]
        else:
            order = np.argsort(self.lengths, kind="stable")
            batches = [order[i : i + bs].tolist() for i in range(0, n, bs)]
            if self.drop_last and batches and len(batches[-1]) < bs:
                batches.pop()
        return batches

    def _pad_to_replicas(self, batches: list[list[int]]) -> list[list[int]]:
        remainder = len(batches) % self.num_replicas
        if not remainder:
            return batches
        if self.drop_last or not batches:
            return batches[: len(batches) - remainder]
        extra = self.num_replicas - remainder
        return batches + [batches[i % len(batches)] for i in range(extra)]


class SpeakerBatchSampler(_ResumableBatchSampler):
    """Batches of P distinct speakers x K utterances each (for contrastive / verification losses).

    Per epoch each speaker's utterances are shuffled and cut into groups of K; the last
    incomplete group is filled with other utterances of the same speaker (so no
    utterance repeats within a group), hence every utterance of an eligible speaker is
    seen at least once. Batches are formed by repeatedly taking the P speakers with the
    most groups left (random tie-break), which yields as many complete batches as
    possible; groups left when fewer than P speakers remain are dropped for this epoch.
    Within a batch the indices are speaker-major: [spk0 x K, spk1 x K, ...].

    Speakers with fewer than K utterances: small_speakers="drop" (default) leaves them
    out; "replace" fills their groups by sampling their utterances with replacement, so
    a batch then holds duplicates of the same utterance.
    """

    def __init__(
        self,
        speaker_ids: Sequence[Hashable],
        P: int,
        K: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        small_speakers: str = "drop",
    ):
        super().__init__(seed, num_replicas, rank)
        if P < 1 or K < 1:
            raise ValueError(f"P and K must be >= 1, got P={P}, K={K}")
        if small_speakers not in ("drop", "replace"):
            raise ValueError(f"small_speakers must be 'drop' or 'replace', got {small_speakers!r}")
        self.P, self.K = P, K
        self.small_speakers = small_speakers
        by_speaker: dict[Hashable, list[int]] = defaultdict(list)
        for i, s in enumerate(speaker_ids):
            by_speaker[s].append(i)
        self.speakers = sorted(by_speaker, key=str)
        self.utts = {s: np.asarray(by_speaker[s]) for s in self.speakers}
        eligible = [s for s in self.speakers if len(self.utts[s]) >= K or small_speakers == "replace"]
        self.dropped_speakers = [s for s in self.speakers if s not in eligible]
        self.eligible = eligible
        if len(eligible) < P:
            raise ValueError(
                f"SpeakerBatchSampler: {len(eligible)} speakers have >= K={K} utterances "
                f"({len(self.speakers)} in total), but a batch needs P={P} distinct speakers"
            )

    def _groups(self, utts: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        K = self.K
        if len(utts) < K:
            return [rng.choice(utts, size=K, replace=True).tolist()]
        order = rng.permutation(utts)
        groups = [order[i : i + K].tolist() for i in range(0, len(order), K)]
        if len(groups[-1]) < K:
            last = groups[-1]
            others = [u for u in order.tolist() if u not in last]
            last.extend(rng.choice(others, size=K - len(last), replace=False).tolist())
        return groups

    def _global_batches(self, rng: np.random.Generator) -> list[list[int]]:
        remaining = {s: self._groups(self.utts[s], rng) for s in self.eligible}
        tie_break = {s: r for s, r in zip(self.eligible, rng.permutation(len(self.eligible)))}
        batches = []
        while True:
            available = [s for s in self.eligible if remaining[s]]
            if len(available) < self.P:
                break
            available.sort(key=lambda s: (-len(remaining[s]), tie_break[s]))
            chosen = available[: self.P]
            batches.append([i for s in chosen for i in remaining[s].pop()])
            # rotate priorities so equally-loaded speakers take turns being grouped together
            for s in chosen:
                tie_break[s] += len(self.eligible)
        return [batches[i] for i in rng.permutation(len(batches))]
