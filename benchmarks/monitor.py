"""Epoch time with and without the ExplanationMonitor, side by side in one process.

    python benchmarks/monitor.py            # GPU: ResNet-18, 50k CIFAR-size images; CPU: smaller
    python benchmarks/monitor.py --n-train 4096 --epochs 2

Data are synthetic CIFAR-size tensors (32 px, 10 classes) so the run needs no download. The
epoch time is measured on the last epoch (the first one warms up kernels and caches), from
train-epoch start to the end of validation (where the monitor runs). The monitor's cost is a
fixed amount per epoch, so the script also prints the overhead projected to a full 50k-image
CIFAR-10 epoch.
"""

from __future__ import annotations

import argparse
import functools
import time

import pytorch_lightning as pl
import torch

from xaudit.callbacks import ExplanationMonitor
from xaudit.data.base import TensorDictDataset, XAuditDataModule
from xaudit.models import Classifier


class SyntheticCIFAR(XAuditDataModule):
    """Random uint8 images with 10 labels: the tensor shapes and loader costs of CIFAR-10."""

    def __init__(self, n_train: int, n_val: int, batch_size: int, num_workers: int = 0) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=2 * batch_size, num_workers=num_workers)
        self.num_classes, self.image_size, self.in_chans = 10, 32, 3
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        self.class_names = [str(i) for i in range(10)]
        g = torch.Generator().manual_seed(0)
        self._data = {
            split: (torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                    torch.randint(0, 10, (n,), generator=g))
            for split, n in (("train", n_train), ("val", n_val))
        }

    def setup(self, stage: str | None = None) -> None:
        self.train_set = TensorDictDataset(*self._data["train"], self.mean, self.std)
        self.val_set = TensorDictDataset(*self._data["val"], self.mean, self.std)


class EpochTimer(pl.Callback):
    """Wall time from train-epoch start to validation end (monitor included), per epoch."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sync()
        self._start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # registered last, so it runs after the monitor's hook
        if not trainer.sanity_checking:
            self._sync()
            self.times.append(time.perf_counter() - self._start)


def run(monitor: bool, args: argparse.Namespace) -> float:
    pl.seed_everything(0, verbose=False)
    dm = SyntheticCIFAR(args.n_train, args.n_val, args.batch_size)
    model = Classifier(backbone={"name": args.backbone, "cifar_stem": True}, num_classes=10, image_size=32,
                       optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))
    timer = EpochTimer()
    callbacks: list[pl.Callback] = [ExplanationMonitor(num_samples=16, log_images=True)] if monitor else []
    trainer = pl.Trainer(max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[*callbacks, timer], default_root_dir=args.out,
                         precision="bf16-mixed" if torch.cuda.is_available() else "32-true")
    trainer.fit(model, datamodule=dm)
    return timer.times[-1]


def main() -> None:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--n-train", type=int, default=50000 if gpu else 2048)
    p.add_argument("--n-val", type=int, default=10000 if gpu else 512)
    p.add_argument("--batch-size", type=int, default=256 if gpu else 128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--out", default="/tmp/xaudit-bench-monitor")
    args = p.parse_args()
    device = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    off = run(False, args)
    on = run(True, args)
    cost = on - off
    per_image = off / (args.n_train + args.n_val)
    full_epoch = per_image * 60000  # CIFAR-10: 50k train + 10k val images
    print(f"device: {device}; {args.backbone}, {args.n_train} train + {args.n_val} val images, "
          f"batch {args.batch_size}")
    print("| setting | epoch time (s) |")
    print("|---|---|")
    print(f"| without monitor | {off:.2f} |")
    print(f"| with monitor (cam, grad_cam, saliency; 16 samples; 4 metrics) | {on:.2f} |")
    print(f"overhead: {100 * cost / off:.1f} % of this epoch ({cost:.2f} s per monitored epoch); "
          f"projected on a full CIFAR-10 epoch (60k images): {100 * cost / full_epoch:.1f} %")


if __name__ == "__main__":
    main()
