"""Placement methods on a frozen SPoT model: SPoT-ON, entropy search, learned prior, placer, model saliency (torch only)."""

LABEL_FREE = ("learned", "placer", "entropy")     # label-free placements: their stages, and their rows in the report
