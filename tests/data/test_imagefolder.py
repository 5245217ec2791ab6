"""ImageFolderDataModule reads a PNG class-folder tree through torchvision's ImageFolder."""

from __future__ import annotations

from pathlib import Path

import pytest

from xaudit.data import ImageFolderDataModule
from xaudit.tasks.train import train
from xaudit.utils.errors import DataNotFoundError

from xaudit_testing import write_image_folder


def test_reads_png_tree_rgb_and_grayscale(tmp_path: Path) -> None:
    write_image_folder(tmp_path, classes=("cat", "dog", "fox"), per_class=4, size=20)
    dm = ImageFolderDataModule(data_dir=str(tmp_path), image_size=16, batch_size=5)
    dm.setup()
    assert dm.class_names == ["cat", "dog", "fox"] and dm.num_classes == 3
    assert len(dm.train_set) == 12 and len(dm.test_set) == 12  # no test/ folder → val doubles as test
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (5, 3, 16, 16)
    gray = ImageFolderDataModule(data_dir=str(tmp_path), image_size=16, grayscale=True)
    gray.setup("test")
    assert gray.in_chans == 1 and gray.test_set[0]["image"].shape == (1, 16, 16)


def test_trains_one_step_on_png_tree(tmp_path: Path, make_cfg) -> None:
    write_image_folder(tmp_path / "data" / "imagefolder", per_class=4, size=20)
    cfg = make_cfg("data=imagefolder", "data.image_size=16", "data.num_workers=0", "data.batch_size=6",
                   "callbacks.explanation_monitor.num_samples=4",
                   "trainer.limit_train_batches=1", "test=true", fast=False, out=tmp_path)
    out = train(cfg)
    assert Path(out["ckpt_path"]).is_file()
    assert out["test/count"] == 12.0


def test_missing_folder_says_which_key_and_layout(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as err:
        ImageFolderDataModule(data_dir=str(tmp_path / "missing"))
    msg = str(err.value)
    assert "data.data_dir=" in msg and "missing" in msg and "<class_name>" in msg
