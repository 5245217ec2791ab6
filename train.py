"""Train an image classifier: `python train.py [group=option ...] [key=value ...]`.

Thin entry point: Hydra composes conf/train.yaml, xaudit.tasks.train does the work.
"""

import sys

import hydra
from omegaconf import DictConfig

from xaudit.tasks.train import train
from xaudit.utils.launcher import pin_slurm_shape


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run training; the returned test accuracy lets Hydra sweepers optimise it."""
    return train(cfg).get("test/acc")


if __name__ == "__main__":
    sys.argv = pin_slurm_shape(sys.argv, "train")  # --cfg hydra shows the Slurm shape as numbers
    main()
