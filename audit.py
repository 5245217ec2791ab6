"""Audit a trained classifier: `python audit.py [audit=evaluate|roar|kar] [key=value ...]`.

Thin entry point: Hydra composes conf/audit.yaml, xaudit.tasks.audit does the work.
"""

import sys

import hydra
from omegaconf import DictConfig

from xaudit.tasks.audit import audit
from xaudit.utils.launcher import pin_slurm_shape


@hydra.main(version_base="1.3", config_path="conf", config_name="audit")
def main(cfg: DictConfig) -> None:
    """Run the audit; results, report and plots land in the audit directory (printed at the end)."""
    audit(cfg)


if __name__ == "__main__":
    sys.argv = pin_slurm_shape(sys.argv, "audit")  # --cfg hydra shows the Slurm shape as numbers
    main()
