"""IROF, Infidelity, SensitivityN, Sufficiency, InputInvariance, NonSensitivity: parity with Quantus 0.6,
hand computations, DDP and input errors."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from xaudit.explainers import create
from xaudit.metrics.axiomatic_quantus import InputInvariance, NonSensitivity, shifted_model
from xaudit.metrics.faithfulness_sets import IROF, Infidelity, SensitivityN, Sufficiency
from xaudit.metrics.registry import create_metric
from xaudit.utils.errors import ConfigError

quantus = pytest.importorskip("quantus")

H = W = 16


def tiny_net(seed: int = 0, in_chans: int = 1) -> nn.Module:
    """A 1-channel CNN (Quantus' IROF, SensitivityN and NonSensitivity treat C·H·W values as features:
    the same as xaudit's pixels only for C=1). The first conv has no padding (see InputInvariance)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(in_chans, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 6 * 6, 4)).eval()


class Float64(nn.Module):
    """Runs ``net`` in float64 on float32 input (Quantus feeds float32): forwards of differently composed
    batches then agree to ~1e-16, so comparisons are not swamped by float32 batching noise."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.double())


def batch(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, H, W, generator=g)
    attr = torch.randn(n, H, W, generator=g)
    target = torch.randint(0, 4, (n,), generator=g)
    return x, attr, target


def run_quantus(metric: Any, net: nn.Module, x: torch.Tensor, attr: torch.Tensor, target: torch.Tensor,
                **kw: Any) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = metric(model=net, x_batch=x.numpy(), y_batch=target.numpy(), a_batch=attr[:, None].double().numpy(),
                     device="cpu", **kw)
    return np.asarray(out, dtype=np.float64)


def rel_close(ours: torch.Tensor, theirs: np.ndarray, rtol: float = 1e-5, atol: float = 0.0) -> None:
    torch.testing.assert_close(ours.double(), torch.as_tensor(theirs, dtype=torch.float64), rtol=rtol, atol=atol)


# -- parity with Quantus 0.6 ------------------------------------------------------------------
def test_irof_matches_quantus_on_shared_slic_segments(monkeypatch):
    from skimage.segmentation import slic

    # Quantus 0.6's calculate_auc calls np.trapz, removed in numpy 2.4: the same rule under its new name
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)

    net = tiny_net()
    x, attr, target = batch(4)
    segs = torch.stack([torch.as_tensor(slic(np.moveaxis(xi.numpy(), 0, -1).astype("double"), start_label=0))
                        for xi in x]).long()
    m = IROF(net, perturb_baseline=0.0, internal_batch_size=7)
    m.update(x, attr, target, segments=segs)
    # Quantus pads curves of a batch to its longest one: one image per call is the per-image value
    q = np.concatenate([run_quantus(quantus.IROF(perturb_baseline=0.0, return_aggregate=False, disable_warnings=True),
                                    net, x[i:i + 1], attr[i:i + 1], target[i:i + 1]) for i in range(4)])
    rel_close(m.per_sample(), q)


def test_infidelity_matches_quantus():
    net = tiny_net()
    x, attr, target = batch(5)
    m = Infidelity(net, perturb_patch_sizes=[4, 8], internal_batch_size=6)
    m.update(x, attr, target)
    q = run_quantus(quantus.Infidelity(perturb_patch_sizes=[4, 8], n_perturb_samples=1, disable_warnings=True),
                    net, x, attr, target)
    rel_close(m.per_sample(), q)


@pytest.mark.parametrize("step", [1, 4])
def test_sensitivity_n_matches_quantus(step):
    # float64: correlations of small probability drops amplify float32 batching noise (measured up to
    # 2e-6 absolute with a float32 net), which would hide real differences
    net = Float64(tiny_net()).eval()
    x, attr, target = batch(6)
    m = SensitivityN(net, features_in_step=step, cumulative_attr=False, internal_batch_size=50)
    m.update(x[:4], attr[:4], target[:4])
    m.update(x[4:], attr[4:], target[4:])
    q = run_quantus(quantus.SensitivityN(features_in_step=step, return_aggregate=False, disable_warnings=True),
                    net, x, attr, target)
    rel_close(m.correlations(), q)
    torch.testing.assert_close(m.compute().double(), torch.tensor(float(q.mean()), dtype=torch.float64),
                               rtol=1e-5, atol=0)
    assert torch.isnan(m.per_sample()).all()


def test_sensitivity_n_cumulative_is_the_running_sum():
    net = tiny_net()
    x, attr, target = batch(4)
    a, b = SensitivityN(net, features_in_step=4), SensitivityN(net, features_in_step=4, cumulative_attr=False)
    a.update(x, attr, target)
    b.update(x, attr, target)
    torch.testing.assert_close(a.att_sums[0], b.att_sums[0].cumsum(1))
    # hand check of one point: the 8 highest attributions of image 0
    torch.testing.assert_close(a.att_sums[0][0, 1], attr[0].flatten().double().topk(8).values.sum())


def test_sufficiency_matches_quantus():
    net = tiny_net()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 1, H, W, generator=g)
    protos = torch.randn(3, H, W, generator=g)
    attr = protos[torch.tensor([0, 0, 1, 1, 1, 2, 2, 0])] + 0.3 * torch.randn(8, H, W, generator=g)
    target = torch.zeros(8, dtype=torch.long)
    m = Sufficiency(net)
    m.update(x, attr, target)
    q = run_quantus(quantus.Sufficiency(disable_warnings=True), net, x, attr, target)
    rel_close(m.per_sample(), q)
    assert float(m.per_sample().sum()) > 0 and not torch.isnan(m.per_sample()).any()


class Masked(nn.Module):
    """Zeroes the left 6 columns first: the model is exactly insensitive to them."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = torch.ones_like(x)
        keep[..., :6] = 0
        return self.net(x * keep)


def test_non_sensitivity_matches_quantus():
    net = Masked(tiny_net()).eval()
    x, attr, target = batch(3)
    attr = attr.clone()
    attr[:, :, 3:9] = 0  # zero over some ignored and some used columns: both kinds of violations
    attr = attr / attr.flatten(1).abs().amax(1)[:, None, None]  # max |a| = 1: Quantus' batch-wide max = per image
    m = NonSensitivity(net, internal_batch_size=100)
    m.update(x, attr, target)
    q = run_quantus(quantus.NonSensitivity(disable_warnings=True), net, x, attr, target)
    rel_close(m.per_sample(), q)
    # hand count for image 0, one forward per pixel: (insensitive) XOR (unattributed)
    with torch.no_grad():
        p0 = net(x[:1]).softmax(-1)[0, target[0]]
        low = x[0].min()
        count = 0
        for i in range(H * W):
            xp = x[:1].clone().view(1, 1, -1)
            xp[..., i] = low
            insensitive = bool((net(xp.view(1, 1, H, W)).softmax(-1)[0, target[0]] - p0).abs() < 1e-5)
            count += insensitive != bool(attr[0].flatten()[i].abs() < 1e-5)
    assert m.per_sample()[0] == count >= 6 * H  # at least columns 0..2 (ignored) and 6..8 (unattributed)


def test_input_invariance_matches_quantus(monkeypatch):
    # Quantus 0.6 bug: perturb_batch passes indices[i][1:], so the first input value is never shifted and
    # the shifted model computes another function (even saliency then fails). xaudit shifts every value
    # (Kindermans et al.); the reference is Quantus with that one slice fixed.
    from quantus.functions import perturb_func
    from quantus.metrics.axiomatic import input_invariance

    def perturb_all(perturb_func: Any, arr: np.ndarray, indices: np.ndarray, **kw: Any) -> np.ndarray:
        arr = arr.copy()
        for i in range(len(arr)):
            arr[i] = perturb_func(arr=arr[i], indices=indices[i], **kw)
        return arr

    assert "indices[i][1:]" in Path(perturb_func.__file__).read_text()  # the bug is still there
    monkeypatch.setattr(input_invariance, "perturb_batch", perturb_all)
    net = tiny_net()
    x, _, target = batch(4)
    rows = {}
    for method in ("saliency", "gradient_x_input"):
        explainer = create(method, net)
        attr = explainer.attribute(x, target)
        m = InputInvariance(net, internal_batch_size=3)
        m.update(x, attr, target, explainer)

        def explain(model: Any, inputs: np.ndarray, targets: np.ndarray, method: str = method, **_: Any) -> np.ndarray:
            model = model.get_model() if hasattr(model, "get_model") else model
            return create(method, model).attribute(torch.as_tensor(inputs), torch.as_tensor(targets))[:, None].numpy()

        q = run_quantus(quantus.InputInvariance(disable_warnings=True), net, x, attr, target, explain_func=explain)
        rel_close(m.per_sample(), q)
        rows[method] = m.per_sample().tolist()
    assert rows == {"saliency": [1.0] * 4, "gradient_x_input": [0.0] * 4}


def test_sufficiency_of_a_single_sample_is_undefined():
    net = tiny_net()
    x, attr, target = batch(1)
    m = Sufficiency(net)
    m.update(x, attr, target)
    assert torch.isnan(m.per_sample()).all() and torch.isnan(m.compute())


def test_input_invariance_copies_layer_references_and_leaves_the_model_alone():
    from xaudit.models import build_backbone

    torch.manual_seed(0)
    net = build_backbone("small_cnn", 4, width=8).eval()
    x = torch.randn(3, 3, H, W)
    target = torch.tensor([0, 1, 2])
    padded = InputInvariance(net)  # zero padding of the first conv: the shift is not absorbed at the borders
    padded.update(x, create("saliency", net).attribute(x, target), target, create("saliency", net))
    assert padded.per_sample().tolist() == [0.0] * 3
    net.features.block1[0].padding = (0, 0)  # no padding: the shifted copy computes the same function
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for method in ("saliency", "grad_cam"):
        explainer = create(method, net)
        m = InputInvariance(net)
        m.update(x, explainer.attribute(x, target), target, explainer)
        # the function is unchanged, and so are the activations after the first layer: both invariant
        assert m.per_sample().tolist() == [1.0] * 3, method
    assert net.state_dict().keys() == before.keys()
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert net.features.block1[0].bias is None


def test_shifted_model_computes_the_same_function():
    net = tiny_net()
    x, _, _ = batch(3)
    torch.testing.assert_close(shifted_model(net, -1.0)(x - 1.0), net(x), rtol=1e-5, atol=1e-5)


# -- registry, errors ---------------------------------------------------------------------------
def test_registered_names():
    net = tiny_net()
    for name, cls in [("irof", IROF), ("infidelity", Infidelity), ("sensitivity_n", SensitivityN),
                      ("sufficiency", Sufficiency), ("input_invariance", InputInvariance),
                      ("non_sensitivity", NonSensitivity)]:
        m = create_metric(name, model=net)
        assert isinstance(m, cls) and m.family in ("faithfulness", "axiomatic") and m.paper and m.measures


def test_bad_inputs_name_the_fix():
    net = tiny_net()
    x, attr, target = batch(2)
    with pytest.raises(ValueError, match=r"torch\.nn\.Module"):
        IROF(None)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="felzenszwalb"):
        IROF(net, segmentation_method="felzenszwalb")
    with pytest.raises(ConfigError, match="fraction in"):
        SensitivityN(net, n_max_percentage=1.5)
    with pytest.raises(ConfigError, match="fraction in"):
        Sufficiency(net, threshold=0.0)
    with pytest.raises(ConfigError, match="perturb_baseline"):
        Infidelity(net, perturb_baseline="grey")
    with pytest.raises(ValueError, match="does not match the images"):
        Infidelity(net).update(x, attr[:, :8], target)
    with pytest.raises(ValueError, match="segments must be integer labels"):
        IROF(net).update(x, attr, target, segments=torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="fewer than 2 superpixels"):
        IROF(net).update(x, attr, target, segments=torch.zeros(2, H, W, dtype=torch.long))
    with pytest.raises(ValueError, match="must divide"):
        NonSensitivity(net, features_in_step=3).update(x, attr, target)
    with pytest.raises(ValueError, match="needs the explainer"):
        InputInvariance(net).update(x, attr, target, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target must be a long tensor"):
        NonSensitivity(net).update(x, attr, target.float())


def test_irof_default_segmentation_runs():
    net = tiny_net(in_chans=3)
    g = torch.Generator().manual_seed(2)
    x, attr = torch.randn(2, 3, H, W, generator=g), torch.randn(2, H, W, generator=g)
    m = IROF(net, n_segments=16)
    m.update(x, attr, torch.tensor([0, 1]))
    assert torch.isfinite(m.per_sample()).all()


# -- DDP: devices=2 equals devices=1 -------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    net = tiny_net()
    x, attr, target = batch(7, seed=4)
    metrics = {"infidelity": Infidelity(net), "sensitivity_n": SensitivityN(net, features_in_step=8),
               "non_sensitivity": NonSensitivity(net, features_in_step=8), "irof": IROF(net, perturb_baseline=0.0)}
    segs = (torch.arange(H * W).view(H, W) // 32).expand(7, H, W)  # 8 bands
    share = slice(rank, None, world)  # uneven shards: 4 and 3 samples
    result = {}
    for name, m in metrics.items():
        kw = {"segments": segs[share]} if name == "irof" else {}
        m.update(x[share], attr[share], target[share], **kw)
        result[name] = (m.compute(), m.per_sample())
    result["corr"] = metrics["sensitivity_n"].correlations()
    if rank == 0:
        torch.save(result, out)
    dist.destroy_process_group()


def _ddp_run(world: int, out: Path) -> dict[str, Any]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(world, port, str(out)), nprocs=world, join=True)
    return torch.load(out, weights_only=False)


@pytest.mark.ddp
def test_two_processes_equal_one(tmp_path):
    one = _ddp_run(1, tmp_path / "one.pt")
    two = _ddp_run(2, tmp_path / "two.pt")
    order = torch.cat([torch.arange(0, 7, 2), torch.arange(1, 7, 2)])  # rank 0's samples, then rank 1's
    for name in ("infidelity", "sensitivity_n", "non_sensitivity", "irof"):
        torch.testing.assert_close(two[name][0], one[name][0], rtol=1e-5, atol=1e-6, equal_nan=True, msg=name)
        torch.testing.assert_close(two[name][1], one[name][1][order], rtol=1e-5, atol=1e-6, equal_nan=True,
                                   msg=name)
    assert torch.isfinite(one["sensitivity_n"][0])
    torch.testing.assert_close(two["corr"], one["corr"], rtol=1e-5, atol=1e-6)
