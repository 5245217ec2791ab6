"""Testing with Concept Activation Vectors (TCAV; Kim et al., ICML 2018).

A concept (e.g. "the red background that class 0 carries in the shortcut data") is given by
example images. Its *concept activation vector* (CAV) at a layer is the normal of a linear
classifier that separates the layer's activations of the concept examples from those of random
examples. A class's *TCAV score* is the fraction of that class's images whose target logit
increases along the CAV (positive directional derivative ``∇_A log p_k · v``). Because a CAV
learnt from any two image sets gives some score, each concept is learnt against ``R`` different
random sets and its ``R`` scores are t-tested against ``R`` scores of random-vs-random CAVs; a
concept is significant for a class when the (Bonferroni-corrected) p-value is below ``alpha``.
Each run draws fresh concept and random examples, so a "concept" of random examples is
exchangeable with the baseline and the test is calibrated.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from xaudit.explainers.base import explain_mode
from xaudit.explainers.hooks import record_output, resolve_layer
from xaudit.utils.errors import ConfigError


def _batches(x: Tensor, batch_size: int) -> Iterator[Tensor]:
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size]


def on_model(model: nn.Module, x: Tensor) -> Tensor:
    """``x`` on the device (and in the floating dtype) of ``model``'s parameters."""
    p = next(model.parameters(), None)
    return x if p is None else x.to(device=p.device, dtype=p.dtype if p.dtype.is_floating_point else x.dtype)


def spatial_layers(model: nn.Module, x: Tensor) -> list[str]:
    """Layers whose output for ``x`` (one image suffices) is a [B,K,h,w] feature map."""
    found: dict[str, bool] = {}
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: found.__setitem__(n, isinstance(o, Tensor)
                                                                                and o.ndim == 4))
               for n, m in model.named_modules() if n]
    try:
        with torch.no_grad(), explain_mode(model):
            model(on_model(model, x[:1]))
    finally:
        for h in handles:
            h.remove()
    return [n for n, ok in found.items() if ok]


def layer_activations(model: nn.Module, layer: str | None, x: Tensor, target: Tensor | None = None,
                      batch_size: int = 128) -> tuple[Tensor, Tensor | None]:
    """Flattened activations [N, K·h·w] of ``layer`` for ``x`` and, with ``target`` [N], the
    gradients of each image's target log-probability ``log softmax(logits)_k`` with respect to
    them (same shape). The log-probability, not the raw logit, is what the TCAV reference
    implementation differentiates (the negative of its cross-entropy loss): a direction that raises
    every logit alike does not count as evidence for one class.

    An unknown layer, or one whose output is not a [B,K,h,w] feature map, raises a
    :class:`ConfigError` that lists the layers that are."""
    name = resolve_layer(model, layer, key="concepts.layer", choices=lambda: spatial_layers(model, x))
    module = model.get_submodule(name)
    acts, grads = [], []
    with explain_mode(model):
        for i, xb in enumerate(_batches(x, batch_size)):
            want_grad = target is not None
            with torch.set_grad_enabled(want_grad), record_output(module, track_grad=want_grad) as rec:
                logits = model(on_model(model, xb))
            a = rec.output
            if a is None:
                raise ConfigError(f"concepts.layer {name!r} was not called in the model's forward; pick a layer on "
                                  "the path from input to logits.")
            if a.ndim != 4:
                raise ConfigError(
                    f"concepts.layer {name!r} outputs shape {tuple(a.shape)}, not a spatial [B,K,h,w] feature map; "
                    f"TCAV learns concepts in a convolutional layer. Layers with spatial output: "
                    f"{', '.join(spatial_layers(model, x))}.")
            acts.append(a.detach().flatten(1).float().cpu())
            if target is not None:
                tb = target[i * batch_size:i * batch_size + xb.shape[0]].to(logits.device)
                # log p_k (the negative cross-entropy, as the TCAV reference differentiates), in float64
                # so that a confident prediction keeps a non-zero gradient
                logp = torch.log_softmax(logits.double(), 1).gather(1, tb[:, None])
                (g,) = torch.autograd.grad(logp.sum(), a)
                grads.append(g.detach().flatten(1).float().cpu())
    return torch.cat(acts), (torch.cat(grads) if target is not None else None)


def learn_cav(concept: Tensor, negative: Tensor, seed: int = 0, c: float = 0.01) -> tuple[Tensor, float]:
    """Unit CAV [D] separating ``concept`` [n,D] from ``negative`` [m,D] activations, and the
    linear classifier's accuracy on a held-out third of the examples.

    L2-regularised logistic regression (scikit-learn, ``C=c``) on standardised activations, as in
    the TCAV reference implementation's linear model; the CAV is mapped back to the raw activation
    space (``w / std``) so that directional derivatives use the layer's own coordinates."""
    from sklearn.linear_model import LogisticRegression

    x = torch.cat([concept, negative]).double().numpy()
    y = np.r_[np.ones(len(concept)), np.zeros(len(negative))]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    n_test = max(1, len(y) // 3)
    test, train = order[:n_test], order[n_test:]
    mean, std = x[train].mean(0), x[train].std(0) + 1e-8
    z = (x - mean) / std
    # liblinear in the dual: fast when examples (~100) are far fewer than activation dims (~10⁴)
    clf = LogisticRegression(C=c, solver="liblinear", dual=True, max_iter=1000, random_state=seed)
    clf.fit(z[train], y[train])
    acc = float((clf.predict(z[test]) == y[test]).mean())
    w = clf.coef_[0] / std
    norm = float(np.linalg.norm(w))
    if not math.isfinite(norm) or norm == 0:
        return torch.zeros(x.shape[1]), acc
    return torch.from_numpy(w / norm).float(), acc


def tcav_score(grads: Tensor, cav: Tensor) -> float:
    """Fraction of images whose target log-probability increases along ``cav`` (∇·v > 0)."""
    return float((grads @ cav.to(grads) > 0).float().mean())


@dataclass
class ConceptResult:
    """TCAV of one concept for one class: R concept scores vs R random scores and the t-test."""

    concept: str
    class_index: int
    scores: list[float]
    random_scores: list[float]
    cav_accuracy: float
    p_value: float
    significant: bool

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))

    @property
    def random_mean(self) -> float:
        return float(np.mean(self.random_scores))

    def record(self) -> dict[str, Any]:
        """A JSON-able summary (one results cell)."""
        return {"concept": self.concept, "class_index": self.class_index, "tcav": round(self.mean, 6),
                "tcav_std": round(float(np.std(self.scores)), 6), "random_tcav": round(self.random_mean, 6),
                "random_std": round(float(np.std(self.random_scores)), 6), "p_value": self.p_value,
                "significant": self.significant, "cav_accuracy": round(self.cav_accuracy, 6),
                "scores": [round(s, 6) for s in self.scores],
                "random_scores": [round(s, 6) for s in self.random_scores]}


ALTERNATIVES = ("greater", "two-sided")


def check_alternative(alternative: str) -> str:
    """``alternative`` if it names a test this module runs, else a ConfigError listing them."""
    if alternative not in ALTERNATIVES:
        raise ConfigError(f"concepts.alternative={alternative!r} must be one of {', '.join(ALTERNATIVES)}.")
    return alternative


def t_test(scores: Sequence[float], random_scores: Sequence[float], alternative: str = "greater") -> float:
    """Welch t-test p-value of concept scores against random ones.

    ``greater`` (default) asks whether the concept raises the class logit more often than random
    directions do — TCAV's question, "does this concept make the model say class k?"; ``two-sided``
    also flags concepts that lower it. Constant, equal samples give 1."""
    from scipy.stats import ttest_ind

    check_alternative(alternative)
    a, b = np.asarray(scores, float), np.asarray(random_scores, float)
    if a.std() == 0 and b.std() == 0:
        if a.mean() == b.mean():
            return 1.0
        return 0.0 if (alternative == "two-sided" or a.mean() > b.mean()) else 1.0
    with warnings.catch_warnings():
        # a concept whose every CAV scores the same (e.g. 1.0) is a valid zero-variance sample; scipy
        # still warns of "precision loss" on it
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        return float(ttest_ind(a, b, equal_var=False, alternative=alternative).pvalue)


def random_baseline(pairs: Sequence[tuple[Tensor, Tensor]], seed: int = 0) -> list[Tensor]:
    """Random-vs-random CAVs, one per pair of independent random sets."""
    if len(pairs) < 2:
        raise ConfigError(f"concepts.num_random={len(pairs)} must be ≥2: the t-test compares at least two "
                          "concept CAVs with two random ones.")
    return [learn_cav(a, b, seed=seed + 100 + r)[0] for r, (a, b) in enumerate(pairs)]


def concept_tcav(name: str, runs: Sequence[tuple[Tensor, Tensor]], baseline: Sequence[Tensor],
                 class_grads: dict[int, Tensor], n_tests: int, alpha: float = 0.05,
                 seed: int = 0, alternative: str = "greater") -> list[ConceptResult]:
    """One concept's TCAV for every class: one CAV per run (concept examples vs random examples,
    independent draws per run), its scores t-tested against the random-vs-random ``baseline``
    scores, Bonferroni over ``n_tests``."""
    learnt = [learn_cav(pos, neg, seed=seed + r) for r, (pos, neg) in enumerate(runs)]
    accuracy = float(np.mean([a for _, a in learnt]))
    out = []
    for k, grads in class_grads.items():
        scores = [tcav_score(grads, v) for v, _ in learnt]
        rnd = [tcav_score(grads, v) for v in baseline]
        p = min(1.0, t_test(scores, rnd, alternative) * n_tests)
        out.append(ConceptResult(name, int(k), scores, rnd, accuracy, p, bool(p < alpha)))
    return out
