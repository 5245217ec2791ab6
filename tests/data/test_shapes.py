"""ShapesDataModule: deterministic generation, masks, spurious cue, shuffled test cue, errors."""

from __future__ import annotations

import pytest
import torch

from xaudit.data import ShapesDataModule, generate_shapes
from xaudit.data.base import channel_stats
from xaudit.utils.errors import ConfigError


def test_same_seed_same_images_other_seed_differs() -> None:
    a = generate_shapes(64, seed=3)
    b = generate_shapes(64, seed=3)
    c = generate_shapes(64, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)


def test_balanced_classes_and_real_masks() -> None:
    s = generate_shapes(400, num_classes=4, image_size=32, seed=0)
    assert s.images.shape == (400, 3, 32, 32) and s.images.dtype == torch.uint8
    assert torch.bincount(s.labels, minlength=4).tolist() == [100, 100, 100, 100]
    area = s.masks.float().mean(dim=(1, 2))
    # every object is visible and leaves background around it
    assert area.min() > 0.03 and area.max() < 0.6
    # the object differs from the background: mean |inside - outside| colour difference is large
    inside = (s.images.float() * s.masks[:, None]).sum((2, 3)) / s.masks.sum((1, 2))[:, None]
    outside = (s.images.float() * ~s.masks[:, None]).sum((2, 3)) / (~s.masks).sum((1, 2))[:, None]
    assert (inside - outside).abs().sum(1).mean() > 60


@pytest.mark.parametrize("cue", ["background", "corner", "stripes"])
def test_spurious_cue_follows_p(cue: str) -> None:
    tied = generate_shapes(400, seed=1, spurious_p=1.0, cue=cue)
    assert torch.equal(tied.cues, tied.labels)
    free = generate_shapes(400, seed=1, spurious_p=0.0, cue=cue)
    agreement = (free.cues == free.labels).float().mean().item()
    assert 0.15 < agreement < 0.35  # chance level for 4 classes
    # the cue really changes the pixels outside the object, never the mask
    assert torch.equal(tied.masks, free.masks)
    assert not torch.equal(tied.images, free.images)


def test_shuffled_test_cue_breaks_the_shortcut() -> None:
    dm = ShapesDataModule(n_train=200, n_val=50, n_test=200, spurious_p=1.0, test_cue="shuffled")
    assert torch.equal(dm.split("train").cues, dm.split("train").labels)
    test = dm.split("test")
    assert (test.cues == test.labels).float().mean() < 0.4
    same = ShapesDataModule(n_train=200, n_val=50, n_test=200, spurious_p=1.0, test_cue="same").split("test")
    assert torch.equal(same.cues, same.labels)


def test_batches_are_dicts_normalised_with_exposed_stats() -> None:
    dm = ShapesDataModule(n_train=256, n_val=64, n_test=64, batch_size=32)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "index", "mask"}
    assert batch["image"].shape == (32, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["mask"].dtype == torch.bool and batch["label"].dtype == torch.long
    mean, std = channel_stats(dm.split("train").images)
    assert dm.mean == mean and dm.std == std and len(dm.mean) == 3
    # normalising the whole train split with the exposed stats gives ~zero mean, unit std
    full = torch.stack([dm.train_set[i]["image"] for i in range(len(dm.train_set))])
    assert full.mean((0, 2, 3)).abs().max() < 1e-4
    assert (full.std((0, 2, 3)) - 1).abs().max() < 1e-2
    # denormalize undoes it
    raw = dm.split("train").images[batch["index"]].float() / 255
    assert torch.allclose(dm.denormalize(batch["image"]), raw, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"spurious_p": 1.5}, "spurious_p=1.5 must lie in [0, 1]"),
        ({"spurious_p": -0.1}, "spurious_p=-0.1 must lie in [0, 1]"),
        ({"cue": "snow"}, "data.cue='snow' is unknown; choose one of ['background', 'corner', 'stripes']"),
        ({"num_classes": 9}, "data.num_classes=9 is out of range"),
        ({"image_size": 8}, "data.image_size=8 is too small"),
        ({"test_cue": "random"}, "data.test_cue='random' is unknown"),
        ({"n_train": 0}, "data.n_train=0 must be ≥1"),
    ],
)
def test_bad_settings_name_the_key_and_range(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        ShapesDataModule(**kwargs)
    assert needle in str(err.value)
