"""Moved to :mod:`xaudit.audits.explain` (the ``explain`` audit mode); re-exported here for old imports."""

from xaudit.audits.explain import (  # noqa: F401
    IMAGE_EXTENSIONS,
    Explain,
    image_files,
    load_images,
    load_masks,
    run_explain,
)
