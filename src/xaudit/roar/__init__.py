"""ROAR / KAR building blocks (Hooker et al., 2019): tensor splits served on the device, pixel
removal with a seeded tie-break, attribution shards, the crash-safe results log, and the sweep
(:class:`RoarSweep`) that retrains one model per (method, fraction, seed) cell on top of them.
``python audit.py audit=roar|kar`` drives it (:mod:`xaudit.tasks.audit`).
"""

from xaudit.data.tensor_split import DeviceBatches, SplitDataModule, TensorSplit, augment_batch
from xaudit.ops.masking import MODES, check_fractions, keep_mask, removal_order
from xaudit.roar.runner import Cell, Recipe, RoarSweep, retrain, sweep_cells
from xaudit.roar.store import AttributionStore, AttributionWriter, method_key
from xaudit.utils.results import ConfigMismatchError, ResultsLog

__all__ = [
    "MODES",
    "AttributionStore",
    "AttributionWriter",
    "Cell",
    "ConfigMismatchError",
    "DeviceBatches",
    "Recipe",
    "ResultsLog",
    "RoarSweep",
    "SplitDataModule",
    "TensorSplit",
    "augment_batch",
    "check_fractions",
    "keep_mask",
    "method_key",
    "removal_order",
    "retrain",
    "sweep_cells",
]
