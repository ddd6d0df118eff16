"""The training-data order: reshuffled every epoch from (seed, epoch), sharded across ranks, and
able to start mid-epoch, so a resumed run sees the prompts the killed run had not reached yet.

Lightning restores the epoch and step counters from a checkpoint but replays the data from the
start of the epoch unless the loader can say where it was; `PreferenceDataModule.state_dict`
records that position and this sampler skips to it.
"""
from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableShuffleSampler(Sampler[int]):
    """Indices of one rank's share of a random permutation of `n`, new every epoch.

    The permutation depends on (seed, epoch) only, so every rank computes the same one and takes
    every `num_replicas`-th index; the tail that does not divide evenly is dropped so ranks run
    the same number of batches (as `DistributedSampler(drop_last=True)` does).

    With `labels` (one class per index), each class is permuted on its own and the classes are
    interleaved evenly (item k of a class of size m at position (k + 1/2) / m), so every stretch of
    the order holds the classes in the data's proportions: KTO's desirable and undesirable
    examples then meet in every batch once the minority is at least one per batch.
    """

    def __init__(self, n: int, seed: int, num_replicas: int = 1, rank: int = 0, labels: list | None = None):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        if labels is not None and len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} indices")
        self.n, self.seed, self.num_replicas, self.rank = n, seed, num_replicas, rank
        self.labels = labels
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, samples already consumed in it)

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def resume_at(self, epoch: int, consumed: int) -> None:
        """Start epoch `epoch` after its first `consumed` samples (of this rank's share)."""
        self._resume = (epoch, consumed)

    def __len__(self) -> int:
        return self.n // self.num_replicas

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g) if self.labels is None else self._stratified(g)
        perm = perm[: len(self) * self.num_replicas]
        if self.labels is None:
            share = perm[self.rank :: self.num_replicas].tolist()
        else:  # contiguous blocks keep each rank's share interleaved (a stride could fall on one class)
            share = perm[self.rank * len(self) : (self.rank + 1) * len(self)].tolist()
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
            self._resume = None
        return iter(share[start:])

    def _stratified(self, g: torch.Generator) -> torch.Tensor:
        labels = torch.tensor([hash(x) for x in self.labels])
        order, position = [], []
        for c in labels.unique():
            idx = (labels == c).nonzero()[:, 0]
            order.append(idx[torch.randperm(len(idx), generator=g)])
            position.append((torch.arange(len(idx), dtype=torch.float64) + 0.5) / len(idx))
        return torch.cat(order)[torch.cat(position).argsort(stable=True)]
