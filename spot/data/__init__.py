"""Data: sources (ImageNet, Fashion-MNIST, class folders) -> WebDataset shards -> saliency maps -> decoded arrays."""
