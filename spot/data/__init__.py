"""Data: sources (ImageNet, Fashion-MNIST, class folders) -> WebDataset shards -> batches."""
