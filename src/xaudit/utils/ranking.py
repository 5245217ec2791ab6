"""Moved to :mod:`xaudit.ops.ranking` (a tensor op shared by metrics and ROAR); this alias keeps old imports working."""

from xaudit.ops.ranking import *  # noqa: F403
from xaudit.ops.ranking import (  # noqa: F401
    content_seeds,
    order_key,
    pixel_ranks,
    splitmix,
    tie_priority,
    top_k_mask,
)
