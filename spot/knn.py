"""Cosine-similarity kNN classifier with temperature-weighted voting (as in DINO)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                chunk_size: int = 1024) -> torch.Tensor:
    """Predict labels of queries by their k nearest training features.

    train_features (M, D), train_labels (M,), query_features (Q, D). Similarity is cosine; each of
    the k neighbours votes for its class with weight exp(sim / temperature). Queries are processed
    in chunks of `chunk_size`, so memory is O(chunk_size * M) whatever Q is. Returns (Q,) int64.
    """
    if k < 1:
        raise ValueError(f"knn k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"knn temperature must be > 0, got {temperature}")
    train_labels = train_labels.long().to(train_features.device)
    num_classes = num_classes or int(train_labels.max()) + 1
    k = min(k, train_features.shape[0])
    bank = F.normalize(train_features.float(), dim=1)
    preds = []
    for q in torch.split(query_features, chunk_size):
        sim = F.normalize(q.float().to(bank.device), dim=1) @ bank.T          # (q, M)
        top_sim, top_idx = sim.topk(k, dim=1)                                # (q, k)
        votes = torch.zeros(q.shape[0], num_classes, device=bank.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds).cpu()
