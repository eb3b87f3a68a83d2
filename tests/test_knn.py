"""kNN classification of features against brute-force numpy answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dermcompress.learn.knn import knn_predict


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def random_set(n_train=60, n_query=25, dim=8, n_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    train = torch.randn(n_train, dim, generator=g)
    labels = torch.randint(0, n_classes, (n_train,), generator=g)
    query = torch.randn(n_query, dim, generator=g)
    return train, labels, query


def test_toy_clusters_are_classified():
    # Cosine similarity sees directions: three clusters at 0, 120 and 240 degrees, at varied radii.
    rng = np.random.default_rng(0)
    centres = np.array([[np.cos(a), np.sin(a)] for a in np.deg2rad([0, 120, 240])])

    def sample(n):
        labels = rng.integers(0, 3, n)
        points = centres[labels] + rng.normal(scale=0.15, size=(n, 2))
        return torch.tensor(points * rng.uniform(0.5, 5, (n, 1)), dtype=torch.float32), labels

    train, train_labels = sample(90)
    query, query_labels = sample(30)
    probs = knn_predict(train, torch.from_numpy(train_labels), query, num_classes=3, k=10)
    assert probs.shape == (30, 3)
    assert (probs.argmax(1).numpy() == query_labels).all()


def test_k1_returns_nearest_neighbour_class():
    train, labels, query = random_set()
    probs = knn_predict(train, labels, query, num_classes=4, k=1)
    nearest = cosine(query.numpy(), train.numpy()).argmax(1)
    assert torch.equal(probs.argmax(1), labels[nearest])
    assert torch.equal(probs.max(1).values, torch.ones(len(query)))  # one neighbour: all its weight


def test_uniform_weighting_is_majority_vote():
    train, labels, query = random_set(seed=1)
    k = 7
    probs = knn_predict(train, labels, query, num_classes=4, k=k, weighting="uniform")
    top = np.argsort(-cosine(query.numpy(), train.numpy()), axis=1, kind="stable")[:, :k]
    counts = np.stack([np.bincount(labels.numpy()[row], minlength=4) for row in top])
    np.testing.assert_allclose(probs.numpy(), counts / k, atol=1e-6)


def test_exp_weighting_matches_dinov2_formula():
    train, labels, query = random_set(seed=2)
    k, temperature = 5, 0.07
    probs = knn_predict(train, labels, query, num_classes=4, k=k, temperature=temperature)
    sims = cosine(query.numpy().astype(np.float64), train.numpy().astype(np.float64))
    expected = np.zeros((len(query), 4))
    for q, row in enumerate(sims):
        top = np.argsort(-row, kind="stable")[:k]
        weights = np.exp(row[top] / temperature)
        np.add.at(expected[q], labels.numpy()[top], weights / weights.sum())
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-5)


def test_chunking_gives_the_same_results():
    train, labels, query = random_set(n_query=23, seed=3)
    whole = knn_predict(train, labels, query, num_classes=4, k=9)
    for chunk_size in (1, 5, 22):
        chunked = knn_predict(train, labels, query, num_classes=4, k=9, chunk_size=chunk_size)
        # BLAS sums in a different order for other matrix shapes: same neighbours, last-bit differences.
        assert torch.equal(chunked.argmax(1), whole.argmax(1))
        torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=0)
    # float64 features: the same neighbours and votes at any chunk size, to double precision
    whole = knn_predict(train.double(), labels, query.double(), num_classes=4, k=9, weighting="uniform")
    chunked = knn_predict(
        train.double(), labels, query.double(), num_classes=4, k=9, weighting="uniform", chunk_size=4
    )
    assert torch.equal(chunked, whole)


def test_k_larger_than_train_set_is_clipped():
    train, labels, query = random_set(n_train=6, seed=4)
    clipped = knn_predict(train, labels, query, num_classes=4, k=100, weighting="uniform")
    assert torch.equal(clipped, knn_predict(train, labels, query, num_classes=4, k=6, weighting="uniform"))
    # every query sees the whole training set: the class frequencies
    expected = torch.bincount(labels, minlength=4).float() / 6
    torch.testing.assert_close(clipped, expected.expand(len(query), 4))


def test_probabilities_sum_to_one_and_absent_classes_get_zero():
    train, labels, query = random_set(seed=5, n_classes=3)
    for weighting in ("exp", "uniform"):
        probs = knn_predict(train, labels, query, num_classes=5, k=20, weighting=weighting)
        torch.testing.assert_close(probs.sum(1), torch.ones(len(query)))
        assert (probs >= 0).all() and (probs[:, 3:] == 0).all()


def test_similarity_ties_go_to_the_lower_training_index():
    train = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # rows 0 and 1: same direction
    labels = torch.tensor([1, 0, 2])
    probs = knn_predict(train, labels, torch.tensor([[3.0, 0.1]]), num_classes=3, k=1)
    assert probs.argmax(1).item() == 1


def test_half_precision_and_bad_arguments():
    train, labels, query = random_set(seed=6)
    full = knn_predict(train, labels, query, num_classes=4, k=1)
    half = knn_predict(train.half(), labels, query.half(), num_classes=4, k=1)
    assert half.dtype == torch.float32
    assert (half.argmax(1) == full.argmax(1)).float().mean() > 0.9
    with pytest.raises(ValueError, match="weighting"):
        knn_predict(train, labels, query, num_classes=4, weighting="cosine")
    with pytest.raises(ValueError, match="labels must lie"):
        knn_predict(train, labels, query, num_classes=2)
    with pytest.raises(ValueError, match="dims"):
        knn_predict(train, labels, query[:, :3], num_classes=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_matches_cpu():
    train, labels, query = random_set(n_train=500, n_query=100, seed=7)
    cpu = knn_predict(train, labels, query, num_classes=4, k=20)
    gpu = knn_predict(train.cuda(), labels.cuda(), query, num_classes=4, k=20, chunk_size=32)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
