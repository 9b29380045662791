"""The frequencies that decide pruning's kill sets come from training tokens, never from the held-out
tokens the pruned dictionaries are scored on: the slice of the cache read, the model pass, and the
training run's prune block end to end (its kill tokens and its evaluation tokens share no document)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from transformer_lens.model_bridge import TransformerBridge

from eval.evaluate import evaluate_dictionaries
from eval.kill_frequency import CacheSlice, TrainingSplitPass, measure_kill_frequencies, run_training_activations
from eval.prune import kill_mask_from_frequency
from eval_helpers import HOOK, RandomReLU, make_tokens
from pipeline import run_experiment
from sae.cache import Manifest, harvest, load_shard
from sae.config import load_run_config
from sae.errors import CacheError, UserError
from sae.loading import load_dictionary
from sae.means import means_from_model
from sae.text import is_heldout, keep_mask, load_contexts


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return TransformerBridge.boot_transformers(str(tiny_model_dir), device="cpu").eval()


@pytest.fixture(scope="module")
def cached(model, tmp_path_factory):
    """A harvested cache of 20 contexts (5 per shard), its tokens and keep mask."""
    tokens, keep = make_tokens(model.tokenizer, n_ctx=20, seed=3)
    manifest = harvest(model, tokens, keep, [HOOK], tmp_path_factory.mktemp("cache") / "c",
                       identity={"model": "tiny"}, contexts_per_shard=5, batch_contexts=4, progress=False)
    return manifest, tokens, keep


def _plain_frequency(d, rows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ((d.encode(rows) != 0).sum(dim=0).double() / rows.shape[0]).float()


def test_cache_slice_is_the_first_kept_tokens_in_text_order(model, cached):
    manifest, tokens, keep = cached
    with torch.no_grad():
        _, acts = model.run_with_cache(tokens, names_filter=[HOOK])
    in_text_order = acts[HOOK][keep]  # [n_kept, d_in], context by context
    n = 100  # not a whole number of shards: the last shard read is cut
    rows = torch.cat([b[HOOK] for b in CacheSlice(manifest.cache_dir, n).batches([HOOK], progress=False)])
    assert rows.shape[0] == n
    torch.testing.assert_close(rows, in_text_order[:n], rtol=1e-5, atol=1e-6)
    everything = CacheSlice(manifest.cache_dir, 10**9)
    assert everything.n_tokens == int(keep.sum())  # a cache smaller than asked: all of it
    with pytest.raises(CacheError, match="no hook point"):
        next(CacheSlice(manifest.cache_dir, n).batches(["blocks.1.hook_mlp_out"], progress=False))


def test_measured_frequencies_equal_the_plain_count(model, cached):
    """Cache slice and model pass over the same tokens give the same frequencies as encoding the
    activations in one go, for several dictionaries at once."""
    manifest, tokens, keep = cached
    dicts = {"a": RandomReLU.make(d_sae=96, seed=2), "b": RandomReLU.make(d_sae=40, seed=5)}
    n_ctx = 10  # two whole shards
    n_kept = int(keep[:n_ctx].sum())
    from_cache = measure_kill_frequencies(dicts, CacheSlice(manifest.cache_dir, n_kept), progress=False)
    from_model = measure_kill_frequencies(dicts, TrainingSplitPass(model, tokens[:n_ctx], keep[:n_ctx], 4, "test"),
                                          progress=False)
    rows = torch.cat([load_shard(manifest, i, [HOOK])[HOOK] for i in (0, 1)])
    assert from_cache.tokens == from_model.tokens == n_kept == rows.shape[0]
    assert "activation cache" in from_cache.source and from_model.source == "test"
    for name, d in dicts.items():
        expected = _plain_frequency(d, rows)
        assert 0 < int((expected > 0).sum()) < d.d_sae  # some features fire, some never
        assert torch.equal(from_cache.frequency[name], expected)
        assert torch.equal(from_model.frequency[name], expected)
    with pytest.raises(UserError, match="d_in=16 but the training activations have width 32"):
        measure_kill_frequencies({"narrow": RandomReLU.make(d_in=16)}, CacheSlice(manifest.cache_dir, 10),
                                 progress=False)


def test_run_without_a_cache_measures_on_the_training_split(model, tmp_path, tiny_text_file):
    from sae.text import DataConfig

    data_cfg = DataConfig(source=str(tiny_text_file), context_size=16)
    source = run_training_activations(tmp_path / "no-cache", model, data_cfg, 300, batch_contexts=4)
    assert isinstance(source, TrainingSplitPass) and "training-split pass" in source.description
    assert torch.equal(source.tokens, load_contexts(data_cfg, model.tokenizer, "train", 300))


def test_run_kill_sets_come_from_training_tokens(model, tmp_path):
    """evaluate_run's prune block and ablation kill by the frequencies on the training tokens given,
    not by those on the held-out tokens everything is evaluated on: a threshold between the two
    tells them apart."""
    from eval.run import evaluate_run
    from sae.config import AblationConfig, PruneConfig

    heldout, heldout_keep = make_tokens(model.tokenizer)
    train, train_keep = make_tokens(model.tokenizer, n_ctx=11, seed=5)
    means = means_from_model(model, [HOOK], train, train_keep)
    d = RandomReLU.make(d_sae=96, seed=2)
    on_train, on_heldout = (evaluate_dictionaries(model, {"d": d}, t, k, train_means=means, progress=False)["d"]
                            .frequency for t, k in ((train, train_keep), (heldout, heldout_keep)))
    i = int((on_train - on_heldout).abs().argmax())
    t = float(f"{float(on_train[i] + on_heldout[i]) / 2:.6g}")
    killed = kill_mask_from_frequency(on_train, max_frequency=t)
    assert not torch.equal(killed, kill_mask_from_frequency(on_heldout, max_frequency=t))

    d.save(tmp_path / "d")
    prune = PruneConfig(dictionaries=["d"], max_frequency=[t], ablation=AblationConfig(dictionary="d", thresholds=[t]))
    with pytest.raises(ValueError, match="needs training_activations"):
        evaluate_run(model, {"d": d}, {"d": tmp_path / "d"}, tmp_path, heldout, heldout_keep, means, prune=prune)
    results = evaluate_run(model, {"d": d}, {"d": tmp_path / "d"}, tmp_path, heldout, heldout_keep, means,
                           prune=prune, training_activations=TrainingSplitPass(model, train, train_keep, 4, "train"),
                           batch_size=5, progress=False)
    record = load_dictionary(tmp_path / f"d-pruned-{t:g}").metadata["pruning"]
    assert record["killed_feature_ids"] == killed.nonzero().flatten().tolist()
    assert record["frequency_source"] == "train" and record["frequency_tokens"] == int(train_keep.sum())
    ablation = json.loads((tmp_path / "ablation" / "ablation.json").read_text())
    assert ablation["frequency_source"] == "train" and ablation["frequency_tokens"] == int(train_keep.sum())
    assert ablation["thresholds"][0]["killed"] == int(killed.sum())
    assert ablation["tokens_evaluated"] == results["d"]["tokens_evaluated"] == int(heldout_keep.sum())
    # eval.json's frequency stays the held-out measurement
    assert torch.equal(results["d"].frequency, on_heldout)


# ---- a training run, end to end ------------------------------------------------------------------

RUN = """
run_name: kill
output_dir: {out}
model: {model}
hooks: [blocks.1.hook_mlp_out]
data: {{source: {text}, context_size: 64, heldout_fraction: 0.1}}
train_tokens: 2048
eval_tokens: 384
harvest: {{mode: {mode}, contexts_per_shard: 8}}
train: {{batch_size: 256}}
eval: {{enabled: false}}
dictionaries:
  - {{name: relu, architecture: relu, expansion_factor: 3, l1_coefficient: 0.1}}
"""
FREQUENCY_TOKENS = 700  # fewer than the cache holds (about 2,000): a slice of it


def _documents(tokens: torch.Tensor, tokenizer) -> set[str]:
    """The whole documents inside contexts [n_ctx, ctx] (between two EOS of one context), as text."""
    docs = set()
    for row in tokens.tolist():
        segments, current = [], []
        for token in row[1:]:  # after BOS
            if token == tokenizer.eos_token_id:
                segments.append(current)
                current = []
            else:
                current.append(token)
        docs.update(tokenizer.decode(s) for s in segments[1:] if s)  # the first may be a document's tail
    return docs


def _kill_tokens(run, model, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What the kill decisions must have read: the contexts holding the first FREQUENCY_TOKENS kept
    tokens of the cache (disk), or the first FREQUENCY_TOKENS of the training split (stream), and
    those kept tokens' activations."""
    if mode == "stream":
        tokens = load_contexts(run.data, model.tokenizer, "train", FREQUENCY_TOKENS)
        keep = keep_mask(tokens, model.tokenizer, run.data.exclude_tokens)
        with torch.no_grad():
            _, acts = model.run_with_cache(tokens, names_filter=run.hooks)
        return tokens, acts[run.hooks[0]][keep]
    manifest = Manifest.load(run.cache_dir)
    shards = [load_shard(manifest, s.index) for s in sorted(manifest.shards, key=lambda s: s.index)]
    tokens, keep = torch.cat([s["tokens"] for s in shards]), torch.cat([s["keep_mask"] for s in shards])
    n_ctx = int((keep.sum(dim=1).cumsum(0) < FREQUENCY_TOKENS).sum()) + 1
    return tokens[:n_ctx], torch.cat([s[run.hooks[0]] for s in shards])[:FREQUENCY_TOKENS]


@pytest.mark.parametrize("mode", ["disk", "stream"])
def test_run_prunes_on_training_tokens_disjoint_from_the_heldout_ones(tmp_path, model, tiny_model_dir,
                                                                      tiny_text_file, mode):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(RUN).format(out=tmp_path, model=tiny_model_dir, text=tiny_text_file, mode=mode))
    run, configs = load_run_config(path)
    run_experiment(run, configs)  # train only
    d = load_dictionary(run.run_dir / "relu")
    kill_contexts, kill_rows = _kill_tokens(run, model, mode)
    heldout = load_contexts(run.data, model.tokenizer, "heldout", run.eval_tokens)
    # The two token sets share no document, and the split of each is the one sae.text assigns.
    kill_docs, heldout_docs = _documents(kill_contexts, model.tokenizer), _documents(heldout, model.tokenizer)
    assert len(kill_docs) >= 10 and len(heldout_docs) >= 3
    assert not kill_docs & heldout_docs
    assert not any(is_heldout(doc, 0.1) for doc in kill_docs) and all(is_heldout(doc, 0.1) for doc in heldout_docs)

    # Prune at a threshold that separates the frequencies on those training tokens from those on
    # the held-out ones, evaluating the dictionaries trained above.
    on_train = _plain_frequency(d, kill_rows)
    heldout_keep = keep_mask(heldout, model.tokenizer, run.data.exclude_tokens)
    with torch.no_grad():
        _, acts = model.run_with_cache(heldout, names_filter=run.hooks)
    on_heldout = _plain_frequency(d, acts[run.hooks[0]][heldout_keep])
    i = int((on_train - on_heldout).abs().argmax())
    t = float(f"{float(on_train[i] + on_heldout[i]) / 2:.6g}")
    run, configs = load_run_config(path, ["eval.enabled=true", f"prune={{dictionaries: [relu], max_frequency: [{t}], "
                                          f"frequency_tokens: {FREQUENCY_TOKENS}}}"])
    results = run_experiment(run, configs)
    record = json.loads((run.run_dir / f"relu-pruned-{t:g}" / "cfg.json").read_text())["pruning"]
    killed = kill_mask_from_frequency(on_train, max_frequency=t)
    assert record["killed_feature_ids"] == killed.nonzero().flatten().tolist()
    assert not torch.equal(killed, kill_mask_from_frequency(on_heldout, max_frequency=t))
    assert record["frequency_tokens"] == kill_rows.shape[0]
    assert ("activation cache" if mode == "disk" else "training-split pass") in record["frequency_source"]
    assert results["relu"]["tokens_evaluated"] == int(heldout_keep.sum())
