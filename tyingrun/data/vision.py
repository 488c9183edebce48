"""Image classification data: CIFAR-10 (Hugging Face datasets or a local copy) and scikit-learn's digits.

Images are kept as loaded (uint8 for CIFAR-10, 0-16 floats for digits) and normalised batch by batch with the
per-channel mean and std of the training split. Training batches may be augmented (``dataset.augment``): each
image is padded by CROP_PADDING pixels on every side (with the mean colour: zero after normalisation), cropped
back to its size at a random offset, and flipped horizontally with probability 1/2.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from tyingrun.config import DatasetConfig
from tyingrun.data.sampling import Batch, ShuffledSampler, TransformedSampler
from tyingrun.data.text import VAL_SPLITS, load_hub_dataset
from tyingrun.errors import BadInput

CROP_PADDING = 4
IMAGE_COLUMNS = ("img", "image")
LABEL_COLUMNS = ("label", "labels")
# The Hugging Face dataset id and configuration used unless dataset.hf_name / hf_config say otherwise.
CIFAR10_HUB = ("cifar10", None)
# The digits split is drawn once from this seed, whatever the run's seed, so every run validates on the same images.
DIGITS_SPLIT_SEED = 0
# Images per chunk when computing the channel statistics, to bound the float64 copy.
STATS_CHUNK = 4096

Split = tuple[torch.Tensor, torch.Tensor]  # images [n, channels, size, size], int64 labels [n]


@dataclass
class VisionData:
    train: Split
    val: Split
    n_classes: int
    mean: torch.Tensor  # [channels, 1, 1], of the training images
    std: torch.Tensor  # [channels, 1, 1]
    augment: bool
    unit = "samples"

    @property
    def channels(self) -> int:
        return self.train[0].shape[1]

    @property
    def image_size(self) -> int:
        return self.train[0].shape[-1]

    def train_sampler(self, batch_size: int, seed: int) -> ShuffledSampler | TransformedSampler:
        images, labels = self.train
        batches = ShuffledSampler(len(labels), batch_size, seed, take=lambda idx: self._batch(images[idx], labels[idx]))
        return TransformedSampler(batches, crop_and_flip, seed) if self.augment else batches

    def val_batches(self, batch_size: int, limit: Optional[int]) -> Iterator[Batch]:
        """Batches in order (the last one may be smaller); the first ``limit`` of them, or all when None."""
        images, labels = self.val
        for start in itertools.islice(range(0, len(labels), batch_size), limit):
            yield self._batch(images[start : start + batch_size], labels[start : start + batch_size])

    def items_in(self, batch: Batch) -> int:
        return len(batch["labels"])

    def describe(self) -> str:
        augmented = ", augmented" if self.augment else ""
        size = f"{self.channels}x{self.image_size}x{self.image_size}"
        counts = f"{len(self.train[1])} train / {len(self.val[1])} val images"
        return f"{counts} of {size}, {self.n_classes} classes{augmented}"

    def _batch(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        return {"images": (images.float() - self.mean) / self.std, "labels": labels}


def build_vision_data(cfg: DatasetConfig) -> VisionData:
    loaders: dict[str, Callable[[DatasetConfig], tuple[Split, Split, int]]] = {
        "cifar10": _cifar10_splits,
        "digits": _digits_splits,
    }
    if cfg.name not in loaders:
        raise BadInput(f"dataset={cfg.name!r} is not an image dataset; choose one of: {', '.join(loaders)}")
    train, val, n_classes = loaders[cfg.name](cfg)
    height, width = train[0].shape[-2:]
    if height != width:
        raise BadInput(f"dataset={cfg.name}: the images are {height}x{width}; the ViT needs square images")
    mean, std = channel_stats(train[0])
    return VisionData(train=train, val=val, n_classes=n_classes, mean=mean, std=std, augment=cfg.augment)


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over all images and pixels, each shaped [channels, 1, 1]."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for chunk in images.split(STATS_CHUNK):
        values = chunk.double()
        total += values.sum(dim=(0, 2, 3))
        squares += values.square().sum(dim=(0, 2, 3))
    count = images.numel() // images.shape[1]
    mean = total / count
    # The floor keeps a constant channel from dividing by zero.
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return mean.float().view(-1, 1, 1), std.float().view(-1, 1, 1)


def crop_and_flip(batch: Batch, generator: torch.Generator) -> Batch:
    """A random crop of each image padded by CROP_PADDING, flipped horizontally with probability 1/2."""
    images = batch["images"]
    count, _, height, width = images.shape
    padded = F.pad(images, (CROP_PADDING,) * 4)
    top = torch.randint(2 * CROP_PADDING + 1, (count,), generator=generator)
    left = torch.randint(2 * CROP_PADDING + 1, (count,), generator=generator)
    flip = torch.rand(count, generator=generator) < 0.5
    rows = (top[:, None] + torch.arange(height))[:, None, :, None]
    columns = (left[:, None] + torch.arange(width))[:, None, None, :]
    cropped = padded[torch.arange(count)[:, None, None, None], torch.arange(images.shape[1])[None, :, None, None],
                     rows, columns]
    return {**batch, "images": torch.where(flip[:, None, None, None], cropped.flip(-1), cropped)}


# ---- digits: scikit-learn's 8x8 handwritten digits, shipped with the package ----


def _digits_splits(cfg: DatasetConfig) -> tuple[Split, Split, int]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=cfg.val_fraction, stratify=digits.target, random_state=DIGITS_SPLIT_SEED
    )
    train_idx, val_idx = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return (images[train_idx], labels[train_idx]), (images[val_idx], labels[val_idx]), len(digits.target_names)


# ---- cifar10: Hugging Face datasets or a local save_to_disk copy ----


def _cifar10_splits(cfg: DatasetConfig) -> tuple[Split, Split, int]:
    if cfg.path:
        dataset_dict, source = _local_copy(cfg), f"dataset.path={cfg.path!r}"
    else:
        dataset_dict, label = load_hub_dataset(cfg, *CIFAR10_HUB, "a save_to_disk folder")
        source = f"Hugging Face dataset {label!r}"
    splits = list(dataset_dict.keys()) if hasattr(dataset_dict, "keys") else []
    val_split = next((split for split in VAL_SPLITS if split in splits), None)
    if "train" not in splits or val_split is None:
        raise BadInput(f"{source} has splits {splits}; it needs 'train' and one of {', '.join(VAL_SPLITS)}")
    train, n_classes = _image_split(dataset_dict["train"], source)
    val, _ = _image_split(dataset_dict[val_split], source)
    return train, val, n_classes


def _local_copy(cfg: DatasetConfig) -> Any:
    folder = Path(cfg.path).expanduser()
    if not (folder / "dataset_dict.json").is_file():
        raise BadInput(
            f"dataset.path={cfg.path!r} is not a datasets.save_to_disk folder of a DatasetDict; "
            f"save one with splits 'train' and 'test' and pass its folder"
        )
    import datasets

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return datasets.load_from_disk(str(folder))


def _image_split(split: Any, source: str) -> tuple[Split, int]:
    """Images as uint8 [n, 3, size, size] (converted to RGB), labels, and the number of classes."""
    image_column = next((name for name in IMAGE_COLUMNS if name in split.column_names), None)
    label_column = next((name for name in LABEL_COLUMNS if name in split.column_names), None)
    if image_column is None or label_column is None:
        raise BadInput(
            f"{source} has columns {split.column_names}; it needs an image column ({' or '.join(IMAGE_COLUMNS)}) "
            f"and a label column ({' or '.join(LABEL_COLUMNS)})"
        )
    pixels = [np.asarray(image.convert("RGB")) for image in split[image_column]]
    if len({array.shape for array in pixels}) > 1:
        raise BadInput(f"{source}: the images differ in size; resize them to one size first")
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
    labels = torch.tensor(split[label_column], dtype=torch.int64)
    n_classes = getattr(split.features[label_column], "num_classes", None) or int(labels.max()) + 1
    return (images, labels), n_classes
