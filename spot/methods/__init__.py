"""Methods on a frozen SPoT model (torch only): placement (SPoT-ON, entropy search, learned prior, placer,
model saliency) and the token-reduction baselines at equal FLOPs (merging, pruning, resolution, budget)."""

LABEL_FREE = ("learned", "placer", "entropy")     # label-free placements: their stages, and their rows in the report
