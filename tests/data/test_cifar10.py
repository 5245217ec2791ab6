"""CIFAR10DataModule reads the real python-batch format (torchvision's file list, a safe unpickler)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torchvision.datasets import CIFAR10

from xaudit.data import CIFAR10DataModule
from xaudit.tasks.train import train
from xaudit.utils.errors import DataNotFoundError

from xaudit_testing import write_cifar10


def test_reads_tiny_cifar_batches(tmp_path: Path) -> None:
    write_cifar10(tmp_path, n_train_per_batch=12, n_test=20)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_size=10, batch_size=8)
    dm.setup()
    assert len(dm.train_set) == 50 and len(dm.val_set) == 10 and len(dm.test_set) == 20
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32) and "mask" not in batch
    assert batch["label"].dtype == torch.long and int(batch["label"].max()) < 10
    assert dm.describe()["class_names"][0] == "airplane"


def test_trains_one_step_on_cifar_files(tmp_path: Path, make_cfg) -> None:
    write_cifar10(tmp_path / "data")
    cfg = make_cfg("data=cifar10", "data.val_size=10", "data.num_workers=0",
                   "callbacks.explanation_monitor.num_samples=4", "data.batch_size=16",
                   "trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "test=false",
                   fast=False, out=tmp_path)
    out = train(cfg)
    assert out["ckpt_path"].endswith(".ckpt") and Path(out["ckpt_path"]).is_file()


def test_missing_cifar_names_key_and_how_to_get_it(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert "data.data_dir=" in msg and "nowhere" in msg
    assert "data.download=true" in msg and "cifar-10-python.tar.gz" in msg


class _UncheckedCIFAR10(CIFAR10):
    """torchvision's reader without the md5 checks (the files are written by the test)."""

    def _check_integrity(self) -> bool:
        return True

    def _load_meta(self) -> None:
        pass


def test_same_images_and_labels_as_torchvisions_reader(tmp_path: Path) -> None:
    write_cifar10(tmp_path, n_train_per_batch=6, n_test=7)
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_size=0)
    images, labels = dm._load(train=True)
    ref = _UncheckedCIFAR10(str(tmp_path), train=True)  # the reference reader (plain pickle.load; our file)
    assert torch.equal(images, torch.from_numpy(ref.data).permute(0, 3, 1, 2))
    assert labels.tolist() == ref.targets


class _RunsCode:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_a_batch_file_holding_code_is_refused_not_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({"data": _RunsCode(), "labels": [0]}, f)
    monkeypatch.chdir(tmp_path)
    dm = CIFAR10DataModule(data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"Refusing to read .*test_batch.*global posix\.system is not allowed"):
        dm.setup("test")
    assert not (tmp_path / "pwned").exists()


def test_truncated_batch_file_says_redownload(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"test_batch is truncated or not a CIFAR-10 batch.*re-download"):
        CIFAR10DataModule(data_dir=str(tmp_path)).setup("test")
