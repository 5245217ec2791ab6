"""Fixtures for the metric tests: a small CNN trained on the shapes data, tiny hand-built models."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from xaudit.data.shapes import ShapesDataModule
from xaudit.models.classifier import Classifier


@contextmanager
def one_intra_op_thread() -> Iterator[None]:
    """Run torch ops on one thread, restoring the previous setting afterwards.

    These tests use tiny models: OpenMP threads cost more in synchronisation than they gain, and
    far more on a shared 2-core machine (fixture training measured 13 s with 1 thread vs 29 s with
    2 while another job ran). Results do not depend on it.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Every test here runs single-threaded (see :func:`one_intra_op_thread`); other suites are unaffected."""
    with one_intra_op_thread():
        yield


@dataclass
class TrainedShapes:
    """A small CNN trained on shapes (eval mode) and a fixed test batch with masks."""

    net: nn.Module
    x: torch.Tensor
    label: torch.Tensor
    mask: torch.Tensor
    accuracy: float
    train_seconds: float


@pytest.fixture(scope="session")
def trained_shapes() -> TrainedShapes:
    """Train ``small_cnn`` (width 16) for 3 epochs on 1500 shape images on the CPU (≤40 s)."""
    with one_intra_op_thread():
        return _train_shapes()


def _train_shapes() -> TrainedShapes:
    start = time.perf_counter()
    pl.seed_everything(0, verbose=False)
    dm = ShapesDataModule(num_classes=4, image_size=32, n_train=1500, n_val=16, n_test=128, batch_size=32,
                          eval_batch_size=128, seed=0)
    model = Classifier(backbone={"name": "small_cnn", "width": 16}, num_classes=4, image_size=32,
                       optimizer=functools.partial(torch.optim.AdamW, lr=4e-3))
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    net = model.net.eval()
    for p in net.parameters():
        p.grad = None  # training leaves the last step's gradients; tests check that metrics write none
    with torch.no_grad():
        accuracy = float((net(batch["image"]).argmax(1) == batch["label"]).float().mean())
    return TrainedShapes(net=net, x=batch["image"], label=batch["label"], mask=batch["mask"],
                         accuracy=accuracy, train_seconds=seconds)


@pytest.fixture(scope="session")
def trained_gray(trained_shapes: TrainedShapes) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The trained CNN as a 1-channel model, with the test images in gray: (net, x [B,1,H,W], label).

    Quantus counts every channel value as a feature; with one channel its features are our pixels.
    The stem's filters are summed over colour channels, so on a gray image g the 1-channel net
    computes exactly what the trained net computes on [g, g, g] (shape, not colour, is the class).
    """
    from xaudit.models.backbones import build_backbone

    net = build_backbone("small_cnn", num_classes=4, in_chans=1, width=16)
    state = dict(trained_shapes.net.state_dict())
    state["features.block1.0.weight"] = state["features.block1.0.weight"].sum(1, keepdim=True)
    net.load_state_dict(state)
    return net.eval(), trained_shapes.x.mean(1, keepdim=True), trained_shapes.label


class LinearScorer(nn.Module):
    """Two logits: ``w · x`` for class 0 and a constant 0 for class 1.

    The softmax probability of class 0 is sigmoid(w · x), so every perturbation curve has a
    closed form.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone().flatten())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.flatten(1) @ self.weight
        return torch.stack([z, torch.zeros_like(z)], dim=1)


@pytest.fixture
def linear_scorer() -> type[LinearScorer]:
    """The :class:`LinearScorer` class (a fixture, so test modules need not import conftest)."""
    return LinearScorer


def make_tiny_cnn(in_chans: int = 3, seed: int = 0) -> nn.Module:
    """A seeded, untrained small CNN whose outputs depend strongly on the input (eval mode)."""
    from xaudit.models.backbones import build_backbone

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_backbone("small_cnn", num_classes=4, in_chans=in_chans, width=8)
    with torch.no_grad():
        net.fc.weight.mul_(30.0)  # sharp softmax: probabilities move when pixels change
    return net.eval()


@pytest.fixture
def tiny_cnn() -> nn.Module:
    """:func:`make_tiny_cnn` with 3 input channels."""
    return make_tiny_cnn(3)


@pytest.fixture
def tiny_gray_cnn() -> nn.Module:
    """:func:`make_tiny_cnn` with 1 input channel (Quantus then counts features = pixels)."""
    return make_tiny_cnn(1)
