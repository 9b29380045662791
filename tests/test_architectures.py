"""Every architecture: folding, saving, pruning/killing, sparse kernels, training hooks."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from sae.dictionaries import ARCHITECTURES, parse_dictionary_config
from sae.dictionaries.base import MAX_DEFAULT_LR
from sae.dictionaries.jumprelu import heaviside_step, jumprelu
from sae.dictionaries.registry import get_architecture
from sae.errors import ConfigError
from sae.loading import load_dictionary
from sae.sparse_ops import grouped_sum, selected_pre_acts, sparse_decode
from sae.trainer import reset_optimizer_rows

ARCHS = ["relu", "relu_april", "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "gated"]
TOPK_STYLE = ["topk", "batchtopk", "matryoshka_batchtopk"]
D_IN, D_SAE = 16, 48


def make(arch: str, d_sae: int = D_SAE, seed: int = 0, **extra):
    raw = {"architecture": arch, "d_sae": d_sae, "seed": seed, **extra}
    if arch == "relu_april":
        raw.update(architecture="relu", recipe="april2024")
    if arch in TOPK_STYLE:
        raw.setdefault("k", 5)
    if arch == "matryoshka_batchtopk":
        raw.setdefault("group_sizes", [d_sae // 6, d_sae // 3, d_sae - d_sae // 6 - d_sae // 3])
    cfg = parse_dictionary_config(raw)
    d = get_architecture(cfg.architecture)(cfg, D_IN)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        d.b_enc.copy_(0.3 * torch.randn(d.d_sae, generator=g))
        d.b_dec.copy_(torch.randn(D_IN, generator=g))
        d.W_dec.mul_(1 + torch.rand(d.d_sae, 1, generator=g))
        if hasattr(d, "threshold"):
            d.threshold.copy_(0.5 * torch.rand(d.d_sae, generator=g))
        if hasattr(d, "r_mag"):
            d.r_mag.copy_(0.2 * torch.randn(d.d_sae, generator=g))
            d.b_mag.copy_(0.2 * torch.randn(d.d_sae, generator=g))
        d.input_scale.fill_(0.37)
    return d.eval()


def inputs(n: int = 64, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 4 * torch.randn(n, D_IN, generator=g) + 2


def test_registry_has_every_architecture():
    # tests/eval_helpers.py registers extra `test_*` architectures; the library's own are these
    library_architectures = {name for name in ARCHITECTURES if not name.startswith("test_")}
    assert library_architectures == {"relu", "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "gated"}
    with pytest.raises(ConfigError, match="did you mean"):
        get_architecture("topkk")
    with pytest.raises(Exception, match="extra|l1_coefficient"):
        parse_dictionary_config({"architecture": "topk", "d_sae": 8, "l1_coefficient": 1.0})


@pytest.mark.parametrize("arch", ARCHS)
def test_fold_input_scale_gives_identical_outputs_on_raw_activations(arch):
    d = make(arch)
    x = inputs()
    f, y = d.encode(x), d(x)
    assert (f != 0).any()
    folded = copy.deepcopy(d)
    folded.fold_input_scale()
    assert float(folded.input_scale) == 1.0
    torch.testing.assert_close(folded.encode(x), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded(x), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip_is_exact(arch, tmp_path):
    d = make(arch)
    d.metadata = {"model_name": "tiny", "hook_name": "blocks.0.hook_resid_post"}
    d.save(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    assert cfg["architecture"] == d.architecture and cfg["d_in"] == D_IN and cfg["d_sae"] == D_SAE
    assert cfg["model_name"] == "tiny" and cfg["dtype"] == "float32"
    loaded = load_dictionary(tmp_path / "d")
    folded = copy.deepcopy(d)
    folded.fold_input_scale()
    assert set(loaded.weights()) == set(d.weights())
    for name, t in folded.weights().items():
        assert torch.equal(loaded.weights()[name], t), name
    x = inputs()
    torch.testing.assert_close(loaded(x), d(x), rtol=1e-5, atol=1e-5)
    # saving again (input_scale already 1) writes the same tensors
    loaded.save(tmp_path / "e")
    again = load_dictionary(tmp_path / "e")
    for name, t in loaded.weights().items():
        assert torch.equal(again.weights()[name], t)


def test_gated_and_threshold_weights_are_saved():
    assert {"r_mag", "b_mag"} <= set(make("gated").weights())
    assert "threshold" in make("jumprelu").weights()
    assert "threshold" in make("batchtopk").weights()
    assert "threshold" in make("matryoshka_batchtopk").weights()


@pytest.mark.parametrize("mode", ["before", "after"])
@pytest.mark.parametrize("arch", ARCHS)
def test_pruned_encodes_like_the_kill_mask(arch, mode, tmp_path):
    d = make(arch)
    x = inputs(128)
    keep = torch.randperm(D_SAE, generator=torch.Generator().manual_seed(3))[:30]
    if arch == "matryoshka_batchtopk":
        keep = keep.sort().values  # its kept features stay in group order
    kill = torch.ones(D_SAE, dtype=torch.bool)
    kill[keep] = False
    d.set_killed(kill, mode)
    expected = d.encode(x)[:, keep]
    expected_out = d.decode(d.encode(x))
    d.set_killed(None)
    p = d.pruned(keep, mode)
    assert p.d_sae == 30
    torch.testing.assert_close(p.encode(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p(x), expected_out, rtol=1e-5, atol=1e-5)
    assert p.metadata["pruning"]["killed_feature_ids"] == kill.nonzero().flatten().tolist()
    # the pruned dictionary survives save -> load (shadow encoder included) and folding
    p.save(tmp_path / "p")
    q = load_dictionary(tmp_path / "p")
    assert set(q.weights()) == set(p.weights())
    torch.testing.assert_close(q.encode(x), expected, rtol=1e-5, atol=1e-5)


def test_topk_kill_modes_and_shadow_encoder():
    d = make("topk")
    x = inputs(256)
    k = d.cfg.k
    assert torch.equal((d.encode(x) != 0).sum(1), torch.full((256,), k))
    kill = torch.zeros(D_SAE, dtype=torch.bool)
    kill[:24] = True
    d.set_killed(kill, "before")
    l0_before = (d.encode(x) != 0).sum(1)
    assert torch.equal(l0_before, torch.full((256,), k))  # another latent takes the slot
    d.set_killed(kill, "after")
    l0_after = (d.encode(x) != 0).sum(1).float()
    assert l0_after.mean() < k - 1  # L0 drops
    d.set_killed(None)
    p = d.pruned(torch.arange(24, D_SAE), "after")
    assert p.W_enc_shadow.shape == (D_IN, 24) and p.b_enc_shadow.shape == (24,)
    assert torch.equal((p.encode(x) != 0).sum(1).float(), l0_after)
    # pruning a pruned dictionary again keeps the first shadow and adds the new one
    pp = p.pruned(torch.arange(10, p.d_sae), "after")
    assert pp.W_enc_shadow.shape == (D_IN, 34)
    kill2 = kill.clone()
    kill2[24:34] = True
    d.set_killed(kill2, "after")
    torch.testing.assert_close(pp.encode(x), d.encode(x)[:, 34:], rtol=1e-5, atol=1e-5)
    # folding folds the shadow encoder too
    f = copy.deepcopy(pp)
    f.fold_input_scale()
    torch.testing.assert_close(f.encode(x), pp.encode(x), rtol=1e-5, atol=1e-5)


def test_batchtopk_uses_threshold_at_inference_and_batch_selection_in_training():
    d = make("batchtopk")
    x = inputs(200)
    pre = d.pre_acts(x)
    torch.testing.assert_close(d.encode(x), torch.where((pre > d.threshold) & (pre > 0), pre, 0.0))
    # training mode: the k·200 largest pre-activations of the whole batch, not k per token
    d.train()
    f = d.encode(x)
    n = d.cfg.k * 200
    assert int((pre > 0).sum()) > n  # (so all n selected entries are positive)
    top = pre.detach().flatten().topk(n).indices
    expected = torch.zeros(pre.numel()).index_put_((top,), pre.detach().flatten()[top]).view_as(pre)
    torch.testing.assert_close(f, expected)
    assert int((f != 0).sum()) == n
    per_token = (f != 0).sum(dim=1)
    assert per_token.min() < d.cfg.k < per_token.max()
    # a training step selects the same entries and sets the threshold to the smallest of them
    d.threshold.fill_(-1.0)
    d.threshold_updates.zero_()
    out = d.training_loss(x, 0.0, None)
    assert torch.equal(out.counts(), (expected != 0).sum(dim=0).float())
    assert float(out.metrics["l0"]) == pytest.approx(n / 200)
    smallest = pre.detach().flatten().topk(n).values.min()
    torch.testing.assert_close(d.threshold, torch.full_like(d.threshold, float(smallest)), rtol=1e-4, atol=1e-4)
    assert int(d.threshold_updates) == 0  # before the averaging window (the last 0.2 of training)


def test_batchtopk_threshold_is_the_mean_over_the_last_window_of_training():
    d = make("batchtopk")
    d.train()
    xs = [inputs(200, seed=s) for s in range(4)]
    n = d.cfg.k * 200

    def smallest(x):
        return float(d.pre_acts(x).detach().flatten().topk(n).values.min())

    with torch.no_grad():
        d.training_loss(xs[0], 0.5, None)  # before the window: replaced by each batch
        d.training_loss(xs[1], 0.7, None)
        assert float(d.threshold[0]) == pytest.approx(smallest(xs[1]), abs=1e-4)
        assert int(d.threshold_updates) == 0
        d.training_loss(xs[2], 0.8, None)  # the window opens: its first batch replaces it
        d.training_loss(xs[3], 0.9, None)
    assert int(d.threshold_updates) == 2
    assert float(d.threshold[0]) == pytest.approx((smallest(xs[2]) + smallest(xs[3])) / 2, abs=1e-4)


def _grads(d, x, dead):
    d.zero_grad(set_to_none=True)
    out = d.training_loss(x, 0.5, dead)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", TOPK_STYLE)
def test_sparse_kernels_give_the_dense_gradients(arch):
    x = inputs(96)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = True  # exercises AuxK too
    results = []
    for sparse in (True, False):
        d = make(arch, sparse=sparse).train()
        if arch != "topk":
            d.threshold.fill_(-1.0)
        results.append(_grads(d, x, dead))
    (out_s, g_s), (out_d, g_d) = results
    torch.testing.assert_close(out_s.loss, out_d.loss, rtol=1e-5, atol=1e-6)
    assert "aux_loss" in out_s.metrics
    assert set(g_s) == set(g_d) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    for name in g_s:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=1e-4, atol=1e-5, msg=name)
    assert torch.equal(out_s.feature_counts, out_d.feature_counts)


def _dense_topk_loss(d, x, dead, batch_selection, prefix_ends=None):
    """TopK's training loss written out densely, in float64, from the paper's definitions:
    FVU of the top-k reconstruction plus aux_coefficient × AuxK (the residual reconstructed from
    each token's top aux_k dead latents, scaled by min(n_dead / aux_k, 1), over the same variance).
    With prefix_ends (Matryoshka): the mean FVU of the reconstructions from features [0, end)."""
    p = {n: t.detach().double().requires_grad_(True) for n, t in
         [("W_enc", d.W_enc), ("b_enc", d.b_enc), ("W_dec", d.W_dec), ("b_dec", d.b_dec)]}
    xs = x.double() * float(d.input_scale)
    pre = (xs - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    keep = torch.zeros_like(pre, dtype=torch.bool)
    if batch_selection:  # BatchTopK: the k·B largest of the whole batch
        keep.view(-1)[pre.detach().flatten().topk(d.cfg.k * x.shape[0]).indices] = True
    else:
        keep.scatter_(1, pre.detach().topk(d.cfg.k, dim=1).indices, True)
    f = torch.relu(pre) * keep
    x_hat = f @ p["W_dec"] + p["b_dec"]
    variance = (xs - xs.mean(dim=0)).pow(2).sum()
    fvu = torch.stack([(xs - f[:, :e] @ p["W_dec"][:e] - p["b_dec"]).pow(2).sum() / variance
                       for e in prefix_ends or [d.d_sae]]).mean()
    n_dead, aux_k = int(dead.sum()), d.cfg.aux_k
    dead_pre = pre.detach().masked_fill(~dead, -torch.inf)
    aux_keep = torch.zeros_like(keep).scatter_(1, dead_pre.topk(min(aux_k, n_dead), dim=1).indices, True)
    e = (xs - x_hat).detach()
    e_hat = (torch.relu(pre) * aux_keep) @ p["W_dec"]
    aux = min(n_dead / aux_k, 1.0) * (e - e_hat).pow(2).sum() / variance
    (fvu + d.cfg.aux_coefficient * aux).backward()
    return aux.detach(), {n: t.grad for n, t in p.items()}


@pytest.mark.parametrize("n_dead", [5, 20])  # fewer dead latents than aux_k (scale 5/8), and more
@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("arch", TOPK_STYLE)
def test_auxk_loss_and_gradients_match_a_dense_computation(arch, sparse, n_dead):
    x = inputs(96)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[torch.randperm(D_SAE, generator=torch.Generator().manual_seed(7))[:n_dead]] = True
    d = make(arch, sparse=sparse, aux_k=8, aux_coefficient=0.5).train()
    out, grads = _grads(d, x, dead)
    # Matryoshka's groups of make(): 8, 16 and 24 features
    ends = [8, 24, 48] if arch == "matryoshka_batchtopk" else None
    aux, expected = _dense_topk_loss(d, x, dead, batch_selection=arch != "topk", prefix_ends=ends)
    assert float(aux) > 0.01  # the term is really there
    torch.testing.assert_close(out.metrics["aux_loss"].double(), aux, rtol=1e-5, atol=0)
    for name, g in expected.items():
        torch.testing.assert_close(grads[name].double(), g, rtol=1e-4, atol=1e-6, msg=name)


def test_sparse_ops_gradcheck():
    g = torch.Generator().manual_seed(0)
    B, d_in, d_sae, k = 5, 4, 7, 3
    x = torch.randn(B, d_in, dtype=torch.float64, generator=g)
    W_enc = torch.randn(d_in, d_sae, dtype=torch.float64, generator=g, requires_grad=True)
    b_enc = torch.randn(d_sae, dtype=torch.float64, generator=g, requires_grad=True)
    b_dec = torch.randn(d_in, dtype=torch.float64, generator=g, requires_grad=True)
    W_dec = torch.randn(d_sae, d_in, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.stack([torch.randperm(d_sae, generator=g)[:k] for _ in range(B)])
    rows, cols = torch.arange(B).repeat_interleave(k), idx.flatten()

    def f(W_enc, b_enc, b_dec, W_dec):
        pre = ((x - b_dec) @ W_enc + b_enc).detach()
        vals = selected_pre_acts(pre[rows, cols], x, W_enc, b_enc, b_dec, rows, cols)
        return sparse_decode(vals, rows, cols, W_dec, B)

    assert torch.autograd.gradcheck(f, (W_enc, b_enc, b_dec, W_dec))
    out = grouped_sum(x, torch.tensor([0, 1, 2]), torch.tensor([2, 0, 2]), torch.tensor([1.0, 2.0, 3.0],
                      dtype=torch.float64), 4)
    torch.testing.assert_close(out, torch.stack([2 * x[1], torch.zeros(d_in, dtype=torch.float64),
                                                 x[0] + 3 * x[2], torch.zeros(d_in, dtype=torch.float64)]))


def test_jumprelu_straight_through_gradients():
    d = make("jumprelu", bandwidth=0.5, l0_coefficient=1.0, sparsity_warmup_fraction=0.0).train()
    z = torch.tensor([[0.1, 0.9, 1.1, 2.0]], requires_grad=True)
    theta = torch.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True)
    jumprelu(z, theta, 0.5).sum().backward()
    # dz = H(z - θ); dθ = -(θ/ε) K((z-θ)/ε): K = 1 for |z - θ| < ε/2
    torch.testing.assert_close(z.grad, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -2.0, -2.0, 0.0]))
    z.grad = theta.grad = None
    heaviside_step(z, theta, 0.5).sum().backward()
    torch.testing.assert_close(z.grad, torch.zeros_like(z))
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -2.0, -2.0, 0.0]))
    out = d.training_loss(inputs(), 1.0, None)
    out.loss.backward()
    assert d.threshold.grad is not None and d.threshold.grad.abs().sum() > 0


def test_jumprelu_straight_through_estimate_reaches_the_input_when_asked():
    z = torch.tensor([[0.1, 0.9, 1.1, 2.0]], requires_grad=True)
    theta = torch.tensor([1.0, 1.0, 1.0, 1.0], requires_grad=True)
    jumprelu(z, theta, 0.5, ste_to_input=True).sum().backward()
    # dz = H(z - θ) + (θ/ε) K((z-θ)/ε); dθ unchanged
    torch.testing.assert_close(z.grad, torch.tensor([[0.0, 2.0, 3.0, 1.0]]))
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -2.0, -2.0, 0.0]))
    z.grad = theta.grad = None
    heaviside_step(z, theta, 0.5, ste_to_input=True).sum().backward()
    torch.testing.assert_close(z.grad, torch.tensor([[0.0, 2.0, 2.0, 0.0]]))
    torch.testing.assert_close(theta.grad, torch.tensor([0.0, -2.0, -2.0, 0.0]))


def test_gated_gate_bias_starts_and_resamples_at_b_gate_init():
    cfg = parse_dictionary_config({"architecture": "gated", "d_sae": D_SAE, "b_gate_init": -0.75})
    d = get_architecture("gated")(cfg, D_IN)
    assert torch.equal(d.b_enc, torch.full_like(d.b_enc, -0.75))
    with torch.no_grad():
        d.b_enc.fill_(0.3)
    d.resample(inputs(), torch.arange(d.d_sae) < 3)
    assert d.b_enc[:3].tolist() == [-0.75] * 3 and d.b_enc[3:].eq(0.3).all()


def test_unit_norm_decoder_projection():
    d = make("relu").train()
    with torch.no_grad():
        d.W_dec.div_(d.W_dec.norm(dim=1, keepdim=True))
    opt = torch.optim.Adam(d.parameters(), lr=1e-2)
    out = d.training_loss(inputs(), 1.0, None)
    out.loss.backward()
    d.before_optimizer_step()
    assert (d.W_dec.grad * d.W_dec).sum(1).abs().max() < 1e-4  # no parallel component left
    opt.step()
    d.after_optimizer_step()
    torch.testing.assert_close(d.W_dec.norm(dim=1), torch.ones(D_SAE))
    april = make("relu_april").train()
    assert not april.unit_norm_decoder


def test_resampling_reinitialises_dead_features_and_resets_adam_rows():
    d = make("relu", resample_every_tokens=1000).train()
    with torch.no_grad():
        d.W_dec.div_(d.W_dec.norm(dim=1, keepdim=True))
    d.input_scale.fill_(1.0)
    opt = torch.optim.Adam(d.parameters(), lr=1e-3)
    x = inputs(256)
    d.training_loss(x, 0.5, None).loss.backward()
    opt.step()
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[[1, 5, 7]] = True
    live_norm = d.W_enc[:, ~dead].norm(dim=0).mean()
    ids = d.resample(x, dead, torch.Generator().manual_seed(0))
    assert ids.tolist() == [1, 5, 7]
    reset_optimizer_rows(opt, d, ids)
    torch.testing.assert_close(d.W_dec[ids].norm(dim=1), torch.ones(3))
    torch.testing.assert_close(d.W_enc[:, ids].norm(dim=0), torch.full((3,), 0.2 * float(live_norm.detach())))
    assert torch.equal(d.b_enc[ids], torch.zeros(3))
    state = opt.state[d.W_enc]
    assert state["exp_avg"][:, ids].abs().sum() == 0 and state["exp_avg_sq"][:, ids].abs().sum() == 0
    assert state["exp_avg"][:, ~dead].abs().sum() > 0
    assert opt.state[d.W_dec]["exp_avg"][ids].abs().sum() == 0
    assert opt.state[d.b_enc]["exp_avg"][ids].abs().sum() == 0


def test_topk_default_lr_scales_with_width():
    d = make("topk", d_sae=1024)
    assert math.isclose(d.lr, 2e-3 / math.sqrt(1024 / 16384))
    assert make("topk", d_sae=64).lr == 2e-2  # capped: the law would give 0.032
    assert make("topk", d_sae=64, lr=1e-3).lr == 1e-3


def test_training_loss_reports_counts_for_every_architecture():
    x = inputs(32)
    for arch in ARCHS:
        d = make(arch).train()
        out = d.training_loss(x, 0.5, torch.zeros(D_SAE, dtype=torch.bool))
        assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert out.x_hat.shape == x.shape
        counts = out.counts()
        assert counts.shape == (D_SAE,) and counts.sum() > 0


@pytest.mark.parametrize("arch", ARCHS)
def test_a_bfloat16_dictionary_takes_float32_activations(arch):
    """sae.load(..., dtype=torch.bfloat16) next to a float32 model: encode/decode/forward cast the
    input to the weights' dtype instead of failing in the matmul."""
    d = make(arch).eval()
    x = inputs(32)
    low = copy.deepcopy(d).to(torch.bfloat16)
    f = low.encode(x)
    assert f.dtype == torch.bfloat16 and low.decode(f.float()).dtype == torch.bfloat16
    # (threshold architectures may flip a feature sitting on its threshold: compare as a whole)
    with torch.no_grad():
        assert float((low(x).float() - d(x)).norm() / d(x).norm()) < 0.05


def test_relu_recipe_defaults_are_resolved_in_the_config():
    classic = parse_dictionary_config({"architecture": "relu", "d_sae": 8})
    assert (classic.l1_coefficient, classic.sparsity_warmup_fraction, classic.normalize_decoder) == (1.0, 0.0, True)
    april = parse_dictionary_config({"architecture": "relu", "d_sae": 8, "recipe": "april2024",
                                     "l1_coefficient": 2.0, "sparsity_warmup_fraction": None})
    assert (april.l1_coefficient, april.sparsity_warmup_fraction, april.normalize_decoder) == (2.0, 0.05, False)
    classic.recipe = "april2024"  # what its author left out follows the recipe
    assert (classic.l1_coefficient, classic.sparsity_warmup_fraction, classic.normalize_decoder) == (5.0, 0.05, False)
    # the recipe's fixed parts: the april2024 dictionary starts with decoder rows of norm 0.1, its lr
    # is the width law's (capped at MAX_DEFAULT_LR for 8 features)
    d = get_architecture("relu")(classic, D_IN)
    torch.testing.assert_close(d.W_dec.norm(dim=1), torch.full((8,), 0.1))
    assert d.lr == MAX_DEFAULT_LR and not d.unit_norm_decoder
    # as written: what names and checkpoint fingerprints are built from
    assert april.as_written().model_dump(exclude_defaults=True) == {
        "d_sae": 8, "recipe": "april2024", "l1_coefficient": 2.0}
