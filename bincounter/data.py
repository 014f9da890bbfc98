"""Manifest rows -> tensors for training and evaluation."""
from __future__ import annotations

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset

from bincounter.transforms import read_image


def class_indices(counts, classes: list[int]) -> list[int]:
    """Counts -> their positions in `classes`. Raises ValueError naming the counts that are not classes."""
    unknown = sorted(set(counts) - set(classes))
    if unknown:
        raise ValueError(f"counts {unknown} are not among the model's classes {classes}")
    index = {c: i for i, c in enumerate(classes)}
    return [index[c] for c in counts]


class ManifestDataset(Dataset):
    """Rows of a manifest (path, count) -> (image tensor, class index). `classes` lists the counts in order."""

    def __init__(self, df: pd.DataFrame, classes: list[int], transform):
        self.paths = df["path"].tolist()
        self.labels = class_indices(df["count"], classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        # cached at ingest (verified, already small); decoded by the one decoder, whose errors name the file
        return self.transform(read_image(self.paths[i])), self.labels[i]


def make_loader(ds: Dataset, batch_size: int, workers: int, shuffle: bool, seed: int = 0,
                pin_memory: bool = False, sampler=None) -> DataLoader:
    """A DataLoader whose order and augmentation draws depend only on `seed` (pass seed+epoch for each
    epoch), so a resumed run sees the same batches as an uninterrupted one. A `sampler` (distributed training:
    this process's share) replaces `shuffle`."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, generator=g, pin_memory=pin_memory, persistent_workers=False,
                      drop_last=False)
