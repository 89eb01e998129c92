"""Cosine-similarity kNN classifier with temperature-weighted voting (as in DINO)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def topk_cosine(bank: torch.Tensor, queries: torch.Tensor, k: int, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, k) cosine similarities and bank indices of each query's k nearest bank rows, best first.

    bank (M, D), queries (Q, D) already L2-normalised, float32. The bank is scanned in chunks of
    `chunk_size` rows with a running top-k, so memory is O(Q * (chunk_size + k)) whatever M is.
    """
    best_sim = queries.new_full((len(queries), 0), float("-inf"))
    best_idx = torch.zeros(len(queries), 0, dtype=torch.long, device=queries.device)
    for start in range(0, len(bank), chunk_size):
        sim = queries @ F.normalize(bank[start:start + chunk_size].float(), dim=1).T   # (Q, chunk)
        sim, idx = sim.topk(min(k, sim.shape[1]), dim=1)
        best_sim, order = torch.cat([best_sim, sim], 1).topk(min(k, best_sim.shape[1] + sim.shape[1]), dim=1)
        best_idx = torch.cat([best_idx, idx + start], 1).gather(1, order)
    return best_sim, best_idx


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                chunk_size: int = 4096) -> torch.Tensor:
    """Predict labels of queries by their k nearest training features.

    train_features (M, D) (any float dtype, e.g. a float16 bank), train_labels (M,), query_features
    (Q, D). Similarity is cosine; each of the k neighbours votes for its class with weight
    exp(sim / temperature) (DINO). Queries and bank are both processed in chunks of `chunk_size`
    rows, so memory is O(chunk_size²) floats plus the inputs: a 1.28M-image bank fits.
    Computed on train_features' device. Returns (Q,) int64 on the CPU.
    """
    if k < 1:
        raise ValueError(f"knn k must be >= 1, got {k}")
    if temperature <= 0:
        raise ValueError(f"knn temperature must be > 0, got {temperature}")
    if train_features.ndim != 2 or query_features.ndim != 2 or train_features.shape[1] != query_features.shape[1] \
            or len(train_features) != len(train_labels) or len(train_features) == 0:
        raise ValueError(f"knn: need train_features (M, D), train_labels (M,), query_features (Q, D), got "
                         f"{tuple(train_features.shape)}, {tuple(train_labels.shape)}, {tuple(query_features.shape)}")
    device = train_features.device
    train_labels = train_labels.long().to(device)
    num_classes = num_classes or int(train_labels.max()) + 1
    preds = []
    for q in torch.split(query_features, chunk_size):
        q = F.normalize(q.float().to(device), dim=1)
        sim, idx = topk_cosine(train_features, q, k, chunk_size)                  # (q, k)
        votes = torch.zeros(len(q), num_classes, device=device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds).cpu() if preds else torch.zeros(0, dtype=torch.long)
