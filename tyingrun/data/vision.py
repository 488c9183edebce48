"""Image classification data: CIFAR-10 (Hugging Face datasets or a local copy) and scikit-learn's digits.

Three disjoint splits, fixed whatever the run's seed. digits publishes none: a stratified draw holds out
``dataset.val_fraction`` for val and ``dataset.test_fraction`` for test. cifar10's test split is the published
``test``; its val split is a stratified ``dataset.val_fraction`` share of the published ``train``.

Images are kept as loaded (uint8 for CIFAR-10, 0-16 floats for digits) and normalised batch by batch with the
per-channel mean and std of the training split. Training batches may be augmented (``dataset.augment``): each
image is padded by CROP_PADDING pixels on every side (with the mean colour: zero after normalisation), cropped
back to its size at a random offset, and flipped horizontally with probability 1/2.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from tyingrun.config import DatasetConfig
from tyingrun.contracts import Batch
from tyingrun.data.sampling import ShuffledSampler, TransformedSampler
from tyingrun.data.splits import held_out_fractions, spread_sample, stratified_split
from tyingrun.data.text import chosen_hub_id, find_split, load_hub_dataset
from tyingrun.errors import BadInput
from tyingrun.seeding import derive_seed

CROP_PADDING = 4
IMAGE_COLUMNS = ("img", "image")
LABEL_COLUMNS = ("label", "labels")
# The Hugging Face dataset id and configuration used unless dataset.hf_name / hf_config say otherwise.
CIFAR10_HUB = ("cifar10", None)
# The digits split is drawn once from this seed, whatever the run's seed, so every run validates on the same images.
DIGITS_SPLIT_SEED = 0
# Likewise the share of CIFAR-10's training images held out for validation.
CIFAR10_VAL_SEED = 0
SPLITS = ("train", "val", "test")
# Images per chunk when computing the channel statistics, to bound the float64 copy.
STATS_CHUNK = 4096

Split = tuple[torch.Tensor, torch.Tensor]  # images [n, channels, size, size], int64 labels [n]


@dataclass
class VisionData:
    train: Split
    val: Split
    test: Split
    n_classes: int
    mean: torch.Tensor  # [channels, 1, 1], of the training images
    std: torch.Tensor  # [channels, 1, 1]
    augment: bool
    unit = "samples"
    tokenizer_sha256 = None  # images have no tokenizer

    @property
    def channels(self) -> int:
        return self.train[0].shape[1]

    @property
    def image_size(self) -> int:
        return self.train[0].shape[-1]

    def train_sampler(self, batch_size: int, seed: int) -> ShuffledSampler | TransformedSampler:
        """Shuffled training batches; the order and the augmentation draw from independent streams of ``seed``."""
        images, labels = self.train

        def take(indices: torch.Tensor) -> Batch:
            return self._batch(images[indices], labels[indices])

        batches = ShuffledSampler(len(labels), batch_size, derive_seed(seed, "data_order"), take=take)
        if not self.augment:
            return batches
        return TransformedSampler(batches, crop_and_flip, derive_seed(seed, "augmentation"))

    def eval_batches(self, split: str, batch_size: int, limit: Optional[int]) -> Iterator[Batch]:
        """The batches of ``split`` (val or test) in order, the last one maybe smaller: every image when ``limit``
        is None, else ``limit`` full batches of evenly spaced images, the same at every call."""
        images, labels = self.split(split)
        if limit is not None:
            chosen = spread_sample(len(labels), limit * batch_size)
            images, labels = images[chosen], labels[chosen]
        for start in range(0, len(labels), batch_size):
            yield self._batch(images[start : start + batch_size], labels[start : start + batch_size])

    def eval_items(self, split: str) -> int:
        """Images in the whole split."""
        return len(self.split(split)[1])

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; the splits are {', '.join(SPLITS)}")
        return getattr(self, name)

    def items_in(self, batch: Batch) -> int:
        return len(batch["labels"])

    def describe(self) -> str:
        augmented = ", augmented" if self.augment else ""
        size = f"{self.channels}x{self.image_size}x{self.image_size}"
        counts = " / ".join(f"{self.eval_items(name)} {name}" for name in SPLITS)
        return f"{counts} images of {size}, {self.n_classes} classes{augmented}"

    def _batch(self, images: torch.Tensor, labels: torch.Tensor) -> Batch:
        return {"images": (images.float() - self.mean) / self.std, "labels": labels}


def build_vision_data(cfg: DatasetConfig) -> VisionData:
    """The splits of the image dataset ``dataset.name`` (one of IMAGE_LOADERS, checked by the preflight)."""
    splits, n_classes = IMAGE_LOADERS[cfg.name](cfg)
    height, width = splits["train"][0].shape[-2:]
    if height != width:
        raise BadInput(f"dataset={cfg.name}: the images are {height}x{width}; the ViT needs square images")
    mean, std = channel_stats(splits["train"][0])
    return VisionData(**splits, n_classes=n_classes, mean=mean, std=std, augment=cfg.augment)


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


def _digits_splits(cfg: DatasetConfig) -> tuple[dict[str, Split], int]:
    """Stratified: test takes ``test_fraction`` of the images, then val ``val_fraction`` of all of them."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1)
    labels = torch.from_numpy(digits.target).long()
    val_fraction, test_fraction = held_out_fractions(cfg)
    rest, test = stratified_split(np.arange(len(labels)), digits.target, test_fraction, DIGITS_SPLIT_SEED)
    val_share_of_rest = val_fraction / (1.0 - test_fraction)
    train, val = stratified_split(rest, digits.target[rest], val_share_of_rest, DIGITS_SPLIT_SEED)
    indices = {"train": train, "val": val, "test": test}
    splits = {name: (images[chosen], labels[chosen]) for name, chosen in indices.items()}
    return splits, len(digits.target_names)


# ---- cifar10: Hugging Face datasets or a local save_to_disk copy ----


def _cifar10_splits(cfg: DatasetConfig) -> tuple[dict[str, Split], int]:
    if cfg.path:
        dataset_dict, source = _local_copy(cfg), f"dataset.path={cfg.path!r}"
    else:
        dataset_dict, label = load_hub_dataset(cfg, *chosen_hub_id(cfg, *CIFAR10_HUB), "a save_to_disk folder")
        source = f"Hugging Face dataset {label!r}"
    train_name, test_name = (find_split(dataset_dict, split, source) for split in ("train", "test"))
    (images, labels), n_classes = _image_split(dataset_dict[train_name], source)
    test, _ = _image_split(dataset_dict[test_name], source)
    train, val = stratified_split(np.arange(len(labels)), labels.numpy(), cfg.val_fraction, CIFAR10_VAL_SEED)
    train, val = torch.from_numpy(train), torch.from_numpy(val)
    return {"train": (images[train], labels[train]), "val": (images[val], labels[val]), "test": test}, n_classes


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


# The image datasets by name, and the side of their square images (the preflight checks model.patch_size).
IMAGE_LOADERS: dict[str, Callable[[DatasetConfig], tuple[dict[str, Split], int]]] = {
    "cifar10": _cifar10_splits,
    "digits": _digits_splits,
}
IMAGE_SIZES = {"cifar10": 32, "digits": 8}
