"""python -m eval features: frequencies, top and quantile contexts, logit lens and nearest tokens
checked against a brute-force computation, and the HTML page rendered in headless chromium."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest
import torch

from eval.__main__ import main
from eval.evaluate import data_config_for, heldout_tokens
from eval.features import choose_contexts, parse_ids, render_html, select_features
from loading_helpers import HOOK, random_dictionary
from sae.errors import UserError
from sae.models import load_model

CTX = 16


@pytest.fixture(scope="module")
def page(tmp_path_factory, tiny_model_dir, tiny_text_file):
    """A dictionary folder, the features command run on it, and the brute-force truth."""
    root = tmp_path_factory.mktemp("features")
    d = random_dictionary("topk", k=8, metadata={
        "model_name": str(tiny_model_dir), "hook_name": HOOK, "context_size": CTX,
        "dataset": {"source": str(tiny_text_file), "context_size": CTX, "heldout_fraction": 0.3}})
    d.save(root / "dict")
    model = load_model(str(tiny_model_dir))
    tokens, keep = heldout_tokens(model, data_config_for(d), 512)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=[HOOK])
        f = d.encode(cache[HOOK]) * keep[..., None]
    freq = (f != 0).sum(dim=(0, 1)) / keep.sum()
    features = [int((freq - target).abs().argmin()) for target in (0.05, 0.3)]  # a rare one, a common one

    main(["features", str(root / "dict"), "--features", ",".join(map(str, features)), "--tokens", "512",
          "--top", "5", "--device", "cpu", "--out", str(root / "out")])
    data = json.loads((root / "out" / "features.json").read_text())
    return {"root": root, "data": data, "d": d, "model": model, "tokens": tokens, "keep": keep, "f": f,
            "features": features}


def test_json_holds_the_real_top_contexts(page):
    data, f, tokens, keep = page["data"], page["f"], page["tokens"], page["keep"]
    assert [feat["id"] for feat in data["features"]] == page["features"]
    assert data["tokens_scanned"] == int(keep.sum()) and data["hook"] == HOOK
    for feat in data["features"]:
        i = feat["id"]
        fi = f[..., i]
        assert feat["frequency"] == pytest.approx(((fi != 0).sum() / keep.sum()).item(), rel=1e-6)
        assert 0 < feat["frequency"] < 1
        ctx_max = fi.amax(dim=1)
        want = ctx_max.argsort(descending=True, stable=True)[:5].tolist()
        assert [ex["context"] for ex in feat["top_examples"]] == want
        assert feat["max_activation"] == pytest.approx(ctx_max.max().item(), abs=1e-4)
        best = feat["top_examples"][0]
        pos = int(fi[want[0]].argmax())
        assert best["position"] == pos and best["max"] == pytest.approx(fi[want[0], pos].item(), abs=1e-4)
        assert best["tokens"][best["highlight"]] == page["model"].tokenizer.decode([int(tokens[want[0], pos])])
        shown = {ex["context"] for q in feat["quantile_examples"] for ex in q["examples"]}
        assert shown and not shown & set(want) and all(ctx_max[c] > 0 for c in shown)
        # logit lens / nearest tokens of the decoder direction
        logits = page["d"].W_dec.detach()[i] @ page["model"].W_U.detach()
        assert feat["promoted"][0][0] == page["model"].tokenizer.decode([int(logits.argmax())])
        assert feat["suppressed"][0][1] == pytest.approx(logits.min().item(), abs=1e-4)
        cos = torch.nn.functional.cosine_similarity(page["d"].W_dec.detach()[i][None], page["model"].W_E.detach())
        assert feat["nearest_tokens"][0][1] == pytest.approx(cos.max().item(), abs=1e-4)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_page_renders_in_headless_chromium(page):
    path = page["root"] / "out" / "features.html"
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", path.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'data-rendered="2"' in dom  # the inline script ran to the end
    for feat in page["data"]["features"]:
        section = dom.split(f'id="feature-{feat["id"]}"', 1)[1].split("</section>", 1)[0]
        first = section.split('<div class="example">', 2)[1].split("</div>", 1)[0]
        spans = re.findall(r'<span class="tok( peak)?"([^>]*)>(.*?)</span>', first)
        assert [html.unescape(text) for _, _, text in spans] == feat["top_examples"][0]["tokens"]
        peak = [attrs for is_peak, attrs, _ in spans if is_peak]
        assert len(peak) == 1 and "background: rgb(255, 120, 0)" in peak[0]  # the maximum: full colour
        others = [attrs for is_peak, attrs, _ in spans if not is_peak]
        assert all("rgb(255, 120, 0)" not in a for a in others)  # lighter or none
        assert f"Feature {feat['id']}" in section and "Logit lens: promoted" in section

    tricky = page["root"] / "tricky.html"
    tricky.write_text(render_html(_tricky_page_data()))
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", tricky.as_uri()],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert 'data-rendered="1"' in dom and "alert(1)" in html.unescape(dom)


def _tricky_page_data():
    """Tokens that break naive pages: a script end tag, newlines, quotes, backslashes."""
    return {"name": "<b>x</b>", "architecture": "relu", "d_in": 2, "d_sae": 3, "model": "m", "hook": "h",
            "dataset": {"source": "s"}, "selection": "given", "tokens_scanned": 1, "contexts_scanned": 1,
            "features": [{"id": 0, "frequency": 0.5, "max_activation": 1.0, "active_contexts": 1,
                          "top_examples": [{"context": 0, "position": 0, "max": 1.0, "highlight": 0,
                                            "tokens": ["</script><script>alert(1)</script>", "\\n\n'\"`"],
                                            "activations": [1.0, 0.5]}], "quantile_examples": []}]}


def test_page_is_self_contained_and_escapes_text():
    page = render_html(_tricky_page_data())
    assert "</script><script>alert" not in page and "<title>features of &lt;b>x&lt;/b></title>" in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # nothing fetched from the network


def test_selection_and_contexts():
    freq = torch.tensor([0.0, 0.01, 0.2, 0.05, 0.5, 0.0])
    assert select_features(freq, [4, 1, 4], None, None, None, 0)[0] == [4, 1]
    ids, how = select_features(freq, None, 2, 0.02, 0.3, 0)
    assert sorted(ids) == [2, 3] and "2 at random" in how
    assert set(select_features(freq, None, None, None, None, 0)[0]) == {1, 2, 3, 4}  # dead ones never
    with pytest.raises(UserError, match="out of range"):
        select_features(freq, [6], None, None, None, 0)
    with pytest.raises(UserError, match="no feature fires"):
        select_features(freq, None, 3, 0.6, None, 0)
    with pytest.raises(UserError, match="comma-separated"):
        parse_ids("4,x")
    ctx_max = torch.tensor([0.0, 5.0, 1.0, 3.0, 0.5, 2.0, 0.0, 4.0])
    top, bins = choose_contexts(ctx_max, 2, 2, 1, torch.Generator().manual_seed(0))
    assert top == [1, 7]
    assert len(bins) == 2 and bins[0]["contexts"][0] in (4, 2) and bins[1]["contexts"][0] in (5, 3)


def test_cli_errors_are_one_line(page, capsys):
    with pytest.raises(SystemExit) as e:
        main(["features", str(page["root"] / "dict"), "--features", "4000", "--tokens", "64", "--device", "cpu"])
    assert e.value.code == 2 and "out of range" in capsys.readouterr().err
