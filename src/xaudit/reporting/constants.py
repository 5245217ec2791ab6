"""Names shared by the writers of audit results (ROAR/KAR, the audit modes) and the report that reads
them. They live here, below both, so the report never imports the runner that writes the cells."""

from __future__ import annotations

from xaudit.ops.masking import MODES

__all__ = ["BASELINE", "RETRAIN_MODES"]

#: method name of the cells trained on the unmasked data (the accuracy every method is compared to)
BASELINE = "baseline"
#: the retraining benchmarks: remove the top pixels (ROAR) or keep only them (KAR; Hooker et al., 2019)
RETRAIN_MODES: tuple[str, ...] = MODES
