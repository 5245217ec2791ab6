"""Wall time of a ROAR sweep: ResNet-18 on CIFAR-10-sized data, 3 methods × 5 fractions × 1 seed.

    python benchmarks/roar.py                # GPU: runs the full sweep; CPU: measures, projects
    python benchmarks/roar.py --full         # run the full sweep whatever the device
    python benchmarks/roar.py --epochs 10 --batch-size 512 --methods grad_cam,saliency,integrated_gradients

The data are synthetic CIFAR-10-size tensors (50 000 train / 10 000 test, 32 px, 10 classes) so
the run needs no download; the cost of a sweep does not depend on the pixel values. Everything
runs through the audit's own pieces: the ResNet-18 recipe of ``conf/model/resnet18.yaml``,
``RoarSweep`` (attribution shards, keep masks, one retrained model per cell) and the audit's
trainer factory (bf16-mixed and channels_last on a GPU).

A full sweep is 1 baseline + methods × fractions cells. Without a GPU the script measures each
part on a few batches — attribution images/s per method, train step and test step time, the
keep-mask computation — and projects the sweep from them. Side by side in the same run it also
times one epoch of the data path alone (no model): a ``DataLoader`` over the in-memory dataset
with per-item normalisation, crop/flip and masking (the usual way) against the device-held
batches the sweep uses.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from xaudit.data.base import TensorDictDataset
from xaudit.explainers import create
from xaudit.roar import DeviceBatches, ResultsLog, TensorSplit, keep_mask
from xaudit.roar.runner import Recipe, RoarSweep, retrain
from xaudit.tasks.audit import trainer_factory
from xaudit.utils.config import instantiate
from xaudit.utils.progress import quiet_lightning

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)


def synthetic(n: int, seed: int) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    return TensorSplit(torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
                       torch.randint(0, 10, (n,), generator=g), MEAN, STD)


def build_model() -> pl.LightningModule:
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "resnet18.yaml")
    cfg.scheduler.max_lr = cfg.optimizer.lr  # the interpolation points at the train config's model node
    return instantiate(cfg, num_classes=10, in_chans=3, image_size=32)


def make_trainer_factory(gpu: bool) -> Callable[..., pl.Trainer]:
    trainer = {"_target_": "pytorch_lightning.Trainer", "accelerator": "gpu" if gpu else "cpu", "devices": 1,
               "precision": "bf16-mixed" if gpu else "32-true", "enable_progress_bar": False,
               "default_root_dir": tempfile.mkdtemp()}
    return trainer_factory(OmegaConf.create({"trainer": trainer}))


class StepTimer(pl.Callback):
    """Per-batch wall times of training and testing (CUDA-synchronised)."""

    def __init__(self) -> None:
        self.train: list[float] = []
        self.test: list[float] = []

    def _now(self) -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_batch_start(self, *args: object) -> None:
        self._t = self._now()

    def on_train_batch_end(self, *args: object) -> None:
        self.train.append(self._now() - self._t)

    def on_test_batch_start(self, *args: object) -> None:
        self._t = self._now()

    def on_test_batch_end(self, *args: object) -> None:
        self.test.append(self._now() - self._t)


def median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def data_path_epoch(train: TensorSplit, batch_size: int, keep: torch.Tensor,
                    device: torch.device) -> tuple[float, float]:
    """Seconds for one epoch of batches: DataLoader (per item) vs device-held batches."""
    ds = TensorDictDataset(train.images, train.labels, MEAN, STD, augment=True)
    start = time.perf_counter()
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=True):
        x = batch["image"].to(device) * keep[batch["index"]].to(device)[:, None]
    if device.type == "cuda":
        torch.cuda.synchronize()
    loader = time.perf_counter() - start
    batches = DeviceBatches(train, batch_size, train=True, keep=keep, augment=True, device=device)
    start = time.perf_counter()
    for batch in batches:
        x = batch["image"]
    del x
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loader, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="grad_cam,saliency,integrated_gradients")
    p.add_argument("--fractions", default="0.1,0.3,0.5,0.7,0.9")
    p.add_argument("--epochs", type=int, default=10, help="retraining epochs per cell (fast CIFAR recipes: ~10)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--n-train", type=int, default=50_000)
    p.add_argument("--n-test", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=6, help="CPU: train/test steps measured (after one warm-up)")
    p.add_argument("--attr-images", type=int, default=128, help="CPU: images explained per method")
    p.add_argument("--full", action="store_true", help="run the whole sweep (default on a GPU)")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    methods = {m: {} for m in args.methods.split(",") if m}
    fractions = [float(f) for f in args.fractions.split(",")]
    cells = 1 + len(methods) * len(fractions)
    train, test = synthetic(args.n_train, 0), synthetic(args.n_test, 1)
    recipe = Recipe(args.epochs, args.batch_size, 2 * args.batch_size, augment=True, channels_last=gpu)
    make_trainer = make_trainer_factory(gpu)
    print(f"device: {torch.cuda.get_device_name() if gpu else f'CPU, {torch.get_num_threads()} threads'}; "
          f"torch {torch.__version__}; ResNet-18 (cifar stem), {args.n_train}/{args.n_test} images, "
          f"{len(methods)} methods × {len(fractions)} fractions + baseline = {cells} cells, {args.epochs} epochs "
          f"each, batch {args.batch_size}")
    if gpu:
        torch.backends.cudnn.benchmark = True

    keep = keep_mask(torch.rand(train.labels.numel(), 32, 32), 0.5, "roar")
    loader_s, device_s = data_path_epoch(train, args.batch_size, keep, device)
    print(f"data path, one epoch (no model): DataLoader per item {loader_s:.2f} s, device-held {device_s:.2f} s "
          f"→ {loader_s / device_s:.1f}× faster")

    if args.full or gpu:
        with tempfile.TemporaryDirectory() as tmp:
            net = build_model().net.to(device).eval()
            sweep = RoarSweep(mode="roar", methods=methods, fractions=fractions, seeds=[0], recipe=recipe,
                              train=train, test=test, net=net, build_model=build_model, make_trainer=make_trainer,
                              log=ResultsLog(tmp), store_root=str(Path(tmp) / "attributions"),
                              store_fingerprint={"benchmark": True}, attr_batch_size=2 * args.batch_size)
            start = time.perf_counter()
            sweep.compute_attributions(set(methods))
            attr_s = time.perf_counter() - start
            results = sweep.run()
            total = time.perf_counter() - start
        per_cell = [r["seconds"] for r in results.values()]
        print(f"attributions (train+test, {len(methods)} methods): {attr_s:.0f} s")
        print(f"cells: {len(per_cell)}, median {median(per_cell):.1f} s per cell")
        print(f"FULL SWEEP WALL TIME: {total / 60:.1f} min (target ≤15 min on one H100)")
        return

    # -- CPU: measure the parts, project the sweep -----------------------------------------------------
    net = build_model().net.eval()
    x = train.normalise(train.images[: args.attr_images])
    y = train.labels[: args.attr_images]
    attr_rate = {}
    for name, kw in methods.items():
        explainer = create(name, net, **kw)
        explainer.attribute(x[:8], y[:8])  # warm-up
        start = time.perf_counter()
        for s in range(0, x.shape[0], 64):
            explainer.attribute(x[s:s + 64], y[s:s + 64])
        attr_rate[name] = x.shape[0] / (time.perf_counter() - start)
    n_attr = args.n_train + args.n_test
    attr_total = sum(n_attr / r for r in attr_rate.values())
    print("attribution images/s: " + ", ".join(f"{k} {v:.0f}" for k, v in attr_rate.items())
          + f" → {attr_total / 60:.1f} min for {n_attr} images × {len(methods)} methods")

    start = time.perf_counter()
    keep_mask(torch.rand(5000, 32, 32), 0.5, "roar")
    mask_s = (time.perf_counter() - start) * n_attr / 5000
    timer = StepTimer()
    small_train = train.subset(args.batch_size * (args.steps + 1))
    small_test = test.subset(2 * args.batch_size * (args.steps + 1))

    def timed_trainer(stage: str, **kw: object) -> pl.Trainer:
        return make_trainer(stage, **{**kw, "callbacks": [timer]})

    retrain(build_model, timed_trainer, Recipe(1, args.batch_size, 2 * args.batch_size, augment=True),
            small_train, small_test, keep[: len(small_train)], None, seed=0)
    step, test_step = median(timer.train[1:]), median(timer.test[1:])
    steps_per_epoch = math.ceil(args.n_train / args.batch_size)
    test_batches = math.ceil(args.n_test / (2 * args.batch_size))
    per_cell = args.epochs * steps_per_epoch * step + test_batches * test_step + 2 * mask_s / len(fractions)
    sweep = attr_total + cells * per_cell
    print(f"train step {step:.2f} s (batch {args.batch_size}), test step {test_step:.2f} s "
          f"(batch {2 * args.batch_size}), keep masks {mask_s:.1f} s per fraction")
    print(f"PER CELL (projected): {per_cell / 60:.1f} min = {args.epochs} epochs × {steps_per_epoch} steps "
          f"+ {test_batches} test batches")
    print(f"PROJECTED SWEEP ({cells} cells + attributions): {sweep / 3600:.1f} h on this CPU")


if __name__ == "__main__":
    with quiet_lightning():
        main()
