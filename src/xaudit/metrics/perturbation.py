"""Faithfulness by perturbation: deletion/insertion curves (RISE) and faithfulness correlation.

Both replace pixels of the image by a *substrate* (see :func:`make_substrate`) and watch the
softmax probability of the explained class. Every perturbed image of a batch is built on the
device by broadcasting and run through the model in chunks of ``internal_batch_size`` images —
no numpy, no forward per sample or per step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from xaudit.metrics.base import (
    OUTPUTS,
    SUBSTRATES,
    ModelHolder,
    XAuditMetric,
    blockwise_scores,
    check_attribution,
    check_images,
    check_target,
    check_target_range,
    evaluating,
    make_substrate,
    model_logits,
    score_dtype,
    target_scores,
)
from xaudit.metrics.registry import register_metric
from xaudit.ops.fills import rise_kernel_size, rise_sigma
from xaudit.ops.ranking import content_seeds, pixel_ranks
from xaudit.ops.seeds import image_seeds
from xaudit.utils.validation import choice, positive_int

MODES: tuple[str, ...] = ("deletion", "insertion")


def step_counts(num_pixels: int, steps: int) -> Tensor:
    """Pixels perturbed after each of ``steps`` equal chunks: [steps+1], from 0 to ``num_pixels``."""
    return torch.arange(steps + 1) * num_pixels // steps


def rise_steps(height: int, width: int) -> int:
    """RISE's number of steps: one image side of pixels per step (224 px per step, 224 steps, at 224²),
    i.e. min(H, W) steps of max(H, W) pixels."""
    return min(height, width)


#: the substrate each mode starts from / fills in, as RISE's reference code (``CausalMetric``)
PAPER_SUBSTRATE: dict[str, str] = {"deletion": "zero", "insertion": "blur"}


@register_metric("deletion_insertion")
class DeletionInsertion(ModelHolder, XAuditMetric):
    """Deletion / insertion AUC of Petsiuk et al., "RISE", BMVC 2018.

    Pixels are ordered by attribution (highest first; ties broken by the seeded random priority of
    :mod:`xaudit.ops.ranking`, seed ``tie_seed``) and, in ``steps`` equal chunks, *deleted*
    (replaced by the substrate, starting from the image) or *inserted* (copied from the image into
    the substrate). The curve is the explained class's softmax probability after 0, 1, ...,
    ``steps`` chunks ([N, steps+1], see :meth:`curves`); the score is its area over the perturbed
    fraction [0,1] by the trapezoid rule. A faithful map gives a low deletion AUC
    (``higher_is_better=False``) and a high insertion AUC (``True``).

    Defaults are RISE's protocol (reference code ``evaluation.py``), scaled to the image:
    ``steps=None`` → min(H, W) steps of max(H, W) pixels (224 × 224 px at 224²); ``substrate=None``
    → zeros in normalised units for deletion, RISE's blur for insertion (11×11 kernel, σ = 5 at
    224 px, both × side/224; ``blur_sigma`` overrides σ). The explained class is the caller's
    ``target``: RISE explains the model's top-1 class (the audit's ``target=auto`` does so).

    ``update(x, attr, target)``: images [B,C,H,W], attributions [B,H,W], classes [B].
    Each image costs ``steps+1`` forwards, run ``internal_batch_size`` at a time.
    """

    family = "faithfulness"
    measures = ("how fast the target score falls (deletion) or rises (insertion) as the most relevant pixels are "
                "removed or added")

    paper: ClassVar[str] = "Petsiuk, Das & Saenko, RISE, BMVC 2018 (reference code evaluation.py)"
    protocol_target: ClassVar[str] = "predicted"
    protocol_notes: ClassVar[tuple[str, ...]] = (
        "ties between equal attributions: seeded random order (RISE's code: reversed np.argsort order)",)

    def __init__(
        self,
        model: nn.Module,
        mode: str = "deletion",
        steps: int | None = None,
        substrate: str | None = None,
        internal_batch_size: int = 256,
        blur_sigma: float | None = None,
        tie_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._hold(model)
        self.mode = choice(mode, MODES, "mode")
        self.steps = None if steps is None else positive_int(steps, "steps")
        substrate = PAPER_SUBSTRATE[self.mode] if substrate is None else substrate
        self.substrate = choice(substrate, SUBSTRATES, "substrate")
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")
        self.blur_sigma = blur_sigma
        self.tie_seed = int(tie_seed)
        self.add_state("curve_values", default=[], dist_reduce_fx="cat")

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        """Insertion: higher is better; deletion: lower is better (read it from the instance)."""
        return self.mode == "insertion"

    def steps_for(self, height: int, width: int) -> int:
        """The steps used on H×W images: ``steps``, or RISE's min(H, W)."""
        return rise_steps(height, width) if self.steps is None else self.steps

    def protocol_params(self, size: tuple[int, int]) -> dict[str, Any]:
        """The parameters as run on images of ``size`` (defaults resolved)."""
        h, w = size
        out: dict[str, Any] = {"mode": self.mode, "steps": self.steps_for(h, w), "substrate": self.substrate,
                               "output": "prob", "tie_seed": self.tie_seed}
        if self.substrate == "blur":
            sigma = rise_sigma(h, w) if self.blur_sigma is None else float(self.blur_sigma)
            out.update(blur_sigma=round(sigma, 4), blur_kernel=rise_kernel_size(sigma))
        elif self.substrate == "gaussian":
            out["blur_sigma"] = round(max(h, w) / 8.0 if self.blur_sigma is None else float(self.blur_sigma), 4)
        return out

    def paper_params(self, size: tuple[int, int]) -> dict[str, Any]:
        """RISE's values scaled to ``size``: max(H,W) px per step, zeros / the 11×11 σ=5 blur at 224 px."""
        h, w = size
        out: dict[str, Any] = {"steps": rise_steps(h, w), "substrate": PAPER_SUBSTRATE[self.mode], "output": "prob"}
        if self.mode == "insertion":
            out.update(blur_sigma=round(rise_sigma(h, w), 4), blur_kernel=rise_kernel_size(rise_sigma(h, w)))
        return out

    def update(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        """Add the AUCs (and curves) of one batch."""
        name = type(self).__name__
        check_images(x, name)
        check_attribution(attr, name, x=x)
        check_target(target, x.shape[0], name)
        h, w = x.shape[-2:]
        steps = self.steps_for(h, w)
        if steps > h * w:
            raise ValueError(f"{name}: steps={steps} exceeds the {h}x{w}={h * w} pixels of the images; "
                             f"use steps ≤{h * w}.")
        curves = self._curves(x, attr.to(x.device), target.to(x.device), steps)
        # the area in the curves' dtype (≥ float32): a float64 model's AUC is integrated in float64
        fractions = self.fractions(h * w, device=curves.device, steps=steps).to(curves.dtype)
        self.curve_values.append(curves)
        self._add_values(torch.trapezoid(curves, fractions, dim=1))

    def _curves(self, x: Tensor, attr: Tensor, target: Tensor, steps: int) -> Tensor:
        b, _, h, w = x.shape
        with evaluating(self.model):
            substrate = make_substrate(x, self.substrate, self.blur_sigma)
            start, finish = (x, substrate) if self.mode == "deletion" else (substrate, x)
            rank = pixel_ranks(attr, content_seeds(x, self.tie_seed))
            counts = step_counts(h * w, steps).to(x.device)

            def build(s0: int, s1: int, t0: int, t1: int) -> Tensor:
                # pixel p of image s is taken from `finish` from the step where its rank < count
                taken = (rank[s0:s1, None, :] < counts[None, t0:t1, None]).view(s1 - s0, t1 - t0, 1, h, w)
                return torch.where(taken, finish[s0:s1, None], start[s0:s1, None]).flatten(0, 1)

            return blockwise_scores(self.model, b, steps + 1, build, target, self.internal_batch_size)

    def fractions(self, num_pixels: int, device: torch.device | None = None, steps: int | None = None) -> Tensor:
        """The perturbed fraction of the image at each curve point: [steps+1] from 0 to 1 (``steps``:
        the steps used, default ``self.steps``)."""
        steps = self.steps if steps is None else steps
        if steps is None:
            raise ValueError("fractions: steps=None (RISE's min(H, W)) needs the image size; pass steps=.")
        return (step_counts(num_pixels, steps).double() / num_pixels).to(device=device, dtype=torch.float32)

    def curves(self) -> Tensor:
        """Per-sample probability curves [N, steps+1] (for plots), in the order of ``per_sample``."""
        return self._gathered("curve_values")


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Pearson correlation of [B,R] tensors (NaN where a row is constant)."""
    dtype = torch.float32 if a.device.type == "mps" else torch.float64
    a = a.to(dtype) - a.to(dtype).mean(-1, keepdim=True)
    b = b.to(dtype) - b.to(dtype).mean(-1, keepdim=True)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    num = (a * b).sum(-1)
    return torch.where(den > 0, num / den, torch.full_like(num, float("nan")))


def faithfulness_correlation(
    model: nn.Module,
    x: Tensor,
    attr: Tensor,
    target: Tensor,
    subsets: Tensor,
    substrate: str = "zero",
    internal_batch_size: int = 256,
    output: str = "prob",
    blur_sigma: float | None = None,
) -> Tensor:
    """Faithfulness correlation of Bhatt et al., IJCAI 2020, for given pixel subsets.

    ``subsets`` [B,R,K] holds R random sets of K flat pixel indices per image. For each set the
    pixels are replaced by the substrate; the score is the Pearson correlation, over the R sets,
    between the attribution summed over the set and the drop in the explained class's softmax
    probability (``output="prob"``) or logit (``"logit"``). Returns [B].
    """
    b, _, h, w = x.shape
    runs = subsets.shape[1]
    subsets = subsets.to(x.device)
    flat = attr.reshape(b, -1)
    flat = flat.to(score_dtype(flat.dtype))  # a bfloat16 map summed over K pixels in 8 bits would lose the ranking
    attr_sums = flat.gather(1, subsets.reshape(b, -1)).view(b, runs, -1).sum(-1)
    with evaluating(model):
        base = make_substrate(x, substrate, blur_sigma)
        logits = model_logits(model, x)
        check_target_range(target, logits.shape[-1])
        p_orig = target_scores(logits, target, output)
        masks = torch.zeros(b, runs, h * w, dtype=torch.bool, device=x.device)
        masks.scatter_(2, subsets, True)

        def build(s0: int, s1: int, t0: int, t1: int) -> Tensor:
            taken = masks[s0:s1, t0:t1].view(s1 - s0, t1 - t0, 1, h, w)
            return torch.where(taken, base[s0:s1, None], x[s0:s1, None]).flatten(0, 1)

        p_pert = blockwise_scores(model, b, runs, build, target, internal_batch_size, output)
    return pearson(attr_sums, p_orig[:, None] - p_pert)


@register_metric("faithfulness_correlation")
class FaithfulnessCorrelation(ModelHolder, XAuditMetric):
    """Faithfulness correlation (Bhatt, Weller and Moura, IJCAI 2020); higher is better.

    ``nr_runs`` random subsets of ``subset_size`` pixels per image are set to the substrate; the
    score is the Pearson correlation between the subsets' summed attribution and the resulting
    drop in the explained class's softmax probability (``output="prob"``, as the issue and Bhatt
    et al. state it) or logit (``"logit"``, Quantus' default); see :func:`faithfulness_correlation`.

    ``update(x, attr, target)``. An image's subsets come from a local ``torch.Generator`` seeded
    from ``seed`` and the image's own bits (the explainers' ``image_seeds``): the same image gets
    the same subsets alone, in any batch and on any DDP rank, so ``devices=2`` equals ``devices=1``
    and every epoch of a fixed probe set is scored on the same subsets.
    """

    family = "faithfulness"
    measures = "correlation between the attribution of random pixel subsets and the score drop when they are removed"

    higher_is_better: ClassVar[bool] = True
    paper: ClassVar[str] = "Bhatt, Weller & Moura, IJCAI 2020"
    protocol_notes: ClassVar[tuple[str, ...]] = (
        "the paper fixes no image defaults; Quantus uses subset_size=224 and the logit",)

    def __init__(
        self,
        model: nn.Module,
        nr_runs: int = 100,
        subset_size: int = 64,
        substrate: str = "zero",
        seed: int = 0,
        internal_batch_size: int = 256,
        output: str = "prob",
        blur_sigma: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._hold(model)
        self.output = choice(output, OUTPUTS, "output")
        self.nr_runs = positive_int(nr_runs, "nr_runs", minimum=2)
        self.subset_size = positive_int(subset_size, "subset_size")
        self.substrate = choice(substrate, SUBSTRATES, "substrate")
        self.seed = int(seed)
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")
        self.blur_sigma = blur_sigma

    def subsets(self, x: Tensor) -> Tensor:
        """The pixel subsets [B, nr_runs, subset_size] (flat indices) drawn for the images ``x``."""
        num_pixels = x.shape[-2] * x.shape[-1]
        if self.subset_size > num_pixels:
            raise ValueError(f"{type(self).__name__}: subset_size={self.subset_size} exceeds the "
                             f"{num_pixels} pixels of the images; use subset_size ≤{num_pixels}.")
        g = torch.Generator()
        out = []
        # one draw per image from its own seed: what makes the subsets batch- and rank-independent
        for seed in image_seeds(x, self.seed):
            g.manual_seed(seed)
            out.append(torch.rand(self.nr_runs, num_pixels, generator=g).topk(self.subset_size, dim=1).indices)
        return torch.stack(out)

    def update(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        """Add the correlations of one batch."""
        name = type(self).__name__
        check_images(x, name)
        check_attribution(attr, name, x=x)
        check_target(target, x.shape[0], name)
        self._add_values(faithfulness_correlation(self.model, x, attr.to(x.device), target.to(x.device),
                                                  self.subsets(x), self.substrate, self.internal_batch_size,
                                                  self.output, self.blur_sigma))
