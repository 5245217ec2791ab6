"""What every xaudit metric shares: per-sample states, input checks, substrates, safe forwards.

Every metric is a torchmetrics ``Metric``: hyper-parameters at construction, ``update(...)`` per
batch, ``compute()`` → the mean over samples. Per-sample values live in a ``cat`` state and the
mean in ``sum`` states, so both reduce exactly across DDP ranks (no padded duplicates when the
data is sharded with :class:`xaudit.data.UnpaddedDistributedSampler`).

Two update signatures, one per family (``update_inputs`` names them for generic callers):

- metrics that run the model: ``update(x, attr, target)`` — ``x`` [B,C,H,W] normalised images,
  ``attr`` [B,H,W] per-pixel attributions, ``target`` long [B] explained class;
- localisation metrics: ``update(attr, mask)`` — ``mask`` bool [B,H,W] ground-truth object;
- robustness metrics: ``update(x, attr, target, explainer)`` — they re-explain noisy copies of ``x``.

:func:`update_metric` dispatches a batch to either kind by those names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from itertools import chain
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from xaudit.explainers.base import Explainer, compute_dtype
from xaudit.ops.fills import FillLike, make_fill
from xaudit.utils.errors import ConfigError
from xaudit.utils.validation import choice, positive_int

#: constructor arguments that decide how a metric runs, not what it measures (left off the card)
_NOT_PROTOCOL = frozenset({"self", "model", "internal_batch_size", "explainer", "explainer_kwargs"})
SUBSTRATES: tuple[str, ...] = ("zero", "blur", "mean", "gaussian")
#: what a model-based metric reads from the classifier: the target's softmax probability or logit
OUTPUTS: tuple[str, ...] = ("prob", "logit")



def deviations(params: Mapping[str, Any], paper: Mapping[str, Any]) -> list[str]:
    """``key=ours (paper: theirs)`` for every parameter the paper fixes and the run does not follow
    (the protocol card's deviations column; :mod:`xaudit.reporting.protocol` re-exports it)."""
    return [f"{k}={params.get(k)!r} (paper: {v!r})" for k, v in paper.items() if params.get(k) != v]

class XAuditMetric(Metric):
    """A metric with one value per sample: ``compute()`` is their mean, ``per_sample()`` the values.

    NaN marks a sample where the metric is undefined (e.g. an empty ground-truth mask, a constant
    attribution map); ``compute()`` averages the defined values and returns NaN if there are none.
    """

    is_differentiable: ClassVar[bool] = False
    full_state_update: ClassVar[bool] = False
    #: argument names of ``update`` (see the module docstring), used by :func:`update_metric`
    update_inputs: ClassVar[tuple[str, ...]] = ("x", "attr", "target")

    #: the paper whose protocol the defaults follow (the protocol card's "paper" column)
    paper: ClassVar[str] = ""
    #: which class the paper explains and scores: the true ``label`` or the model's top-1 ``predicted``
    protocol_target: ClassVar[str] = "label"
    #: known differences from the paper's code that are not parameters (listed on the card)
    protocol_notes: ClassVar[tuple[str, ...]] = ()
    #: Quantus' family: faithfulness | robustness | localisation | complexity | randomisation | axiomatic
    #: (``evaluate.metrics=<family>`` selects a family; the report groups its sections by it)
    family: ClassVar[str] = ""
    #: one line on what the metric measures, for the metric card
    measures: ClassVar[str] = ""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("values", default=[], dist_reduce_fx="cat")
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add_values(self, values: Tensor) -> None:
        values = values.detach().to(torch.float64)
        defined = ~torch.isnan(values)
        self.values.append(values)
        self.total += values.nan_to_num(0.0).sum()
        self.count += defined.sum()

    def compute(self) -> Tensor:
        """Mean of the defined per-sample values (NaN when there are none)."""
        return (self.total / self.count).float() if int(self.count) > 0 else torch.tensor(float("nan"))

    def per_sample(self) -> Tensor:
        """Per-sample values [N] in update order (gathered rank by rank under DDP)."""
        return self._gathered("values")

    def protocol_params(self, size: tuple[int, int]) -> dict[str, Any]:
        """The hyper-parameters as run on H×W images (``size``), defaults resolved; by default the
        constructor's arguments read back from the instance (serving options left out)."""
        out: dict[str, Any] = {}
        for name, param in inspect.signature(type(self).__init__).parameters.items():
            if name in _NOT_PROTOCOL or param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
                continue
            value = getattr(self, name, param.default)
            out[name] = value if isinstance(value, (str, int, float, bool, type(None))) else str(value)
        return out

    def paper_params(self, size: tuple[int, int]) -> dict[str, Any]:
        """The paper's values of the parameters it fixes, at ``size`` (scaled where the paper's are in
        pixels at 224); parameters it leaves open are absent."""
        return {}

    def protocol(self, size: tuple[int, int]) -> dict[str, Any]:
        """This metric's row of the protocol card: paper, parameters as run, the paper's values and
        every deviation from them (``key=ours (paper: theirs)``), plus known notes."""
        params, paper = self.protocol_params(size), self.paper_params(size)
        return {"paper": self.paper, "params": params, "paper_params": paper, "deviations": deviations(params, paper),
                "notes": list(self.protocol_notes)}

    def _gathered(self, state: str) -> Tensor:
        """A ``cat`` state, synced across ranks when running distributed (a collective call)."""
        if self._is_synced or not self._to_sync:
            return _cat(getattr(self, state))
        with self.sync_context(should_sync=True, should_unsync=True):
            return _cat(getattr(self, state)).clone()


class ModelHolder:
    """Keeps a reference to the caller's model without registering it as a sub-module.

    Registered, the model would join the metric's ``state_dict``, follow ``metric.to(...)`` and be
    switched by ``metric.train()/eval()`` — all changes to an object the metric does not own.
    """

    def _hold(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"{type(self).__name__}: model must be a torch.nn.Module; got {type(model).__name__}.")
        self.__dict__["_held_model"] = model

    @property
    def model(self) -> nn.Module:
        """The classifier this metric evaluates (not owned: never moved, switched or modified)."""
        return self.__dict__["_held_model"]


def _cat(state: list[Tensor] | Tensor) -> Tensor:
    if isinstance(state, list) and not state:
        return torch.empty(0)
    return dim_zero_cat(state)


def update_metric(
    metric: XAuditMetric,
    *,
    x: Tensor | None = None,
    attr: Tensor | None = None,
    target: Tensor | None = None,
    mask: Tensor | None = None,
    explainer: Any = None,
) -> None:
    """Update any xaudit metric from a batch's pieces, passing only what it needs.

    Lets an audit loop treat model-based and localisation metrics alike; a localisation metric
    on data without masks fails here with an error that names the fix.
    """
    given = {"x": x, "attr": attr, "target": target, "mask": mask, "explainer": explainer}
    args = {}
    for name in metric.update_inputs:
        if given[name] is None:
            if name == "mask":
                raise missing_mask_error(type(metric).__name__)
            raise ValueError(f"{type(metric).__name__}.update needs {name!r}, but it was not given.")
        args[name] = given[name]
    metric.update(**args)


# -- input checks ---------------------------------------------------------------------------
def missing_mask_error(metric: str) -> ConfigError:
    """The error for a localisation metric on data that has no ground-truth masks."""
    return ConfigError(
        f"{metric} needs ground-truth object masks (batch['mask'], bool [B,H,W]), but the data has "
        "none. Use a datamodule with masks (data=shapes) or remove the localisation metrics "
        "(pointing_game, mask_iou, relevance_mass) from the metric list."
    )


def check_images(x: Tensor, metric: str) -> None:
    """``x`` must be a float [B,C,H,W] batch."""
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{metric}: images x must be a float tensor [B,C,H,W]; got {got}.")


def check_attribution(attr: Tensor, metric: str, x: Tensor | None = None, allow_channels: bool = False) -> None:
    """``attr`` must be a finite float map [B,H,W] (matching ``x`` when given; [B,C,H,W] if allowed)."""
    if not isinstance(attr, Tensor) or not attr.is_floating_point():
        got = attr.dtype if isinstance(attr, Tensor) else type(attr).__name__
        raise ValueError(f"{metric}: attributions must be a float tensor; got {got}.")
    if x is not None:
        b, c, h, w = x.shape
        ok = [(b, h, w), (b, c, h, w)] if allow_channels else [(b, h, w)]
        bad_shape = tuple(attr.shape) not in ok
    else:
        ok, bad_shape = [], attr.ndim != 3
    if bad_shape:
        want = " or ".join(str(list(s)) for s in ok) or "[B,H,W]"
        raise ValueError(
            f"{metric}: attribution shape {list(attr.shape)} does not match the images: expected {want}. "
            "Explainers return [B,H,W] at input resolution; reduce a per-channel map with "
            "attr.sum(1) and upsample a layer-resolution map to the image size first."
        )
    bad = ~torch.isfinite(attr)
    if bool(bad.any()):
        rows = bad.flatten(1).any(1).nonzero().flatten().tolist()
        raise ValueError(
            f"{metric}: attributions hold {int(bad.sum())} NaN/Inf values (samples {rows[:10]}"
            f"{' ...' if len(rows) > 10 else ''}). The explainer produced them (e.g. a division by "
            "zero while normalising a constant map); fix the explainer or drop those samples."
        )


def check_target(target: Tensor, batch: int, metric: str) -> None:
    """``target`` must be integer class indices [B] (their range is checked at the first forward)."""
    if not isinstance(target, Tensor) or tuple(target.shape) != (batch,) or target.is_floating_point():
        got = f"{target.dtype} {list(target.shape)}" if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(f"{metric}: target must be a long tensor [B]={[batch]} of class indices; got {got}.")


def check_explainer(explainer: Any, metric: str) -> None:
    """The metrics that re-explain need the xaudit Explainer that produced ``attr``."""
    if not isinstance(explainer, Explainer):
        raise ValueError(f"{metric}.update needs the explainer that produced attr (an xaudit Explainer, "
                         f"e.g. create('saliency', model)); got {type(explainer).__name__}.")


def check_mask(mask: Tensor | None, attr: Tensor, metric: str) -> Tensor:
    """``mask`` must be a bool (or 0/1) [B,H,W] matching ``attr``; returns it as bool."""
    if mask is None:
        raise missing_mask_error(metric)
    if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(attr.shape):
        got = list(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{metric}: mask shape {got} does not match the attribution shape "
                         f"{list(attr.shape)}; both must be [B,H,W] at image resolution.")
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(f"{metric}: mask must be bool (or 0/1 integers); got {mask.dtype}.")
        mask = mask.bool()
    return mask


def check_positive_int(value: Any, key: str, minimum: int = 1) -> int:
    """Alias of :func:`xaudit.utils.validation.positive_int` (kept for existing callers)."""
    return positive_int(value, key, minimum)


def check_choice(value: str, choices: tuple[str, ...], kind: str, key: str) -> str:
    """Alias of :func:`xaudit.utils.validation.choice` (note its order: ``value, choices, key, kind``)."""
    return choice(value, choices, key, kind)


# -- substrates -----------------------------------------------------------------------------
def make_substrate(x: Tensor, name: FillLike, blur_sigma: float | None = None) -> Tensor:
    """The image that perturbed pixels are taken from (same shape as ``x``).

    ``zero`` — 0 in normalised units, i.e. the dataset-mean colour (RISE's deletion substrate,
    ``torch.zeros_like`` on the normalised image); ``blur`` — RISE's insertion substrate, the
    reference code's Gaussian (11×11, σ = 5 at 224 px, both scaled by side/224, zero-padded;
    ``blur_sigma`` overrides σ, see :func:`xaudit.ops.fills.rise_blur`); ``mean`` — each
    image's own per-channel mean; ``gaussian`` — a replicate-padded Gaussian with σ = ``blur_sigma``
    (default max(H,W)/8, xaudit's substrate before protocol 2). Built by :mod:`xaudit.ops.fills`'
    ``make_fill``, the one place that makes reference images.
    """
    if name == "blur":
        return make_fill(x, "rise_blur", blur_sigma, option="substrate")
    if name == "gaussian":
        return make_fill(x, "blur", blur_sigma, option="substrate")
    return make_fill(x, name, blur_sigma, option="substrate")


# -- running the model ----------------------------------------------------------------------
@contextmanager
def evaluating(model: nn.Module, grad: bool = False) -> Iterator[None]:
    """Forward passes in eval mode (without autograd unless ``grad``), every module's mode restored.

    Eval mode because a metric measures the trained classifier (BatchNorm running statistics, no
    dropout); running perturbed images through BatchNorm in train mode would also overwrite its
    running statistics. The caller's flags are put back exactly, module by module.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            yield
    finally:
        for m, flag in flags:
            m.training = flag


def model_device_dtype(model: nn.Module, x: Tensor) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype the model computes in, read from its parameters (then buffers).

    Read at every use, not cached: Lightning moves a module to its device and converts it for
    ``*-true`` precision in ``strategy.setup``, after callbacks' ``setup`` ran, and a module's
    ``device``/``dtype`` attributes can report the target before the weights are there. A
    parameter-free model computes on ``x``'s device in ``x``'s dtype.
    """
    first = next(chain(model.parameters(), model.buffers()), None)
    return (first.device if first is not None else x.device), compute_dtype(model, x)


def score_dtype(dtype: torch.dtype) -> torch.dtype:
    """What probabilities, sums and integrals accumulate in: at least float32 (float64 stays float64),
    so a bfloat16/float16 model's scores are not summed in 8 or 11 bits."""
    return torch.promote_types(dtype, torch.float32)


def model_logits(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` with ``x`` moved to the model's device and cast to its dtype (see :func:`model_device_dtype`)."""
    device, dtype = model_device_dtype(model, x)
    return model(x.to(device=device, dtype=dtype))


def forward_probs(model: nn.Module, x: Tensor) -> Tensor:
    """Softmax probabilities [B,K] of ``model`` on ``x``, computed in :func:`score_dtype` of the logits."""
    logits = model_logits(model, x)
    return logits.to(score_dtype(logits.dtype)).softmax(dim=-1)


def target_scores(logits: Tensor, target: Tensor, output: str = "prob") -> Tensor:
    """The explained class's softmax probability (``prob``) or raw ``logit`` [B], in at least float32
    (float64 for a float64 model), on ``target``'s device."""
    logits = logits.to(score_dtype(logits.dtype))
    if output == "prob":
        logits = logits.softmax(dim=-1)
    return logits.gather(1, target.to(logits.device).view(-1, 1)).squeeze(1).to(target.device)


def blockwise_scores(model: nn.Module, n: int, per_sample: int, build: Callable[[int, int, int, int], Tensor],
                     target: Tensor, chunk: int, output: str = "prob") -> Tensor:
    """Scores [n, per_sample] of ``per_sample`` generated variants of each of ``n`` images.

    ``build(s0, s1, t0, t1)`` returns the variants t0..t1 of images s0..s1 as [(s1-s0)·(t1-t0),C,H,W]
    (sample-major). A forward holds at most ``chunk`` images — whole samples when they fit, else
    slices of one sample's variants — so a batch × variants × C × H × W tensor never exists.
    Blocks of whole samples are built by broadcasting, with no per-image gathers. Each block is
    cast to the model's device and dtype for its forward; the scores are in :func:`score_dtype`
    of the logits (float32 for a float32, bfloat16 or float16 model) on ``target``'s device.
    """
    out: Tensor | None = None
    samples, variants = (max(1, chunk // per_sample), per_sample) if per_sample <= chunk else (1, chunk)
    for s0 in range(0, n, samples):
        s1 = min(s0 + samples, n)
        for t0 in range(0, per_sample, variants):
            t1 = min(t0 + variants, per_sample)
            logits = model_logits(model, build(s0, s1, t0, t1))
            rows = target[s0:s1].repeat_interleave(t1 - t0)
            if out is None:
                check_target_range(rows, logits.shape[-1])
                out = torch.empty(n, per_sample, device=target.device, dtype=score_dtype(logits.dtype))
            out[s0:s1, t0:t1] = target_scores(logits, rows, output).view(s1 - s0, t1 - t0)
    if out is None:  # an empty batch: no forward ran
        out = torch.empty(n, per_sample, device=target.device, dtype=torch.float32)
    return out


def check_target_range(target: Tensor, num_classes: int) -> None:
    """Class indices must address the model's outputs (a clear error instead of a device assert)."""
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"target holds class indices outside [0, {num_classes}) of the model's "
                         f"outputs: min {int(target.min())}, max {int(target.max())}.")

