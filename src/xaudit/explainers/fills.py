"""Reference images a method compares against: moved to :mod:`xaudit.ops.fills` (shared by the
explainers and the metrics); this module re-exports it for existing imports."""

from xaudit.ops.fills import (
    FILLS,
    RISE_KERNEL_224,
    RISE_SIGMA_224,
    FillLike,
    check_fill,
    default_blur_sigma,
    gaussian_blur,
    make_fill,
    rise_blur,
    rise_kernel_1d,
    rise_kernel_size,
    rise_sigma,
)

__all__ = ["FILLS", "RISE_KERNEL_224", "RISE_SIGMA_224", "FillLike", "check_fill", "default_blur_sigma",
           "gaussian_blur", "make_fill", "rise_blur", "rise_kernel_1d", "rise_kernel_size", "rise_sigma"]
