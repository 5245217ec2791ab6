"""ROAR / KAR building blocks (Hooker et al., 2019): tensor splits served on the device, pixel
removal with a seeded tie-break, attribution shards, and the crash-safe results log.

The ``audit.py`` runner that sweeps (method, fraction, seed) cells on top of these is not built yet.
"""

from xaudit.roar.data import DeviceBatches, SplitDataModule, TensorSplit, augment_batch
from xaudit.roar.masking import MODES, check_fractions, keep_mask, removal_order
from xaudit.roar.results import ConfigMismatchError, ResultsLog
from xaudit.roar.store import AttributionStore, AttributionWriter, method_key

__all__ = [
    "MODES",
    "AttributionStore",
    "AttributionWriter",
    "ConfigMismatchError",
    "DeviceBatches",
    "ResultsLog",
    "SplitDataModule",
    "TensorSplit",
    "augment_batch",
    "check_fractions",
    "keep_mask",
    "method_key",
    "removal_order",
]
