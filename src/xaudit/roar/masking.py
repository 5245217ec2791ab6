"""Moved to :mod:`xaudit.ops.masking` (ROAR/KAR keep-masks are a tensor op the report draws too); this
alias keeps old imports working."""

from xaudit.ops.masking import *  # noqa: F403
from xaudit.ops.masking import MODES, check_fractions, keep_mask, removal_order  # noqa: F401
