"""Influence-directed explanations (Leino et al., 2018, "Influence-Directed Explanations for Deep
Convolutional Networks").

The *distributional influence* of an internal unit j of a layer (here a channel of a feature map,
its spatial positions summed) on a quantity of interest q over a distribution of interest P is

    χ_j = E_{x∼P} [ Σ_{h,w} ∂q/∂z_{j,h,w}(x) ],

with q a class logit (``target``) or a comparison of two classes, logit_A − logit_B
(``versus=B``). The most influential units ("experts") are explained back in input space by the
gradient of their activation × input (:meth:`InfluenceDirected.unit_attributions`).

:class:`InfluenceDirected` is the model-level API (P = a batch, or a dataloader / iterable of batch
dicts, optionally only one class); ``internal_influence`` is the per-example explainer (P = the
example itself): Σ_{j ∈ top-k} χ_j(x) · ∂(Σ_{h,w} z_j)/∂x ⊙ x.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from xaudit.explainers.base import (
    Explainer,
    ExplainerInputError,
    Target,
    check_input,
    explain_mode,
)
from xaudit.explainers.fit_data import iter_images
from xaudit.explainers.hooks import record_output, resolve_layer
from xaudit.explainers.registry import register
from xaudit.utils.errors import ConfigError
from xaudit.utils.validation import positive_int

DataLike = Tensor | Mapping[str, Tensor] | Iterable[Mapping[str, Tensor] | Tensor]


def quantity_of_interest(logits: Tensor, target: Tensor, versus: int | None) -> Tensor:
    """q per row: logit of ``target`` [B], minus the logit of class ``versus`` when given."""
    q = logits.gather(1, target[:, None]).squeeze(1)
    if versus is None:
        return q
    if not 0 <= versus < logits.shape[1]:
        raise ExplainerInputError(
            f"versus={versus} is not a class of this model (valid: 0..{logits.shape[1] - 1}).")
    same = (target == versus).nonzero().flatten().tolist()
    if same:
        raise ExplainerInputError(
            f"target equals versus={versus} for sample(s) {same[:10]}: logit_A − logit_B is then "
            "identically 0. Compare two different classes, or pass versus=None.")
    return q - logits[:, versus]


def _check_versus(versus: object) -> int | None:
    if versus is None:
        return None
    if isinstance(versus, bool) or not isinstance(versus, numbers.Integral) or int(versus) < 0:
        raise ConfigError(f"versus must be a class index (int ≥0) or None; got {versus!r}.")
    return int(versus)


def _unit_sums(t: Tensor) -> Tensor:
    """[B,K,...] → [B,K]: a unit is a channel, its positions summed."""
    if t.ndim < 2:
        raise ConfigError(f"the layer outputs shape {tuple(t.shape)}; a unit layer needs [B,K] or [B,K,h,w].")
    return t.flatten(2).sum(2) if t.ndim > 2 else t


def check_units(units: object, n_units: int, layer: str) -> Tensor:
    """``units`` (an int or a sequence of ints) as a long tensor, each in 0..n_units−1."""
    vals = [units] if isinstance(units, numbers.Integral) else units
    if isinstance(vals, Tensor):
        vals = vals.flatten().tolist()
    if not isinstance(vals, Iterable) or isinstance(vals, str | bytes):
        raise ConfigError(f"units must be an int or a list of ints; got {units!r}.")
    vals = list(vals)
    if not vals or not all(isinstance(u, numbers.Integral) and not isinstance(u, bool) for u in vals):
        raise ConfigError(f"units must be a non-empty list of ints; got {units!r}.")
    bad = [int(u) for u in vals if not 0 <= int(u) < n_units]
    if bad:
        raise ConfigError(f"unit index {bad[0]} is out of range: layer {layer!r} has {n_units} units (channels), "
                          f"valid indices 0..{n_units - 1}.")
    return torch.tensor([int(u) for u in vals], dtype=torch.long)


@dataclass(frozen=True)
class InfluenceResult:
    """Distributional influence of every unit of ``layer`` (``influence`` [K], float64) over ``n``
    examples, and the ``top_k`` most influential ``units`` (descending influence)."""

    layer: str
    influence: Tensor
    units: Tensor
    n: int

    @property
    def scores(self) -> Tensor:
        """Influence of the top units, aligned with :attr:`units`."""
        return self.influence[self.units]


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class InfluenceDirected:
    """Distributional influence of the units of ``layer`` (Leino et al., 2018).

    ``layer`` is a dotted module name (default: the backbone's target layer); ``target`` the class
    A of the quantity of interest, ``versus`` an optional class B for logit_A − logit_B. The model
    is left exactly as found (no hooks, no ``param.grad``, same mode and BatchNorm statistics).
    """

    def __init__(self, model: nn.Module, target: int, layer: str | None = None, versus: int | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module; got {type(model).__name__}.")
        self.model = model
        self.layer = resolve_layer(model, layer)
        if isinstance(target, bool) or not isinstance(target, numbers.Integral) or int(target) < 0:
            raise ConfigError(f"target must be a class index (int ≥0); got {target!r}.")
        self.target = int(target)
        self.versus = _check_versus(versus)

    def _layer_grads(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Unit activations and ∂q/∂(unit), both [b,K] (positions summed)."""
        check_input(x, self.model)
        x = x.detach().clone()
        with record_output(self.model.get_submodule(self.layer), track_grad=True) as rec:
            logits = self.model(x)
        if rec.output is None:
            raise ConfigError(f"layer {self.layer!r} was not called in the model's forward; pick a layer on the "
                              "path from input to logits.")
        idx = Target(self.target, x.shape[0], x.device).indices(logits)
        q = quantity_of_interest(logits, idx, self.versus)
        (grads,) = torch.autograd.grad(q.sum(), rec.output)
        return _unit_sums(rec.output.detach()), _unit_sums(grads)

    def influence(self, data: DataLike, of_class: int | None = None, top_k: int = 5) -> InfluenceResult:
        """χ over the distribution of interest ``data`` (a batch [N,C,H,W], a batch dict, or an iterable
        of batch dicts such as a dataloader; ``of_class`` keeps only examples of that label)."""
        top_k = positive_int(top_k, "top_k")
        device = _model_device(self.model)
        total: Tensor | None = None
        n = 0
        with explain_mode(self.model):
            # a tensor or one batch dict is the whole distribution, read as one batch
            batches = [data] if isinstance(data, Tensor | Mapping) else data
            for images in iter_images(batches, of_class=of_class):
                _, grads = self._layer_grads(images.to(device))
                s = grads.double().sum(0)
                total = s if total is None else total + s
                n += images.shape[0]
        if total is None:
            which = f" after keeping class {of_class}" if of_class is not None else ""
            raise ConfigError(
                f"the distribution of interest is empty (0 examples{which}). Pass a non-empty image batch "
                "[N,C,H,W] or a dataloader of batch dicts"
                + (", and check that of_class is a label present in the data." if of_class is not None else "."))
        chi = total / n
        k = min(top_k, chi.shape[0])
        return InfluenceResult(self.layer, chi, chi.topk(k).indices.cpu(), n)

    def unit_attributions(self, x: Tensor, units: object, multiply_by_input: bool = True) -> Tensor:
        """Input attributions of ``units`` of the layer: ∂(Σ_{h,w} z_j)/∂x (⊙ x), channels summed,
        float [B,U,H,W] (U = len(units))."""
        check_input(x, self.model)
        with explain_mode(self.model):
            xg = x.detach().clone().requires_grad_(True)
            with record_output(self.model.get_submodule(self.layer), track_grad=True) as rec:
                self.model(xg)
            if rec.output is None:
                raise ConfigError(f"layer {self.layer!r} was not called in the model's forward.")
            acts = _unit_sums(rec.output)
            idx = check_units(units, acts.shape[1], self.layer)
            maps = []
            for j, u in enumerate(idx.tolist()):
                (g,) = torch.autograd.grad(acts[:, u].sum(), xg, retain_graph=j < len(idx) - 1)
                maps.append((g * xg if multiply_by_input else g).detach().sum(1))
        return torch.stack(maps, 1).to(x.dtype)


def distributional_influence(model: nn.Module, data: DataLike, target: int, layer: str | None = None,
                             versus: int | None = None, of_class: int | None = None,
                             top_k: int = 5) -> InfluenceResult:
    """``InfluenceDirected(model, target, layer, versus).influence(data, of_class, top_k)``."""
    return InfluenceDirected(model, target, layer, versus).influence(data, of_class, top_k)


@register("internal_influence")
class InternalInfluence(Explainer):
    """Per-example influence-directed explanation (Leino et al., 2018): the influence χ_j(x) of each
    unit (channel) of ``target_layer`` on the target logit (minus logit ``versus`` if given), and the
    map Σ_{j ∈ top_k} χ_j(x) · ∂(Σ_{h,w} z_j)/∂x (⊙ x with ``multiply_by_input``); ``top_k=None``
    weights every unit. Default reduction: channel sum.
    """

    default_reduce = "sum"

    def __init__(self, model: nn.Module, target_layer: str | None = None, top_k: int | None = 3,
                 versus: int | None = None, multiply_by_input: bool = True) -> None:
        super().__init__(model)
        self.target_layer = resolve_layer(model, target_layer)
        self.top_k = None if top_k is None else positive_int(top_k, "top_k")
        self.versus = _check_versus(versus)
        self.multiply_by_input = bool(multiply_by_input)

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        x = x.detach().requires_grad_(True)
        with record_output(self.model.get_submodule(self.target_layer), track_grad=True) as rec:
            logits = self._logits(x)
        if rec.output is None:
            raise ConfigError(f"target_layer {self.target_layer!r} was not called in the model's forward.")
        q = quantity_of_interest(logits, target.indices(logits), self.versus)
        (grads,) = torch.autograd.grad(q.sum(), rec.output, retain_graph=True)
        chi = _unit_sums(grads).detach()
        if self.top_k is not None and self.top_k < chi.shape[1]:
            top = chi.topk(self.top_k, dim=1).indices
            chi = torch.zeros_like(chi).scatter(1, top, chi.gather(1, top))
        (g,) = torch.autograd.grad((_unit_sums(rec.output) * chi).sum(), x)
        return g * x if self.multiply_by_input else g
