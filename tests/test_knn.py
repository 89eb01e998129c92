import numpy as np
import torch

from spot.core.knn import knn_predict


def brute_force(train, labels, query, k, t, classes):
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    out = []
    for q in qn:
        sim = tn @ q
        idx = np.argsort(-sim)[:k]
        votes = np.zeros(classes)
        for i in idx:
            votes[labels[i]] += np.exp(sim[i] / t)
        out.append(votes.argmax())
    return np.array(out)


def test_matches_numpy_reference():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(500, 16)).astype(np.float32)
    labels = rng.integers(0, 7, 500)
    query = rng.normal(size=(130, 16)).astype(np.float32)
    ours = knn_predict(torch.from_numpy(train), torch.from_numpy(labels), torch.from_numpy(query), k=10,
                       temperature=0.1, num_classes=7, chunk_size=32)
    np.testing.assert_array_equal(ours.numpy(), brute_force(train, labels, query, 10, 0.1, 7))


def test_separable_clusters_are_classified():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(4, 8)) * 5
    labels = np.repeat(np.arange(4), 50)
    train = centres[labels] + rng.normal(size=(200, 8))
    query = centres[np.arange(4)] + rng.normal(size=(4, 8)) * 0.1
    pred = knn_predict(torch.from_numpy(train).float(), torch.from_numpy(labels), torch.from_numpy(query).float(), k=5)
    assert pred.tolist() == [0, 1, 2, 3]
