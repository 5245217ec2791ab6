"""DDP: two CPU processes (gloo, ddp_spawn) give the same numbers as one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics import CatMetric

from xaudit.data.shapes import ShapesDataModule
from xaudit.explainers import create
from xaudit.metrics import (
    Completeness,
    DeletionInsertion,
    FaithfulnessCorrelation,
    LocalLipschitz,
    MaskIoU,
    MaxSensitivity,
    PointingGame,
    RelevanceMass,
    SanityCheck,
    update_metric,
)
from xaudit.models.backbones import build_backbone


class MetricProbe(pl.LightningModule):
    """Updates every metric in ``test_step``; rank 0 saves means, per-sample values and sample ids."""

    def __init__(self, state: dict[str, torch.Tensor], out: str) -> None:
        super().__init__()
        self.net = build_backbone("small_cnn", num_classes=4, width=16)
        self.net.load_state_dict(state)
        self.net.eval()
        self.out = out
        self.metrics = nn.ModuleDict({
            "deletion": DeletionInsertion(self.net, mode="deletion", steps=4, internal_batch_size=16),
            "insertion": DeletionInsertion(self.net, mode="insertion", steps=4, substrate="blur"),
            "faithfulness": FaithfulnessCorrelation(self.net, nr_runs=6, subset_size=32, seed=1),
            "completeness": Completeness(self.net),
            "sanity": SanityCheck(self.net, explainer="saliency", layers=["fc", "features.block5"]),
            "pointing": PointingGame(tolerance=1),
            "iou": MaskIoU(top_k=0.3),
            "mass": RelevanceMass(),
            "max_sensitivity": MaxSensitivity(self.net, radius=0.05, n=3, seed=2),
            "local_lipschitz": LocalLipschitz(self.net, sigma=0.1, n=3, seed=2),
        })
        self.index = CatMetric()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        x, y, mask = batch["image"], batch["label"], batch["mask"]
        explainer = create("saliency", self.net)
        attr = explainer.attribute(x, y)  # leaves inference mode itself
        for metric in self.metrics.values():
            update_metric(metric, x=x, attr=attr, target=y, mask=mask, explainer=explainer)
        self.index.update(batch["index"])

    def on_test_epoch_end(self) -> None:
        # every rank takes part in the gathers; rank 0 writes
        result: dict[str, Any] = {"index": self.index.compute().long()}
        for name, metric in self.metrics.items():
            result[name] = {"mean": metric.compute(), "per_sample": metric.per_sample()}
        result["deletion"]["curves"] = self.metrics["deletion"].curves()
        result["sanity"]["layers"] = self.metrics["sanity"].layer_scores("ssim")
        if self.trainer.is_global_zero:
            torch.save(result, self.out)


def run(state: dict[str, torch.Tensor], out: Path, devices: int) -> dict[str, Any]:
    extra = {"strategy": "ddp_spawn"} if devices > 1 else {}
    trainer = pl.Trainer(accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, **extra)
    # 29 samples: ranks get 15 and 14 (no padding: the datamodule shards with UnpaddedDistributedSampler)
    dm = ShapesDataModule(n_train=8, n_val=8, n_test=29, eval_batch_size=8, seed=3)
    trainer.test(MetricProbe(state, str(out)), datamodule=dm, verbose=False)
    return torch.load(out, weights_only=False)


def in_dataset_order(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values[index.argsort()]


@pytest.mark.ddp
def test_two_processes_equal_one(trained_shapes, tmp_path):
    state = {k: v.clone() for k, v in trained_shapes.net.state_dict().items()}
    one = run(state, tmp_path / "one.pt", devices=1)
    two = run(state, tmp_path / "two.pt", devices=2)
    assert one["index"].tolist() == list(range(29))
    assert sorted(two["index"].tolist()) == list(range(29)) and two["index"].tolist() != list(range(29))
    # tolerance: float32 forwards of differently composed batches differ by a few ulps
    for name in ("deletion", "insertion", "faithfulness", "completeness", "sanity", "pointing", "iou", "mass",
                 "max_sensitivity", "local_lipschitz"):
        a, b = one[name], two[name]
        assert a["per_sample"].shape == b["per_sample"].shape == (29,), name
        assert torch.isfinite(a["mean"]), name
        torch.testing.assert_close(in_dataset_order(b["per_sample"], two["index"]), a["per_sample"],
                                   rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)
        torch.testing.assert_close(b["mean"], a["mean"], rtol=1e-4, atol=1e-5, msg=name)
    assert one["max_sensitivity"]["mean"] > 0 and one["local_lipschitz"]["mean"] > 0
    torch.testing.assert_close(in_dataset_order(two["deletion"]["curves"], two["index"]), one["deletion"]["curves"],
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(in_dataset_order(two["sanity"]["layers"], two["index"]), one["sanity"]["layers"],
                               rtol=0, atol=1e-5)
