"""Heterogeneous sampling: which task each optimiser step draws from, and per-task infinite batches.

Both are deterministic functions of the seed and of a small state (``state_dict``), so a resumed
run draws exactly the batches the uninterrupted run would have drawn. Rank-awareness later means
offsetting the per-task permutations by rank; nothing here holds global state.
"""
from __future__ import annotations

import zlib
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

STRATEGIES = ("proportional", "temperature", "round_robin")


def task_probabilities(sizes: Mapping[str, int], strategy: str, temperature: float = 2.0) -> dict[str, float]:
    """Sampling probability per task: proportional to size, to ``size ** (1 / T)``, or uniform
    (round robin's long-run share)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sampling strategy {strategy!r}; expected one of {list(STRATEGIES)}")
    if strategy == "round_robin":
        return {t: 1 / len(sizes) for t in sizes}
    power = 1.0 if strategy == "proportional" else 1.0 / temperature
    w = {t: float(n) ** power for t, n in sizes.items()}
    total = sum(w.values())
    return {t: v / total for t, v in w.items()}


class TaskSampler:
    """Yields the task(s) of each optimiser step: ``tasks_per_step`` draws without replacement
    (or the next ones in round-robin order)."""

    def __init__(self, sizes: Mapping[str, int], strategy: str = "temperature", temperature: float = 2.0,
                 seed: int = 0, tasks_per_step: int = 1) -> None:
        self.tasks = list(sizes)
        if not 1 <= tasks_per_step <= len(self.tasks):
            raise ValueError(f"tasks_per_step must be in [1, {len(self.tasks)}], got {tasks_per_step}")
        self.probs = task_probabilities(sizes, strategy, temperature)
        self.strategy, self.seed, self.tasks_per_step = strategy, seed, tasks_per_step
        self.step = 0

    def tasks_for_step(self, step: int) -> list[str]:
        if self.strategy == "round_robin":
            n = len(self.tasks)
            return [self.tasks[(step * self.tasks_per_step + i) % n] for i in range(self.tasks_per_step)]
        rng = np.random.default_rng([self.seed, step])
        p = np.array([self.probs[t] for t in self.tasks])
        idx = rng.choice(len(self.tasks), size=self.tasks_per_step, replace=False, p=p)
        return [self.tasks[i] for i in idx]

    def __next__(self) -> list[str]:
        out = self.tasks_for_step(self.step)
        self.step += 1
        return out

    def __iter__(self) -> "TaskSampler":
        return self

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


class InfiniteBatches:
    """Endless batches from one dataset, reshuffled every epoch (the last partial batch of an
    epoch is dropped so batch shapes stay fixed). Optional ``num_workers`` load the batch's items
    in a thread pool.

    ``batch_size`` is the global batch. With ``world_size`` ranks, every rank walks the same
    permutation and loads only its slice ``rank`` of each global batch, so the ranks' data are
    disjoint, together equal the single-process batch, and the state (epoch, position) is the
    same on every rank: a run can resume at another world size."""

    def __init__(self, dataset: Dataset, batch_size: int, collate: Callable, seed: int = 0, name: str = "",
                 num_workers: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if len(dataset) < batch_size:
            raise ValueError(f"dataset {name!r} has {len(dataset)} items, fewer than batch_size={batch_size}")
        if batch_size % world_size:
            raise ValueError(f"tasks.{name}.batch_size={batch_size} is the global batch and must be divisible by "
                             f"the {world_size} ranks")
        self.rank, self.local_batch = rank, batch_size // world_size
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.seed = seed + zlib.crc32(name.encode())  # stable across processes, unlike hash()
        self.epoch, self.position = 0, 0
        self._perm = self._permutation(0)
        self._pool = None
        if num_workers > 0:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(num_workers)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(len(self.dataset), generator=g).tolist()

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self.position + self.batch_size > len(self._perm):
            self.epoch, self.position = self.epoch + 1, 0
            self._perm = self._permutation(self.epoch)
        start = self.position + self.rank * self.local_batch
        idx = self._perm[start:start + self.local_batch]
        self.position += self.batch_size
        items = list(self._pool.map(self.dataset.__getitem__, idx)) if self._pool else [self.dataset[i] for i in idx]
        return self.collate(items)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)


def collate(items: Sequence[tuple]) -> tuple[torch.Tensor, list[dict]]:
    """Stack images ``[B, 3, H, W]``; keep targets as a list of dicts (boxes differ per image)."""
    images = torch.stack([torch.as_tensor(im) for im, _ in items])
    return images, [t for _, t in items]
