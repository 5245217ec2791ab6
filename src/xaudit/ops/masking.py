"""Which pixels ROAR and KAR remove: per-image ranking of attributions with a seeded tie-break.

Hooker et al., "A Benchmark for Interpretability Methods in Deep Neural Networks" (NeurIPS 2019):
ROAR removes the top ``fraction`` of pixels by attribution, KAR (keep and retrain) removes the
bottom ``fraction``; both replace them by the per-channel dataset mean and retrain.

Exactly ``round(fraction · H · W)`` pixels are removed in every image, in the order of the one
ranking every metric uses (:mod:`xaudit.ops.ranking`). Ties (flat maps, half precision) are
broken by a random priority that depends only on ``tie_seed`` and the image's position, never
by pixel position: a position tie-break would remove the top-left first, which
is itself a (spurious) signal the retrained model could use.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from xaudit.ops.ranking import order_key as _order_key
from xaudit.ops.ranking import pixel_ranks, splitmix, tie_priority  # noqa: F401  (re-exported)
from xaudit.utils.errors import ConfigError

#: the retraining benchmarks: remove the top pixels (ROAR) or keep only them (KAR; Hooker et al., 2019);
#: one definition, shared with the runner and the report (:data:`xaudit.reporting.constants.RETRAIN_MODES`)
MODES: tuple[str, ...] = ("roar", "kar")


def check_fractions(fractions: object) -> list[float]:
    """Fractions as floats, each strictly inside (0, 1) (0 is the unmasked baseline, always run)."""
    if isinstance(fractions, (int, float)) and not isinstance(fractions, bool):
        fractions = [fractions]
    try:
        values = [float(f) for f in fractions]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigError(f"roar.fractions={fractions!r} must be a list of numbers in (0, 1), "
                          "e.g. [0.1,0.3,0.5,0.7,0.9].") from None
    bad = [f for f in values if not 0.0 < f < 1.0]
    if bad or not values:
        raise ConfigError(
            f"roar.fractions={values} must each lie strictly between 0 and 1 (got {bad or 'an empty list'}): "
            "a fraction is the share of pixels removed; the unmasked baseline (0) is always included, "
            "and removing everything (1) leaves nothing to learn.")
    return sorted(set(values))


def _positions(n: int, offset: int, positions: Tensor | None, device: torch.device) -> Tensor:
    """Dataset position of each of ``n`` images, long [n] on ``device``: ``positions``, or
    ``offset + arange(n)``."""
    return torch.arange(n, device=device) + int(offset) if positions is None else positions.to(device).long()


def _image_seeds(n: int, tie_seed: int, offset: int, positions: Tensor | None, device: torch.device) -> Tensor:
    """Seed of each image's tie-break, long [n] on ``device``: its dataset position mixed with ``tie_seed``."""
    return _positions(n, offset, positions, device) + int(tie_seed) * 1_000_003


def order_key(attr: Tensor, tie_seed: int = 0, offset: int = 0, positions: Tensor | None = None) -> Tensor:
    """:func:`xaudit.ops.ranking.order_key` with ROAR's image seeds (dataset position + ``tie_seed``)."""
    n = attr.shape[0]
    return _order_key(attr, _image_seeds(n, tie_seed, offset, positions, attr.device))


def removal_order(attr: Tensor, tie_seed: int = 0, offset: int = 0, positions: Tensor | None = None) -> Tensor:
    """Pixel rank per image, 0 = most important: long [N, H·W] — the metrics' ranking
    (:func:`xaudit.ops.ranking.pixel_ranks`) seeded by each image's dataset position.

    ``positions`` (long [N]) are the images' dataset positions, which seed their tie-breaks; by
    default ``offset + arange(N)``, so ranks depend neither on chunking nor on batch order. The
    ranks are computed on ``attr``'s device.
    """
    return pixel_ranks(attr, _image_seeds(attr.shape[0], tie_seed, offset, positions, attr.device))


def _keep_rows(attr: Tensor, k: int, mode: str, tie_seed: int, positions: Tensor) -> Tensor:
    """Bool [n, H·W] keep rows, equal to thresholding :func:`removal_order`'s ranks at ``k``.

    Selection, not sorting: one order statistic per image (:func:`_cut`) finds the cut value ``t``;
    pixels beyond it go, and where only some of the pixels equal to ``t`` go (a tie the seeded
    priority breaks; common with float16 maps) those are hashed and ordered, all such rows at once
    in one small sort.
    Rows holding NaN take the full ranking. ``positions``: long [n], on ``attr``'s device.
    """
    n = attr.shape[0]
    flat = attr.detach().reshape(n, -1).float() + 0.0  # + 0.0: -0.0 ties with 0.0, as in order_key
    p = flat.shape[1]
    if k == 0:
        return torch.ones(n, p, dtype=torch.bool, device=flat.device)
    roar = mode == "roar"
    removed, eq, ties, need = _cut(flat, p - k if roar else k - 1, k, roar)
    removed |= eq & (need >= ties)[:, None]  # rows whose ties all go: no tie-break needed
    part = ((need > 0) & (need < ties)).nonzero().flatten()  # rows where only some of the ties go
    if part.numel():
        rows, cols = eq[part].nonzero(as_tuple=True)
        seeds = _image_seeds(n, tie_seed, 0, positions, flat.device)[part]
        prio = splitmix(seeds[rows], cols) & 0xFFFFFFFF
        order = (rows * (1 << 32) + prio).argsort(stable=True)  # by row, then priority, then pixel
        rows, cols = rows[order], cols[order]
        count = torch.bincount(rows, minlength=part.numel())
        start = torch.cumsum(count, 0) - count
        j = torch.arange(rows.numel(), device=flat.device) - start[rows]  # place among the row's ties
        want = need[part]
        go = j < want[rows] if roar else j >= count[rows] - want[rows]
        removed[part[rows[go]], cols[go]] = True
    bad = flat.isnan().any(dim=1).nonzero().flatten()
    keep = ~removed
    if bad.numel():
        rank = removal_order(attr[bad], tie_seed, positions=positions[bad])
        keep[bad] = rank >= k if roar else rank < p - k
    return keep


def _cut(flat: Tensor, kk: int, k: int, roar: bool, numpy: bool | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per row of ``flat`` [n, p]: the pixels strictly beyond the cut value ``t`` (the ``kk``-th
    smallest, 0-based) that go for sure, the pixels equal to ``t``, how many equal ``t`` (long [n]),
    and how many of those must go to remove exactly ``k`` (long [n], 1 ≤ need ≤ ties).

    On the CPU in NumPy (introselect, and fused boolean passes), several times faster there than
    ``torch.kthvalue`` and torch's small boolean ops; elsewhere in torch on the device. Both give the
    same order statistic, hence the same masks (``numpy`` forces one path; tested equal).
    """
    if flat.device.type == "cpu" if numpy is None else numpy:
        arr = flat.numpy()
        t = np.partition(arr, kk, axis=1)[:, kk:kk + 1]
        beyond = np.greater(arr, t) if roar else np.less(arr, t)
        eq = np.equal(arr, t)
        ties, past = np.count_nonzero(eq, axis=1), np.count_nonzero(beyond, axis=1)
        return (torch.from_numpy(beyond), torch.from_numpy(eq), torch.from_numpy(ties.astype(np.int64)),
                torch.from_numpy((k - past).astype(np.int64)))
    t = flat.kthvalue(kk + 1, dim=1, keepdim=True).values
    beyond = flat > t if roar else flat < t
    eq = flat == t
    return beyond, eq, eq.sum(dim=1), k - beyond.sum(dim=1)


def keep_mask(attr: Tensor, fraction: float, mode: str, tie_seed: int = 0, offset: int = 0,
              chunk: int = 2048, positions: Tensor | None = None) -> Tensor:
    """Bool [N,H,W] on ``attr``'s device: True where a pixel is kept after removing ``fraction`` of
    them (``mode`` roar|kar). ``positions``/``offset``: see :func:`removal_order`."""
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r} is unknown; choose one of {list(MODES)}.")
    n, h, w = attr.shape
    k = round(float(fraction) * h * w)
    where = _positions(n, offset, positions, attr.device)
    out = torch.empty(n, h * w, dtype=torch.bool, device=attr.device)
    for s in range(0, n, chunk):
        out[s:s + chunk] = _keep_rows(attr[s:s + chunk], k, mode, tie_seed, where[s:s + chunk])
    return out.view(n, h, w)
