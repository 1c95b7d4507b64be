"""LoRA aggregation (mesp_mlx/federated/aggregation.py) on random adapters, against the exact average of ΔW = s A B."""

import numpy as np
import pytest

from mesp_mlx.federated.aggregation import AggregationError, aggregate, delta, exact_average, measured_error

SCALE = 20.0


def random_adapter(rng, shapes, rank, std=0.05):
    out = {}
    for name, (d_in, d_out) in shapes.items():
        out[f"{name}.lora_a"] = (std * rng.normal(size=(d_in, rank))).astype(np.float32)
        out[f"{name}.lora_b"] = (std * rng.normal(size=(rank, d_out))).astype(np.float32)
    return out


SHAPES = {"model.layers.0.self_attn.q_proj": (24, 24), "model.layers.0.mlp.down_proj": (40, 24),
          "model.layers.1.mlp.up_proj": (24, 40)}


def test_one_client_is_reproduced_exactly():
    rng = np.random.default_rng(0)
    c = random_adapter(rng, SHAPES, 4)
    g, report = aggregate([c], [7], SCALE)
    assert report["rel_error"] < 1e-6 and measured_error(g, [c], [7], SCALE) < 1e-6
    for p in SHAPES:
        np.testing.assert_allclose(delta(g, p, SCALE), delta(c, p, SCALE), rtol=1e-5, atol=1e-7)
    assert all(g[k].dtype == np.float32 and g[k].shape == c[k].shape for k in c)


def test_flexlora_exact_when_the_average_fits_the_rank():
    # clients sharing A (as FedSA/FFA-LoRA do) have an average of rank <= r: FlexLoRA is exact, FedIT is too
    rng = np.random.default_rng(1)
    clients = [random_adapter(rng, SHAPES, 4) for _ in range(3)]
    for c in clients[1:]:
        c.update({k: v for k, v in clients[0].items() if k.endswith("lora_a")})
    counts = [10, 30, 5]
    g, report = aggregate(clients, counts, SCALE)
    assert report["rel_error"] < 1e-6
    assert measured_error(g, clients, counts, SCALE) < 1e-6
    assert aggregate(clients, counts, SCALE, scheme="fedit")[1]["rel_error"] < 1e-6


def test_flexlora_error_is_the_discarded_singular_values_and_beats_fedit():
    rng = np.random.default_rng(2)
    clients = [random_adapter(rng, SHAPES, 4) for _ in range(3)]
    counts = [1, 2, 3]
    exact = exact_average(clients, counts, SCALE)
    # the dense reference: weighted mean of s A_i B_i, and its best rank-4 approximation by a dense SVD
    w = np.array(counts) / sum(counts)
    for p in SHAPES:
        ref = sum(wi * SCALE * c[f"{p}.lora_a"].astype(np.float64) @ c[f"{p}.lora_b"] for wi, c in zip(w, clients))
        np.testing.assert_allclose(exact[p], ref, rtol=1e-10)
    s = {p: np.linalg.svd(exact[p], compute_uv=False) for p in SHAPES}
    predicted = np.sqrt(sum((s[p][4:] ** 2).sum() for p in SHAPES) / sum((s[p] ** 2).sum() for p in SHAPES))
    g, report = aggregate(clients, counts, SCALE)
    assert report["rel_error"] == pytest.approx(predicted, rel=1e-6)
    assert measured_error(g, clients, counts, SCALE) == pytest.approx(predicted, rel=1e-4)  # after the fp32 cast
    assert 0.05 < predicted < 1  # random adapters: a real truncation, not a degenerate case
    for p in SHAPES:  # Eckart–Young: no rank-4 matrix is closer
        u, sv, vt = np.linalg.svd(exact[p])
        best = (u[:, :4] * sv[:4]) @ vt[:4]
        assert np.linalg.norm(delta(g, p, SCALE) - best) < 1e-4 * np.linalg.norm(best)
    fedit, fedit_report = aggregate(clients, counts, SCALE, scheme="fedit")
    assert fedit_report["rel_error"] > report["rel_error"]
    assert fedit_report["rel_error"] == pytest.approx(measured_error(fedit, clients, counts, SCALE), rel=1e-4)
    g8, report8 = aggregate(clients, counts, SCALE, rank=12)  # rank >= 3 x 4: FlexLoRA is exact
    assert report8["rel_error"] < 1e-6 and g8[next(iter(g8))].shape[1] == 12


def test_weights_follow_example_counts():
    rng = np.random.default_rng(3)
    a, b = random_adapter(rng, SHAPES, 2), random_adapter(rng, SHAPES, 2)
    g, _ = aggregate([a, b], [1, 0], SCALE)  # a client with no examples has no say
    assert measured_error(g, [a], [1], SCALE) < 1e-6


def test_refuses_malformed_input():
    rng = np.random.default_rng(4)
    a = random_adapter(rng, SHAPES, 2)
    with pytest.raises(AggregationError, match="not a LoRA tensor"):
        aggregate([{**a, "model.embed_tokens.weight": np.zeros((2, 2))}], [1], SCALE)
    with pytest.raises(AggregationError, match="shape"):
        aggregate([a, random_adapter(rng, SHAPES, 3)], [1, 1], SCALE)
    with pytest.raises(AggregationError, match="example counts"):
        aggregate([a], [0], SCALE)
    with pytest.raises(AggregationError, match="lacks"):
        aggregate([{k: v for k, v in a.items() if not k.endswith("q_proj.lora_b")}], [1], SCALE)
    with pytest.raises(AggregationError, match="one of"):
        aggregate([a], [1], SCALE, scheme="mean")
