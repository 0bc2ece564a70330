"""The data of a run: its datasets and loaders, a function of (seed, step) alone.

Each step's global batch comes from a seeded permutation of the dataset (``StepBatchSampler``)
and each sample's augmentation from its own seed (``SeededSamples``), so the stream does not
depend on the number of loader workers, and a resumed run gets exactly the batches the
uninterrupted one would have.
"""
from __future__ import annotations

from typing import Iterator, List, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import ADE20K, SyntheticShapes, derive_seed
from .errors import TrainError
from .runtime import Runtime

SYNTHETIC_DATA_SEED = 0  # the synthetic dataset is one fixed dataset; --seed drives the run


class StepBatchSampler(Sampler):
    """The batches of steps [start_step, total_steps) for one rank.

    Epoch e is a permutation of the dataset seeded by (seed, e), cut into global batches of
    ``batch_size * world_size`` (the remainder dropped); rank r takes the r-th slice of each.
    Every item is (index, augmentation seed), so the stream depends only on (seed, step): a
    resumed run gets exactly the batches the uninterrupted one would have.
    """

    def __init__(self, dataset_size: int, batch_size: int, world_size: int, rank: int,
                 seed: int, start_step: int, total_steps: int):
        global_batch = batch_size * world_size
        if dataset_size < global_batch:
            raise TrainError(f"the training set has {dataset_size} samples, fewer than one "
                             f"global batch ({batch_size} x {world_size} processes)")
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.dataset_size, self.seed = dataset_size, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.steps_per_epoch = dataset_size // global_batch

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        epoch, order = None, None
        for step in range(self.start_step, self.total_steps):
            step_epoch, position = divmod(step, self.steps_per_epoch)
            if step_epoch != epoch:
                epoch = step_epoch
                generator = torch.Generator().manual_seed(derive_seed("order", self.seed, epoch))
                order = torch.randperm(self.dataset_size, generator=generator).tolist()
            first = (position * self.world_size + self.rank) * self.batch_size
            yield [(order[first + j], derive_seed("augment", self.seed, step, first + j))
                   for j in range(self.batch_size)]


class SeededSamples(Dataset):
    """``dataset.sample(index, generator)`` for (index, seed) keys."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Tuple[int, int]):
        index, seed = key
        return self.dataset.sample(index, torch.Generator().manual_seed(seed))


def build_datasets(args) -> Tuple[Dataset, Dataset]:
    """(training set, validation set) of ``--data``."""
    if args.data == "synthetic":
        common = dict(num_classes=args.num_classes, size=args.crop, seed=SYNTHETIC_DATA_SEED)
        return (SyntheticShapes(length=args.synthetic_train_size, split="train", **common),
                SyntheticShapes(length=args.synthetic_val_size, split="val", **common))
    if args.num_classes != ADE20K.num_classes:
        raise TrainError(f"ADE20K has {ADE20K.num_classes} classes; got --num-classes "
                         f"{args.num_classes}")
    try:
        return (ADE20K(args.data_root, "training", crop_size=args.crop),
                ADE20K(args.data_root, "validation"))
    except FileNotFoundError as exc:
        raise TrainError(str(exc)) from None


def build_loaders(args, rt: Runtime, train_set: Dataset, val_set: Dataset,
                  start_step: int) -> Tuple[DataLoader, DataLoader]:
    """(training loader of steps [start_step, --iters) for this rank, this rank's shard of the
    validation set)."""
    sampler = StepBatchSampler(len(train_set), args.batch_size, rt.world_size, rt.rank,
                               args.seed, start_step, args.iters)
    # Own generators: creating a loader iterator must not draw from the global RNG, whose
    # state is part of the checkpoint.
    loader_options = dict(num_workers=args.workers, pin_memory=rt.device.type == "cuda",
                          generator=torch.Generator())
    train_loader = DataLoader(SeededSamples(train_set), batch_sampler=sampler,
                              persistent_workers=False, **loader_options)
    val_loader = DataLoader(val_set, sampler=list(range(rt.rank, len(val_set), rt.world_size)),
                            batch_size=args.batch_size if args.data == "synthetic" else 1,
                            **loader_options)
    return train_loader, val_loader
