"""Audit a trained classifier: `python audit.py [audit=evaluate|roar|kar] [key=value ...]`.

Thin entry point: Hydra composes conf/audit.yaml, xaudit.tasks.audit does the work.
"""

import hydra
from omegaconf import DictConfig

from xaudit.tasks.audit import audit


@hydra.main(version_base="1.3", config_path="conf", config_name="audit")
def main(cfg: DictConfig) -> None:
    """Run the audit; results, report and plots land in the audit directory (printed at the end)."""
    audit(cfg)


if __name__ == "__main__":
    main()
