"""Heterogeneous sampling: which task each optimiser step draws from, and per-task infinite batches.

Both are deterministic functions of the seed and of a small state (``state_dict``), so a resumed
run draws exactly the batches the uninterrupted run would have drawn, whether items are loaded in
the training process or in DataLoader worker processes; nothing here holds global state.
"""
from __future__ import annotations

import zlib
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors

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


def item_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one item's random augmentation: a function of (run seed, epoch, index) only,
    so in-process and worker loading, and a resumed run, draw the same augmentations."""
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, epoch, index]).generate_state(1, np.uint64)[0] >> 1)


class LoadError:
    """An item that could not be read; carried back from a worker so the error stays one line."""

    def __init__(self, message: str) -> None:
        self.message = message


class SeededItems(Dataset):
    """``dataset[(seed, index)]``: the item with the torch RNG seeded by ``seed`` for its transform
    (the caller's RNG state is left untouched). Reading errors come back as :class:`LoadError`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        seed, index = key
        try:
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only, the one transforms draw from: torch.manual_seed would also
                # reseed (and leave reseeded) every accelerator's generator, at ~80 us an item.
                torch.default_generator.manual_seed(seed)
                return self.dataset[index]
        except (ValueError, FileNotFoundError) as e:
            return LoadError(str(e))


def raise_load_error(batch):
    """``batch``, or the one-line ValueError a worker reported instead of it."""
    if isinstance(batch, LoadError):
        raise ValueError(batch.message)
    return batch


def collate_or_error(collate_fn: Callable):
    """``collate_fn`` that hands back the first :class:`LoadError` among the items instead."""
    def run(items):
        failed = [it for it in items if isinstance(it, LoadError)]
        return failed[0] if failed else collate_fn(items)
    return run


class _PlannedBatches(Sampler):
    """The DataLoader's batch sampler: the keys of every batch from a start state on, forever."""

    def __init__(self, plan: "InfiniteBatches", epoch: int, position: int) -> None:
        self.plan, self.epoch, self.position = plan, epoch, position

    def __iter__(self):
        epoch, position = self.epoch, self.position
        while True:
            keys, epoch, position = self.plan.batch_keys(epoch, position)
            yield keys


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore the scheduler's stop signals (SIGTERM, SIGUSR1, SIGINT): the training
    process finishes its step and closes them; a worker killed by the signal would fail that step."""
    import signal
    for name in ("SIGTERM", "SIGUSR1", "SIGINT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)


class InfiniteBatches:
    """Endless batches from one dataset, reshuffled every epoch (the last partial batch of an
    epoch is dropped so every step sees a full batch).

    ``batch_size`` is the global batch. With ``world_size`` ranks, every rank walks the same
    permutation and loads only its slice ``rank`` of each global batch, so the ranks' data are
    disjoint, together equal the single-process batch, and the state (epoch, position) is the
    same on every rank: a run can resume at another world size.

    ``num_workers`` > 0 loads in that many ``DataLoader`` worker processes, which live for the
    whole run (the batch plan spans epochs), each keeping ``prefetch_factor`` batches ready;
    ``pin_memory`` for CUDA. Every item's augmentation is seeded by (seed, epoch, index)
    (:func:`item_seed`), so worker and in-process loading give the same batches, and a resumed
    run continues exactly: the state is that of the batches consumed, not of those prefetched."""

    def __init__(self, dataset: Dataset, batch_size: int, collate: Callable, seed: int = 0, name: str = "",
                 num_workers: int = 0, rank: int = 0, world_size: int = 1, prefetch_factor: int = 2,
                 pin_memory: bool = False) -> None:
        if len(dataset) < batch_size:
            raise ValueError(f"dataset {name!r} has {len(dataset)} items, fewer than batch_size={batch_size}")
        if batch_size % world_size:
            raise ValueError(f"tasks.{name}.batch_size={batch_size} is the global batch and must be divisible by "
                             f"the {world_size} ranks")
        if num_workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0")
        self.rank, self.local_batch = rank, batch_size // world_size
        self.dataset, self.batch_size, self.collate = dataset, batch_size, collate
        self.seed = seed + zlib.crc32(name.encode())  # stable across processes, unlike hash()
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory
        self.items = SeededItems(dataset)
        self.epoch, self.position = 0, 0
        self._perms: dict[int, torch.Tensor] = {}  # the last two epochs' (the plan runs ahead of the consumer)
        self._loader_iter = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perms = {e: p for e, p in self._perms.items() if e == epoch - 1}
            self._perms[epoch] = torch.randperm(len(self.dataset), generator=g)
        return self._perms[epoch]

    def batch_keys(self, epoch: int, position: int) -> tuple[list[tuple[int, int]], int, int]:
        """This rank's ``(item seed, index)`` keys of the batch at (epoch, position), and the
        state after it."""
        if position + self.batch_size > len(self.dataset):
            epoch, position = epoch + 1, 0
        start = position + self.rank * self.local_batch
        idx = self._permutation(epoch)[start:start + self.local_batch].tolist()
        return [(item_seed(self.seed, epoch, i), i) for i in idx], epoch, position + self.batch_size

    def __iter__(self) -> Iterator:
        return self

    def _loader(self):
        from torch.utils.data import DataLoader
        loader = DataLoader(self.items, batch_sampler=_PlannedBatches(self, self.epoch, self.position),
                            num_workers=self.num_workers, collate_fn=collate_or_error(self.collate),
                            prefetch_factor=self.prefetch_factor, pin_memory=self.pin_memory,
                            worker_init_fn=_ignore_stop_signals,
                            persistent_workers=False)  # the plan never ends: the workers live for the run
        return iter(loader)

    def __next__(self):
        if self.num_workers and self._loader_iter is None:
            self._loader_iter = self._loader()  # its plan starts at the current state
        keys, self.epoch, self.position = self.batch_keys(self.epoch, self.position)
        if self.num_workers:
            return raise_load_error(next(self._loader_iter))
        return raise_load_error(collate_or_error(self.collate)([self.items[k] for k in keys]))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.close()

    def close(self) -> None:
        """Stop the worker processes (a later batch starts new ones at the current state)."""
        self._loader_iter = None


def collate(items: Sequence[tuple]) -> tuple[torch.Tensor, list[dict]]:
    """Stack images into ``[B, 3, H, W]``; images of different sizes are padded at the bottom and
    right to the largest (zeros: the mean colour after normalisation), and so are training label
    maps of an image's own size (segmentation with the ignore value 255, depth with 0 = invalid).
    Targets stay a list of dicts; ``input_size`` in each says where its image ends."""
    images = [torch.as_tensor(im) for im, _ in items]
    targets = [t for _, t in items]
    shapes = {tuple(im.shape[-2:]) for im in images}
    if len(shapes) == 1:
        return torch.stack(images), targets
    H, W = max(s[0] for s in shapes), max(s[1] for s in shapes)
    batch = images[0].new_zeros(len(images), *images[0].shape[:-2], H, W)
    padded_targets = []
    for b, (im, t) in enumerate(zip(images, targets)):
        h, w = im.shape[-2:]
        batch[b, ..., :h, :w] = im
        t = dict(t)
        for key, value in t.items():
            if isinstance(value, tv_tensors.Mask) and tuple(value.shape[-2:]) == (h, w):
                fill = 255 if key == "mask" else 0
                grown = value.new_full((*value.shape[:-2], H, W), fill)
                grown[..., :h, :w] = value
                t[key] = tv_tensors.Mask(grown)
        padded_targets.append(t)
    return batch, padded_targets
