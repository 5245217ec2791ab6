"""A catalogue of bad input: each case is an input and the message it must produce — one that names
the problem and the fix. More cases live beside their features: tests/tasks/test_audit.py (missing,
unsafe, truncated or other-architecture checkpoints, read-only or full output directory, fractions,
seeds, class counts), tests/tasks/test_train.py (bad values and unknown groups before training),
tests/data/ (CIFAR files holding code or truncated), tests/utils/test_io.py (disk full while writing),
tests/explainers/test_inputs.py and tests/metrics/test_metric_errors_*."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from xaudit.data import ShapesDataModule
from xaudit.explainers import create
from xaudit.metrics import DeletionInsertion, MaskIoU, PointingGame, create_metric
from xaudit.metrics.evaluator import check_target_mode
from xaudit.models.backbones import build_backbone
from xaudit.models.classifier import classifier_from_checkpoint, load_checkpoint
from xaudit.tasks.common import instantiate
from xaudit.tasks.train import train

from xaudit_testing import compose_config

NET = build_backbone("small_cnn", 4, width=8).eval()


def x(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype) if not dtype.is_floating_point else torch.randn(shape).to(dtype)


def saliency(inp: torch.Tensor, target: object = 0) -> Callable[[], object]:
    return lambda: create("saliency", NET).attribute(inp, target)


CASES: list[tuple[str, Callable[[], object], type[BaseException], str]] = [
    ("tensor rank 3", saliency(x(3, 32, 32)), ValueError, r"rank 4.*x\.unsqueeze\(0\)"),
    ("wrong channel count", saliency(x(2, 1, 32, 32)), ValueError, r"1 channels.*expects 3.*in_chans=1"),
    ("uint8 images", saliency(x(2, 3, 32, 32, dtype=torch.uint8)), TypeError, r"float tensor.*x\.float\(\) / 255"),
    ("empty batch", saliency(x(0, 3, 32, 32)), ValueError, r"x is empty: shape \(0, 3, 32, 32\)"),
    ("NaN input", saliency(torch.full((2, 3, 32, 32), float("nan"))), ValueError, r"non-finite.*Check the data"),
    ("Inf input", saliency(torch.full((1, 3, 32, 32), float("inf"))), ValueError, r"non-finite.*sample\(s\) \[0\]"),
    ("target out of range", saliency(x(2, 3, 32, 32), 7), ValueError, r"class index 7.*4 classes \(valid: 0\.\.3\)"),
    ("target of wrong length", saliency(x(2, 3, 32, 32), torch.tensor([0, 1, 2])), ValueError,
     r"3 entries but x has batch size 2"),
    ("float target", saliency(x(2, 3, 32, 32), torch.tensor([0.0, 1.0])), TypeError, r"target\.long\(\)"),
    ("unknown explainer", lambda: create("gradcam", NET), ValueError,
     r"Did you mean 'grad_cam'.*Choices: ablation_cam, attention_rollout, attn_lrp, cam"),
    ("unknown explainer option", lambda: create("saliency", NET, foo=1), ValueError, r"'foo'\. Choices: abs"),
    ("unknown layer", lambda: create("grad_cam", NET, target_layer="nope").attribute(x(1, 3, 32, 32), 0),
     ValueError, r"Unknown target_layer 'nope'.*Choices: avgpool, fc, features"),
    ("unknown metric", lambda: create_metric("delet"), ValueError, r"Unknown metric 'delet'.*deletion_insertion"),
    ("metric steps 0", lambda: DeletionInsertion(NET, steps=0), ValueError, r"steps=0 must be an integer ≥1"),
    ("negative sigma", lambda: create("smoothgrad", NET, sigma=-1), ValueError, r"sigma must be ≥0"),
    ("unknown model", lambda: build_backbone("resnet19", 4), ValueError, r"Did you mean 'resnet18'"),
    ("mask metric without masks", lambda: PointingGame().update(torch.rand(2, 32, 32), None), ValueError,
     r"needs ground-truth object masks.*data=shapes"),
    ("spurious_p outside [0,1]", lambda: ShapesDataModule(spurious_p=1.5), ValueError,
     r"data\.spurious_p=1\.5 must lie in \[0, 1\]"),
    ("unknown cue", lambda: ShapesDataModule(cue="sky"), ValueError, r"data\.cue='sky' is unknown"),
    ("unknown metric option", lambda: create_metric("deletion_insertion", model=NET, stepz=3), ValueError,
     r"Unknown option for metric 'deletion_insertion': 'stepz'\. Did you mean 'steps'"),
    ("unknown reduce", lambda: create("saliency", NET).attribute(x(1, 3, 32, 32), 0, reduce="maxx"), ValueError,
     r"Unknown reduce 'maxx'\. Did you mean 'max'"),
    ("unknown smoothgrad variant", lambda: create("smoothgrad", NET, variant="sg3"), ValueError,
     r"Unknown smoothgrad variant 'sg3'.*Choices: sg, sg2, vargrad"),
    ("unknown canonizer", lambda: create("lrp", NET, canonizers=["merge_bn"]), ValueError,
     r"Did you mean 'merge_batchnorm'"),
    ("unknown baseline", lambda: create("deeplift", NET, baseline="foo").attribute(x(1, 3, 32, 32), 0), ValueError,
     r"Unknown baseline 'foo'\. Choices: blur, gray, mean, rise_blur, zero"),
    ("unknown substrate", lambda: DeletionInsertion(NET, substrate="noise"), ValueError,
     r"Unknown substrate 'noise'.*Choices: blur, gaussian, mean, zero"),
    ("integrated gradients steps 0", lambda: create("integrated_gradients", NET, steps=0), ValueError,
     r"steps=0 must be an integer ≥1"),
    ("smoothgrad n 0", lambda: create("smoothgrad", NET, n=0), ValueError, r"n=0 must be an integer ≥1"),
    ("occlusion window 0", lambda: create("occlusion", NET, window=0), ValueError, r"window=0 must be an integer ≥1"),
    ("mask_iou top_k outside (0,1]", lambda: MaskIoU(top_k=1.5), ValueError,
     r"top_k=1\.5 must be a fraction in \(0, 1\]"),
    ("layer without a spatial map for CAM", lambda: create("grad_cam", NET, target_layer="fc").attribute(
        x(1, 3, 32, 32), 0), ValueError, r"target_layer 'fc' outputs shape \(1, 4\); CAM methods need a \[B,K,h,w\]"),
    ("map of the wrong size for a metric", lambda: DeletionInsertion(NET).update(
        x(2, 3, 32, 32), torch.rand(2, 16, 16), torch.tensor([0, 1])), ValueError,
     r"attribution shape \[2, 16, 16\] does not match the images: expected \[2, 32, 32\].*upsample"),
    ("not an xaudit checkpoint", lambda: classifier_from_checkpoint({"state_dict": {}}, "x.ckpt"), ValueError,
     r"x\.ckpt is not an xaudit checkpoint.*python train\.py"),
    ("noise radius ≤ 0", lambda: create_metric("max_sensitivity", model=NET, radius=0), ValueError,
     r"radius=0 must be a number > 0"),
    ("unknown audit target", lambda: check_target_mode("truth"), ValueError,
     r"target='truth' is unknown; choose one of \['auto', 'label', 'predicted'\]"),
]


@pytest.mark.parametrize(("case", "call", "exc", "message"), CASES, ids=[c[0] for c in CASES])
def test_error_catalogue(case: str, call: Callable[[], object], exc: type[BaseException], message: str) -> None:
    with pytest.raises(exc, match=message):
        call()


def test_missing_dataset_path_names_the_key(tmp_path: Path) -> None:
    cfg = compose_config(["data=cifar10", f"data.data_dir={tmp_path / 'nowhere'}"], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data\.data_dir"):
        instantiate(cfg.data).setup("fit")


def test_hydra_override_typo_points_at_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match=r"Could not override 'trainer\.max_epoch'"):
        compose_config(["trainer.max_epoch=3"], tmp_path)


def test_unknown_dataset_group_lists_the_options(tmp_path: Path) -> None:
    with pytest.raises(MissingConfigException, match=r"(?s)data/cifr10.*Available options.*cifar10"):
        compose_config(["data=cifr10"], tmp_path)


class _Payload:
    """An arbitrary class: a checkpoint holding it only loads with weights_only=False."""


def test_unsafe_checkpoint_is_refused_not_unpickled(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "xaudit": _Payload()}, path)
    with pytest.raises(ValueError, match=r"Refusing to load .*unsafe\.ckpt.*weights_only=True"):
        load_checkpoint(path)


def test_training_resume_from_a_missing_checkpoint(tmp_path: Path) -> None:
    cfg = compose_config(["ckpt_path=last", f"paths.log_dir={tmp_path / 'empty'}"], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last: no checkpoints/last\.ckpt.*python train\.py"):
        train(cfg)


def test_a_failed_start_leaves_no_wandb_run_open(tmp_path: Path) -> None:
    # a later run in the same process must not write into the failed run's W&B files
    import wandb

    cfg = compose_config(["logger=wandb", "ckpt_path=last", f"paths.log_dir={tmp_path / 'empty'}"], tmp_path)
    with pytest.raises(FileNotFoundError):
        train(cfg)
    assert wandb.run is None
