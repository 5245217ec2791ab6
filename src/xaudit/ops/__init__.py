"""Neutral tensor operations shared by the explainers and the metrics (and ROAR): occlusion and
baseline fills (:mod:`xaudit.ops.fills`) and per-image seeds (:mod:`xaudit.ops.seeds`).

They sit below both layers, so a metric that needs "what replaces a removed pixel" or "this
image's seed" does not import the explainers package for it. Nothing here imports a model-level
layer of xaudit (only :mod:`xaudit.utils`).
"""
