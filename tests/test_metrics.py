"""eval.metrics: the accumulators behind every METRICS.md key, on plain tensors."""

from __future__ import annotations

import math

import pytest
import torch

from eval import metrics as M


def _data(n=50, d_in=6, d_sae=10, seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) * 2 + offset
    x_hat = x + 0.3 * torch.randn(n, d_in, generator=g, dtype=torch.float64)
    f = torch.relu(torch.randn(n, d_sae, generator=g, dtype=torch.float64))
    f[:, 3] = 0.0  # a dead feature
    f[:, 7] = 1.5  # a dense one
    return x, x_hat, f


def _run(x, x_hat, f, batch):
    acc = M.ReconstructionAccumulator(x.shape[1], f.shape[1])
    for s in range(0, x.shape[0], batch):
        acc.update(x[s:s + batch], x_hat[s:s + batch], f[s:s + batch])
    return acc.result(), acc.frequency()


def test_hand_computed_values():
    x, x_hat, f = _data()
    r, freq = _run(x, x_hat, f, 7)
    err = (x - x_hat).pow(2)
    assert r["tokens_evaluated"] == 50
    assert r["mse"] == pytest.approx(err.mean().item(), rel=1e-12)  # per element, like nn.MSELoss
    assert r["mse"] == pytest.approx(torch.nn.functional.mse_loss(x, x_hat).item(), rel=1e-12)
    assert r["sse_per_token"] == pytest.approx(err.sum(1).mean().item(), rel=1e-12)
    centred = (x - x.mean(0)).pow(2).sum()
    assert r["fvu"] == pytest.approx((err.sum() / centred).item(), rel=1e-10)
    assert r["explained_variance"] == pytest.approx(1 - r["fvu"], rel=1e-12)
    assert r["l0"] == pytest.approx((f != 0).sum(1).double().mean().item(), rel=1e-12)
    assert r["l1"] == pytest.approx(f.abs().sum(1).mean().item(), rel=1e-12)
    cos = torch.nn.functional.cosine_similarity(x, x_hat, dim=1).mean().item()
    assert r["cossim"] == pytest.approx(cos, rel=1e-10)
    assert r["l2_ratio"] == pytest.approx((x_hat.norm(dim=1) / x.norm(dim=1)).mean().item(), rel=1e-10)
    rrb = x_hat.pow(2).sum(1).mean() / (x * x_hat).sum(1).mean()
    assert r["relative_reconstruction_bias"] == pytest.approx(rrb.item(), rel=1e-10)
    expected_freq = (f != 0).double().mean(0).float()
    assert torch.equal(freq, expected_freq)
    assert r["dead"] == 1 and r["frac_alive"] == pytest.approx(0.9)
    assert r["dense_1e-1"] == int((expected_freq > 0.1).sum())
    assert r["dense_1e-2"] == int((expected_freq > 0.01).sum())


def test_batching_changes_no_number():
    x, x_hat, f = _data(n=101)
    ref, ref_freq = _run(x, x_hat, f, 101)
    for batch in (1, 7, 64):
        r, freq = _run(x, x_hat, f, batch)
        assert torch.equal(freq, ref_freq)
        for key, value in ref.items():
            assert r[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


def test_fvu_is_centred():
    x, x_hat, f = _data()
    base, _ = _run(x, x_hat, f, 8)
    shifted, _ = _run(x + 1000.0, x_hat + 1000.0, f, 8)
    assert shifted["fvu"] == pytest.approx(base["fvu"], rel=1e-8)
    assert shifted["mse"] == pytest.approx(base["mse"], rel=1e-8)
    # The uncentred ratio would be ~1e-6 here: make sure that is not what we compute.
    uncentred = (x + 1000 - x_hat - 1000).pow(2).sum() / (x + 1000).pow(2).sum()
    assert shifted["fvu"] > 100 * uncentred.item()


def test_identity_and_zero_reconstruction():
    x, _, f = _data()
    r, _ = _run(x, x.clone(), f, 9)
    assert r["fvu"] == 0 and r["mse"] == 0 and r["cossim"] == pytest.approx(1.0)
    assert r["l2_ratio"] == pytest.approx(1.0) and r["relative_reconstruction_bias"] == pytest.approx(1.0)
    z, _ = _run(x, torch.zeros_like(x), torch.zeros_like(f), 9)
    assert z["cossim"] == 0 and z["l2_ratio"] == 0 and z["l0"] == 0 and z["dead"] == f.shape[1]
    assert z["frac_alive"] == 0
    assert z["fvu"] == pytest.approx((x.pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item(), rel=1e-10)
    assert math.isnan(z["relative_reconstruction_bias"])  # 0 / 0: undefined, not a number


def test_empty_update_and_no_tokens():
    acc = M.ReconstructionAccumulator(3, 4)
    acc.update(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 4))
    with pytest.raises(ValueError, match="no tokens"):
        acc.result()
    with pytest.raises(ValueError, match="shapes"):
        acc.update(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 5))


def test_prediction_mask_ce_kl():
    keep = torch.tensor([[False, True, True, True, False], [False, True, False, True, True]])
    assert M.prediction_mask(keep).tolist() == [[False, True, True, False], [False, False, False, True]]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    tokens = torch.randint(0, 11, (2, 5), generator=g)
    lp = M.token_log_probs(logits)
    ce = M.token_ce(lp, tokens)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1),
                                            reduction="none").view(2, 4)
    assert torch.allclose(ce, ref, atol=1e-6)
    other = torch.randn(2, 5, 11, generator=g)
    kl = M.token_kl(lp, M.token_log_probs(other))
    ref_kl = torch.nn.functional.kl_div(M.token_log_probs(other), lp, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl, ref_kl, atol=1e-6)
    assert torch.allclose(M.token_kl(lp, lp), torch.zeros(2, 4))
    s = M.SumAccumulator()
    pred = M.prediction_mask(keep)
    s.add("ce", ce[:1], pred[:1])
    s.add("ce", ce[1:], pred[1:])
    assert s.counts["ce"] == 3
    assert s.mean("ce") == pytest.approx(ce[pred].double().mean().item(), rel=1e-6)


def test_downstream_definitions():
    m = M.downstream_metrics(ce_clean=2.0, ce_sae=2.5, ce_zero=7.0, ce_mean=4.0, kl_sae=0.4, kl_zero=4.0)
    assert m["ce_delta"] == pytest.approx(0.5)
    assert m["loss_recovered"] == pytest.approx(0.9)  # (7 - 2.5) / (7 - 2)
    assert m["loss_recovered_mean_ablation"] == pytest.approx(0.75)  # (4 - 2.5) / (4 - 2)
    assert m["kl_recovered"] == pytest.approx(0.9)
    same = M.downstream_metrics(2.0, 2.0, 2.0, 2.0, 0.0, 0.0)
    assert math.isnan(same["loss_recovered"]) and math.isnan(same["kl_recovered"])
    assert M.jsonable({"a": [float("nan"), 1.0], "b": float("inf")}) == {"a": [None, 1.0], "b": None}


def test_frequency_summary():
    freq = torch.tensor([0.0, 0.005, 0.02, 0.5, 0.0])
    assert M.frequency_summary(freq) == {"dead": 2, "dense_1e-2": 2, "dense_1e-1": 1, "frac_alive": 0.6}
