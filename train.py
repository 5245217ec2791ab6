"""Train an image classifier: `python train.py [group=option ...] [key=value ...]`.

Thin entry point: Hydra composes conf/train.yaml, xaudit.tasks.train does the work.
"""

import hydra
from omegaconf import DictConfig

from xaudit.tasks.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run training; the returned test accuracy lets Hydra sweepers optimise it."""
    return train(cfg).get("test/acc")


if __name__ == "__main__":
    main()
