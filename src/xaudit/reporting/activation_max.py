"""Activation maximisation of a trained checkpoint, rendered to a PNG (the method itself is
:func:`xaudit.explainers.activation_max.maximize_activation`).

``python -m xaudit.reporting.activation_max --ckpt path/to/best.ckpt --out docs/activation_max.png``
writes one column per class: the activation-maximising image on top and, unless ``--no-natural``,
the test-split image with the highest logit of that class underneath.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from xaudit.explainers.activation_max import PARAMETERIZATIONS, maximize_activation
from xaudit.models.classifier import load_classifier
from xaudit.utils.config import instantiate


def _natural_best(model: nn.Module, ckpt_info: dict, n_classes: int) -> tuple[Tensor, Tensor] | None:
    """Max logit of each class over the checkpoint's test split, and the image that reaches it."""
    cfg = ckpt_info.get("config", {}).get("data")
    if not cfg:
        return None
    dm = instantiate(cfg)
    dm.setup("test")
    best = torch.full((n_classes,), -math.inf)
    images: list[Tensor | None] = [None] * n_classes
    with torch.no_grad():
        for batch in dm.test_dataloader():
            logits = model(batch["image"])
            val, arg = logits.max(0)
            for k in range(n_classes):
                if val[k] > best[k]:
                    best[k] = val[k]
                    images[k] = dm.denormalize(batch["image"][arg[k]:arg[k] + 1])[0]
    return best, torch.stack(images)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> None:
    """Write a PNG: the activation-maximising image of every class of a checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(prog="python -m xaudit.reporting.activation_max", description=main.__doc__)
    ap.add_argument("--ckpt", required=True, help="checkpoint written by `python train.py`")
    ap.add_argument("--out", default="activation_max.png", help="PNG to write")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parameterization", default="fourier", choices=PARAMETERIZATIONS)
    ap.add_argument("--no-natural", action="store_true", help="skip the comparison with the test split")
    args = ap.parse_args(argv)

    model = load_classifier(args.ckpt)
    info = model.xaudit_info
    data = info.get("data", {})
    n = model.hparams["num_classes"]
    names = data.get("class_names") or [str(k) for k in range(n)]
    vis = maximize_activation(model, target=list(range(n)), steps=args.steps, lr=args.lr, seed=args.seed,
                    parameterization=args.parameterization)
    natural = None if args.no_natural else _natural_best(model, info, n)
    rows = 1 if natural is None else 2
    fig, axes = plt.subplots(rows, n, figsize=(2.2 * n, 2.9 * rows), squeeze=False)
    for k in range(n):
        ax = axes[0, k]
        ax.imshow(vis.display[k].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
        ax.set_title(f"{names[k]}\nlogit {float(vis.activation[k]):.1f}", fontsize=9)
        if natural is not None:
            axes[1, k].imshow(natural[1][k].permute(1, 2, 0).numpy(), interpolation="nearest")
            axes[1, k].set_title(f"best test image\nlogit {float(natural[0][k]):.1f}", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    plt.close(fig)
    for k in range(n):
        line = f"{names[k]}: activation-max logit {float(vis.activation[k]):.2f}"
        if natural is not None:
            line += f", max natural (test split) logit {float(natural[0][k]):.2f}"
        print(line)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
