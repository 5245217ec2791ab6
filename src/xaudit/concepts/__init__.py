"""Concept-based explanations: TCAV (concept activation vectors) and the concept sets it tests."""

from xaudit.concepts.sources import (
    concept_sources,
    cue_effects,
    default_concept_layer,
    load_concept_folder,
)
from xaudit.concepts.tcav import concept_tcav, layer_activations, learn_cav, tcav_score

__all__ = [
    "concept_sources",
    "concept_tcav",
    "cue_effects",
    "default_concept_layer",
    "layer_activations",
    "learn_cav",
    "load_concept_folder",
    "tcav_score",
]
