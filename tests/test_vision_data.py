"""Vision data: the digits split, normalisation, seeded augmentation, CIFAR-10 from a local copy, bad input."""

import numpy as np
import pytest
import torch

from tyingrun.config import Config, DatasetConfig, ModelConfig
from tyingrun.data.sampling import ShuffledSampler, TransformedSampler
from tyingrun.data.vision import CROP_PADDING, build_vision_data, crop_and_flip
from tyingrun.errors import BadInput
from tyingrun.preflight import check_model_and_dataset


@pytest.fixture(scope="module")
def digits():
    return build_vision_data(DatasetConfig(name="digits", val_fraction=0.2))


def test_digits_split_is_stratified_deterministic_and_whole(digits):
    train_labels, val_labels, test_labels = digits.train[1], digits.val[1], digits.test[1]
    assert (len(train_labels), len(val_labels), len(test_labels)) == (1347, 360, 90)
    assert (digits.n_classes, digits.channels, digits.image_size) == (10, 1, 8)
    every_label = torch.bincount(torch.cat([train_labels, val_labels, test_labels]))
    share = torch.bincount(val_labels, minlength=10) / every_label
    assert torch.allclose(share, torch.full((10,), 0.2), atol=0.02)
    again = build_vision_data(DatasetConfig(name="digits", val_fraction=0.2))
    assert torch.equal(again.val[0], digits.val[0]) and torch.equal(again.train[1], digits.train[1])
    assert torch.equal(again.test[0], digits.test[0])
    assert digits.unit == "samples"
    assert "1347 train / 360 val / 90 test images of 1x8x8, 10 classes" in digits.describe()


def test_training_images_are_normalised_per_channel(digits):
    images = digits.train_sampler(len(digits.train[1]), seed=0).next_batch()["images"]
    assert images.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert images.std().item() == pytest.approx(1.0, abs=1e-3)


def test_digits_are_not_augmented_and_val_batches_cover_the_split_in_order(digits):
    assert isinstance(digits.train_sampler(16, seed=0), ShuffledSampler)
    batches = list(digits.eval_batches("val", 100, None))
    assert [len(b["labels"]) for b in batches] == [100, 100, 100, 60]
    assert torch.equal(torch.cat([b["labels"] for b in batches]), digits.val[1])
    assert len(list(digits.eval_batches("val", 100, 2))) == 2
    test_batches = list(digits.eval_batches("test", 64, None))
    assert torch.equal(torch.cat([b["labels"] for b in test_batches]), digits.test[1])
    assert (digits.eval_items("val"), digits.eval_items("test")) == (360, 90)


def test_each_augmented_image_is_a_crop_of_the_padded_image_maybe_flipped():
    images = torch.randn(32, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    augmented = crop_and_flip({"images": images, "labels": torch.zeros(32)}, torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(images, (CROP_PADDING,) * 4)
    span = 2 * CROP_PADDING + 1
    flips = 0
    for original, result in zip(padded, augmented["images"], strict=True):
        crops = [original[:, top : top + 8, left : left + 8] for top in range(span) for left in range(span)]
        plain = any(torch.equal(result, crop) for crop in crops)
        flipped = any(torch.equal(result, crop.flip(-1)) for crop in crops)
        assert plain or flipped
        flips += flipped and not plain
    assert 4 <= flips <= 28


def test_augmented_sampler_resumes_with_the_same_batches():
    data = build_vision_data(DatasetConfig(name="digits", val_fraction=0.2, augment=True))
    original = data.train_sampler(16, seed=2)
    assert isinstance(original, TransformedSampler) and "augmented" in data.describe()
    for _ in range(5):
        original.next_batch()
    resumed = data.train_sampler(16, seed=2)
    resumed.load_state_dict(original.state_dict())
    for _ in range(3):
        expected, got = original.next_batch(), resumed.next_batch()
        assert torch.equal(expected["images"], got["images"]) and torch.equal(expected["labels"], got["labels"])


@pytest.fixture(scope="module")
def cifar_copy(tmp_path_factory):
    """A CIFAR-10-shaped DatasetDict saved with save_to_disk: 32x32 RGB images, columns img and label."""
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)})

    def split(count):
        images = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]
        return datasets.Dataset.from_dict({"img": images, "label": [i % 10 for i in range(count)]}, features=features)

    folder = tmp_path_factory.mktemp("cifar10")
    datasets.DatasetDict({"train": split(40), "test": split(20)}).save_to_disk(str(folder))
    return folder


def test_cifar10_from_a_local_copy(cifar_copy):
    data = build_vision_data(DatasetConfig(name="cifar10", path=str(cifar_copy), augment=True, val_fraction=0.25))
    # val is carved from the published train split (40 images); test is the published test split.
    assert data.train[0].shape == (30, 3, 32, 32) and data.train[0].dtype == torch.uint8
    assert len(data.val[1]) == 10 and len(data.test[1]) == 20 and data.n_classes == 10
    batch = data.train_sampler(8, seed=0).next_batch()
    assert batch["images"].shape == (8, 3, 32, 32) and batch["images"].dtype == torch.float32


def test_a_folder_that_is_not_a_saved_dataset_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="is not a datasets.save_to_disk folder"):
        build_vision_data(DatasetConfig(name="cifar10", path=str(tmp_path)))


@pytest.mark.parametrize(
    ("model", "dataset", "expected"),
    [
        ("vit", "pydoc", "dataset=pydoc does not suit model=vit; model=vit trains on one of: cifar10, digits"),
        ("gpt2", "digits", "dataset=digits does not suit model=gpt2; model=gpt2 trains on one of: pydoc, wiki2"),
        ("bert", "mnist", "dataset=mnist is not a dataset"),
    ],
)
def test_model_and_dataset_must_match(model, dataset, expected):
    with pytest.raises(BadInput, match=expected):
        check_model_and_dataset(Config(model=ModelConfig(name=model), dataset=DatasetConfig(name=dataset)))
