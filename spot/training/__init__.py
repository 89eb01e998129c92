"""Models over the decoded data: the training loop, evaluation of a placement, checkpoints, backbone and placer files."""
