"""data.cluster: planted clusters recovered, the 1.1 balance bound, optimality of the balanced
assignment against scipy's exact solver, determinism, and assign_new reproducing the stored labels."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from scipy.optimize import linear_sum_assignment

from data.cluster import (assign_new, balance_band, balanced_assign, balanced_kmeans, cluster, repair_band,
                          two_level_kmeans)
from data.embed import load_embeddings


def adjusted_rand_index(a, b) -> float:
    """ARI from the contingency table (Hubert & Arabie), in float64."""
    _, a = np.unique(np.asarray(a), return_inverse=True)
    _, b = np.unique(np.asarray(b), return_inverse=True)
    table = np.zeros((a.max() + 1, b.max() + 1))
    np.add.at(table, (a, b), 1)

    def pairs(n):
        return n * (n - 1) / 2

    index, rows, cols = pairs(table).sum(), pairs(table.sum(1)).sum(), pairs(table.sum(0)).sum()
    expected = rows * cols / pairs(len(a))
    return float((index - expected) / ((rows + cols) / 2 - expected))


def planted(sizes, dim=16, spread=6.0, seed=0) -> tuple[torch.Tensor, np.ndarray]:
    """Gaussian blobs (unit variance) around random centres, with their true labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(sizes), dim, generator=g) * spread
    x = torch.cat([centres[i] + torch.randn(n, dim, generator=g) for i, n in enumerate(sizes)])
    return x, np.repeat(np.arange(len(sizes)), sizes)


def ratio(labels, k) -> float:
    sizes = np.bincount(np.asarray(labels), minlength=k)
    return sizes.max() / sizes.min()


def write_embeddings(path, x: torch.Tensor) -> list[str]:
    keys = [f"s{i:05d}" for i in range(len(x))]
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.numpy().ravel(), pa.float32()), x.shape[1])
    pq.write_table(pa.table({"key": keys, "embedding": col}), path)
    return keys


def test_ari_reference_values():
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 7, 7]) == pytest.approx(1.0)
    # contingency [[2,0],[1,1]]: index 1, rows 2, cols 3, pairs(4)=6 → (1 - 1) / (2.5 - 1) = 0
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(0.0)


def test_balance_band():
    for n in list(range(3, 400)) + [10_007, 1_000_000]:
        for k in (1, 2, 3, 8):
            if n < k:
                continue
            lo, hi = balance_band(n, k)
            assert k * lo <= n <= k * hi
            assert hi <= 1.1 * lo or (lo, hi) == (n // k, -(-n // k))  # else: the ±1 fallback
    assert balance_band(20, 3) == (6, 7)  # 7/6 > 1.1: no split of 20 into 3 can do better
    with pytest.raises(ValueError):
        balance_band(2, 3)


@pytest.mark.parametrize("sizes", [[400, 400, 400], [150, 150, 150, 150, 150]])
def test_planted_clusters_recovered(sizes):
    x, truth = planted(sizes)
    _, labels = balanced_kmeans(x, len(sizes), seed=0)
    assert adjusted_rand_index(truth, labels.numpy()) >= 0.9
    fit = two_level_kmeans(x, len(sizes), fine_clusters=64, seed=0)
    assert adjusted_rand_index(truth, fit.labels.numpy()) >= 0.9
    assert ratio(fit.labels, len(sizes)) <= 1.1


def test_unbalanced_planted_set_meets_the_bound():
    sizes = [100, 300, 1100]
    x, truth = planted(sizes)
    _, labels = balanced_kmeans(x, 3, seed=0)
    assert ratio(labels, 3) <= 1.1
    fit = two_level_kmeans(x, 3, fine_clusters=64, seed=0)
    assert ratio(fit.labels, 3) <= 1.1
    # unbalanced mode keeps the natural clusters instead
    free = two_level_kmeans(x, 3, fine_clusters=64, seed=0, balanced=False)
    assert adjusted_rand_index(truth, free.labels.numpy()) >= 0.9
    assert ratio(free.labels, 3) > 5


@pytest.mark.parametrize("n,k", [(20, 3), (33, 3), (17, 4), (5, 5)])
def test_small_n_sizes_differ_by_at_most_one(n, k):
    x, _ = planted([n - n // 2, n // 2], dim=4, seed=1)
    fit = two_level_kmeans(x, k, fine_clusters=1024, seed=0)
    sizes = np.bincount(fit.labels.numpy(), minlength=k)
    assert sizes.sum() == n and sizes.max() - sizes.min() <= 1


def test_balanced_assignment_is_optimal():
    """Equal sizes with random costs: the price rule matches scipy's exact assignment optimum."""
    g = torch.Generator().manual_seed(3)
    for trial in range(5):
        n, k = 60, 3
        cost = torch.rand(n, k, generator=g, dtype=torch.float64) + torch.linspace(0, 0.5, k, dtype=torch.float64)
        lo = hi = n // k
        labels, prices = balanced_assign(cost, lo, hi)
        labels = repair_band(cost, labels, prices, lo, hi)
        assert torch.bincount(labels, minlength=k).tolist() == [lo] * k
        ours = float(cost[torch.arange(n), labels].sum())
        rows, cols = linear_sum_assignment(cost.repeat_interleave(lo, dim=1).numpy())  # k·lo slots
        assert ours == pytest.approx(float(cost.numpy()[rows, cols // lo].sum()), rel=1e-9, abs=1e-9)


def test_determinism_by_seed():
    x, _ = planted([300, 500, 700], dim=8)
    a = two_level_kmeans(x, 3, fine_clusters=32, seed=5)
    b = two_level_kmeans(x, 3, fine_clusters=32, seed=5)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.fine_centroids, b.fine_centroids)
    assert torch.equal(a.prices, b.prices)


def test_cluster_stage_outputs_and_assign_new(tmp_path, caplog):
    x, truth = planted([500, 900, 1600], dim=12)
    x = x / x.norm(dim=1, keepdim=True)
    emb = tmp_path / "embeddings.parquet"
    keys = write_embeddings(emb, x)
    with caplog.at_level("INFO", logger="data.cluster"):
        result = cluster(emb, tmp_path / "out", num_experts=3, fine_clusters=48, seed=1, progress=False)
    assert "expert sizes 1:" in caplog.text
    table = pq.read_table(tmp_path / "out" / "assignments.parquet").to_pydict()
    assert table["key"] == keys and set(table["expert"]) == {1, 2, 3}
    sizes = np.bincount(table["expert"])[1:]
    assert sizes.max() / sizes.min() <= 1.1 and result.info["sizes"] == sizes.tolist()
    with safe_open(tmp_path / "out" / "centroids.safetensors", "pt") as f:
        meta = f.metadata()
        assert json.loads(meta["num_experts"]) == 3 and json.loads(meta["seed"]) == 1
        assert f.get_tensor("fine_centroids").shape == (48, 12) and f.get_tensor("coarse_centroids").shape == (3, 12)
        assert set(f.get_tensor("fine_expert").tolist()) == {1, 2, 3}
    # distance = Euclidean distance to the nearest fine centre of the assigned expert, computed here directly
    with safe_open(tmp_path / "out" / "centroids.safetensors", "pt") as f:
        fine, fine_expert = f.get_tensor("fine_centroids").double(), f.get_tensor("fine_expert")
    d = torch.cdist(x.double(), fine)
    d[torch.as_tensor(table["expert"]).unsqueeze(1) != fine_expert.unsqueeze(0)] = torch.inf
    np.testing.assert_allclose(table["distance"], d.min(1).values.numpy(), rtol=1e-4, atol=1e-5)
    # a data refresh with the saved clustering reproduces the stored assignment
    keys_back, x_back = load_embeddings(emb)
    experts, dist = assign_new(x_back, tmp_path / "out" / "centroids.safetensors")
    np.testing.assert_array_equal(experts.numpy(), table["expert"])
    np.testing.assert_allclose(dist.numpy(), table["distance"], rtol=1e-4, atol=1e-5)
    # rerun: nothing to do
    again = cluster(emb, tmp_path / "out", num_experts=3, fine_clusters=48, seed=1, progress=False)
    assert again.skipped and again.info == result.info


def test_cluster_errors_before_heavy_work(tmp_path):
    emb = tmp_path / "embeddings.parquet"
    write_embeddings(emb, torch.randn(4, 3))
    with pytest.raises(ValueError, match="num_experts=5 is more than the 4"):
        cluster(emb, tmp_path / "out", num_experts=5, progress=False)
    with pytest.raises(FileNotFoundError, match="run embed first"):
        cluster(tmp_path / "nope.parquet", tmp_path / "out", num_experts=2, progress=False)
    write_embeddings(emb, torch.randn(40, 3))
    cluster(emb, tmp_path / "ok", num_experts=2, fine_clusters=4, progress=False)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        assign_new(torch.randn(2, 5), tmp_path / "ok" / "centroids.safetensors")
