"""Moved to :mod:`xaudit.utils.config` (config instantiation, run dirs, seeding, logger helpers shared by
every task and audit mode); this alias keeps old imports working."""

from xaudit.utils.config import *  # noqa: F403
from xaudit.utils.config import (  # noqa: F401
    finish_wandb,
    instantiate,
    instantiate_group,
    log,
    plain_config,
    resolve_last_checkpoint,
    run_dir,
    seed,
)
