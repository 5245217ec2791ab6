"""Training precision and the explanation monitor / metrics (issue 24).

Lightning converts the module for ``*-true`` precision (and moves it to its device) in
``strategy.setup``, after callbacks' ``setup``; ``16-mixed`` runs steps under autocast (bf16 on
the CPU). The monitor and the metrics must feed the model inputs in its dtype and on its device,
and keep probabilities, sums and integrals in at least float32.
"""

from __future__ import annotations

import copy
import csv
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from xaudit.callbacks import ExplanationMonitor
from xaudit.explainers import create
from xaudit.metrics import Completeness, DeletionInsertion, SanityCheck
from xaudit.metrics.base import forward_probs, model_device_dtype, score_dtype, target_scores
from xaudit.tasks.train import build, train

METHODS = ("cam", "grad_cam", "saliency")
SCALARS = ("deletion", "insertion", "mass_in_mask", "pointing_game")
#: on top of FAST: a few batches, a 4-image probe, no test split — one run takes seconds on 2 CPU cores
TINY = ["data.n_train=192", "data.n_val=32", "data.batch_size=32", "test=false",
        "callbacks.explanation_monitor.num_samples=4", "callbacks.explanation_monitor.steps=4"]
#: float64 vs float32 on the same weights and inputs: only rounding differs (float32 ε ≈ 1.2e-7, a few
#: hundred operations deep); maps are compared relative to their own scale
F64_RTOL, F64_ATOL = 1e-4, 1e-5
#: bfloat16 keeps 8 significant bits (ε ≈ 7.8e-3): probabilities and AUCs agree to a few hundredths
BF16_ATOL = 5e-2


def _explain_rows(run_dir: str) -> list[dict[str, float]]:
    with open(Path(run_dir) / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: float(v) for k, v in r.items() if k.startswith("explain/") and v != ""}
            for r in rows if any(k.startswith("explain/") and v for k, v in r.items())]


@pytest.mark.parametrize("precision", ["64-true", "bf16-true", "16-mixed"])
def test_training_at_each_precision_logs_finite_explanation_scalars(precision: str, make_cfg) -> None:
    out = train(make_cfg(*TINY, f"trainer.precision={precision}"))  # the path of `python train.py`
    rows = _explain_rows(out["run_dir"])
    assert len(rows) == 1, "one monitor epoch (max_epochs=1)"
    for method in METHODS:
        for scalar in SCALARS:
            key = f"explain/{method}/{scalar}"
            assert key in rows[0] and key in out, key
            assert math.isfinite(rows[0][key]) and 0.0 <= rows[0][key] <= 1.0, (key, rows[0][key])
            assert out[key] == pytest.approx(rows[0][key], rel=1e-6)
    assert (Path(out["run_dir"]) / "explanations" / "epoch_000.png").is_file()


# -- the model converted after the monitor's setup --------------------------------------------
@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[pl.Trainer, pl.LightningModule]:
    """A trainer holding the shapes datamodule and its float32 module after one real training step."""
    from xaudit_testing import FAST, compose_config

    cfg = compose_config([*FAST, *TINY], tmp_path_factory.mktemp("fitted"))
    datamodule, module = build(cfg)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", default_root_dir=str(cfg.paths.output_dir))
    trainer.fit(module, datamodule=datamodule)
    return trainer, module.eval()


def _monitor() -> ExplanationMonitor:
    return ExplanationMonitor(explainers=list(METHODS), num_samples=4, steps=4, log_images=False)


def _explain_recording_inputs(monitor: ExplanationMonitor, trainer: pl.Trainer, module: pl.LightningModule,
                              convert: torch.dtype | None = None) -> tuple[dict, list[torch.dtype]]:
    """``monitor.explain(module)``, with the dtype of every input the network saw (a forward pre-hook).

    ``convert`` converts the module between ``setup`` and ``on_fit_start``, where Lightning's
    ``strategy.setup`` converts it for ``*-true`` precision.
    """
    seen: list[torch.dtype] = []
    handle = module.net.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    try:
        if convert is not None:
            module.to(convert)
        monitor.on_fit_start(trainer, module)  # the dry run, after the conversion
        return monitor.explain(module), seen
    finally:
        handle.remove()


def _float32_reference(fitted: tuple[pl.Trainer, pl.LightningModule]) -> tuple[pl.LightningModule, dict]:
    """A fresh copy of the fitted module and a float32 monitor's explanations of it (the reference)."""
    trainer, trained = fitted
    ref_module = copy.deepcopy(trained)
    ref = _monitor()
    ref.setup(trainer, ref_module, "fit")
    want, seen32 = _explain_recording_inputs(ref, trainer, ref_module)
    assert set(seen32) == {torch.float32}
    return copy.deepcopy(trained), want


def test_monitor_explains_in_the_dtype_the_model_is_converted_to_after_setup(fitted) -> None:
    trainer, _ = fitted
    module, want = _float32_reference(fitted)

    monitor = _monitor()
    monitor.setup(trainer, module, "fit")  # float32 here ...
    assert next(module.parameters()).dtype == torch.float32
    got, seen = _explain_recording_inputs(monitor, trainer, module, convert=torch.float64)  # ... float64 from now on
    assert seen and set(seen) == {torch.float64}, "every forward ran in the model's dtype"
    assert model_device_dtype(module.net, monitor.probe["image"]) == (torch.device("cpu"), torch.float64)
    assert monitor.probe["image"].dtype == torch.float32, "the probe stays float32"
    assert got["probs"].dtype == torch.float64
    torch.testing.assert_close(got["probs"], want["probs"].double(), rtol=F64_RTOL, atol=F64_ATOL)
    assert list(got["maps"]) == list(METHODS)
    for name in METHODS:
        a, b = got["maps"][name], want["maps"][name]
        assert a.dtype == torch.float32 and bool(torch.isfinite(a).all())
        scale = float(b.abs().max())
        assert scale > 0
        torch.testing.assert_close(a, b, rtol=F64_RTOL, atol=F64_ATOL * scale)
        for metric, values in want["values"][name].items():  # NaN: undefined for that sample in both
            torch.testing.assert_close(got["values"][name][metric].double(), values.double(),
                                       rtol=F64_RTOL, atol=F64_ATOL, equal_nan=True, msg=f"{name}/{metric}")


def _check_scores(values: dict[str, torch.Tensor], method: str) -> None:
    """Deletion/insertion are defined for every sample; the mask metrics are NaN where undefined (a map
    with no positive mass), never ±inf, and their logged mean (``nanmean``) is finite."""
    for metric, value in values.items():
        if metric in ("deletion", "insertion"):
            assert bool(torch.isfinite(value).all()), (method, metric)
        assert not bool(value.isinf().any()) and math.isfinite(float(value.float().nanmean())), (method, metric)


def test_monitor_follows_a_later_conversion_and_runs_under_autocast(fitted) -> None:
    trainer, trained = fitted
    module, want = _float32_reference(fitted)

    monitor = _monitor()
    monitor.setup(trainer, module, "fit")
    _explain_recording_inputs(monitor, trainer, module)  # dry run and one epoch in float32
    got, seen = _explain_recording_inputs(monitor, trainer, module, convert=torch.bfloat16)  # same explainers
    assert seen and set(seen) == {torch.bfloat16}
    assert got["probs"].dtype == torch.float32, "bfloat16 logits, softmax in float32"
    torch.testing.assert_close(got["probs"], want["probs"], rtol=0, atol=BF16_ATOL)
    for name in METHODS:
        assert got["maps"][name].dtype == torch.float32 and bool(torch.isfinite(got["maps"][name]).all())
        _check_scores(got["values"][name], name)
        for metric in ("deletion", "insertion"):
            assert float(got["values"][name][metric].mean()) == pytest.approx(
                float(want["values"][name][metric].mean()), abs=BF16_ATOL)

    # 16-mixed: a float32 model explained while autocast is on (as if called from a step)
    mixed_module = copy.deepcopy(trained)
    mixed = _monitor()
    mixed.setup(trainer, mixed_module, "fit")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under, _ = _explain_recording_inputs(mixed, trainer, mixed_module)
    assert under["probs"].dtype == torch.float32
    torch.testing.assert_close(under["probs"], want["probs"], rtol=0, atol=BF16_ATOL)
    for name in METHODS:
        assert under["maps"][name].dtype == torch.float32 and bool(torch.isfinite(under["maps"][name]).all())
        _check_scores(under["values"][name], name)
    assert all(p.grad is None for p in mixed_module.parameters()), "no weight gradients written"


# -- metrics on float64 / bfloat16 models ----------------------------------------------------------
def _tiny_cnn(seed: int = 0) -> nn.Module:
    """A seeded, untrained small CNN with a sharp softmax (probabilities move when pixels change)."""
    from xaudit.models.backbones import build_backbone

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = build_backbone("small_cnn", num_classes=4, in_chans=3, width=8)
    with torch.no_grad():
        net.fc.weight.mul_(30.0)
    return net.eval()


def _metrics(model: nn.Module) -> dict[str, object]:
    return {
        "deletion": DeletionInsertion(model, mode="deletion", steps=8, substrate="blur"),
        "insertion": DeletionInsertion(model, mode="insertion", steps=8, substrate="zero"),
        "completeness": Completeness(model, output="prob"),
        "sanity_check": SanityCheck(model, explainer="saliency", similarity="spearman"),
    }


def _scores(model: nn.Module, x: torch.Tensor, attr: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for name, metric in _metrics(model).items():
        metric.update(x, attr, y)  # type: ignore[attr-defined]
        mean = metric.compute()  # type: ignore[attr-defined]
        assert mean.dtype == torch.float32 and mean.device.type == "cpu" and math.isfinite(float(mean)), name
        per_sample = metric.per_sample()  # type: ignore[attr-defined]
        assert per_sample.shape == (x.shape[0],) and bool(torch.isfinite(per_sample).all()), name
        out[name] = per_sample
    return out


def test_metrics_on_float64_and_bfloat16_models_match_float32() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 24, 24, generator=g)
    net32 = _tiny_cnn()
    y = net32(x).argmax(1)
    attr = create("saliency", net32).attribute(x, y)  # one map for all: only the model's dtype differs
    want = _scores(net32, x, attr, y)
    got64 = _scores(copy.deepcopy(net32).double(), x, attr, y)  # float32 images into a float64 model
    got16 = _scores(copy.deepcopy(net32).to(torch.bfloat16), x, attr, y)
    for name in want:
        # SanityCheck re-explains a randomised copy (random weights drawn in float32 whatever the
        # model's dtype): near-tied saliency values may swap rank, so Spearman agrees to 1e-4
        atol = 1e-4 if name == "sanity_check" else F64_ATOL
        torch.testing.assert_close(got64[name], want[name], rtol=F64_RTOL, atol=atol, msg=name)
        # completeness errors are ~10 (a saliency map is not complete): compare them relatively
        rtol, atol = (BF16_ATOL, 0.0) if name == "completeness" else (0.0, BF16_ATOL)
        torch.testing.assert_close(got16[name], want[name], rtol=rtol, atol=atol, msg=name)


def test_probabilities_and_scores_accumulate_in_at_least_float32() -> None:
    x = torch.randn(3, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    net = _tiny_cnn()
    assert score_dtype(torch.bfloat16) == score_dtype(torch.float16) == torch.float32
    assert score_dtype(torch.float64) == torch.float64
    p32 = forward_probs(net, x)
    p16 = forward_probs(copy.deepcopy(net).to(torch.bfloat16), x)  # float32 x cast to the model's dtype
    p64 = forward_probs(copy.deepcopy(net).double(), x)
    assert (p32.dtype, p16.dtype, p64.dtype) == (torch.float32, torch.float32, torch.float64)
    torch.testing.assert_close(p64, p32.double(), rtol=F64_RTOL, atol=F64_ATOL)
    torch.testing.assert_close(p16, p32, rtol=0, atol=BF16_ATOL)
    torch.testing.assert_close(p16.sum(-1), torch.ones(3), rtol=0, atol=1e-6)  # normalised in float32
    logits = net(x).to(torch.bfloat16)
    target = torch.tensor([0, 1, 2])
    scores = target_scores(logits, target)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, logits.float().softmax(-1)[torch.arange(3), target], rtol=0, atol=0)


def test_pure_float16_training_that_breaks_names_the_mixed_precisions(make_cfg) -> None:
    """16-true has no loss scaling; AdamW's eps=1e-8 is 0 in float16, so this run's loss turns NaN."""
    from xaudit.utils.errors import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match=r"trainer\.precision=16-mixed .* bf16-mixed"):
        train(make_cfg(*TINY, "trainer.precision=16-true"))


def test_unknown_precision_is_a_config_error_listing_the_choices(make_cfg) -> None:
    from xaudit.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=r"trainer\.precision: Precision 'fp8' is invalid.*Use 32-true"):
        train(make_cfg(*TINY, "trainer.precision=fp8"))
