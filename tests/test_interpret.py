"""Looking inside a prefix: the frame is right (text projects back to its tokens), scores mean
something (random sits at the baseline), and every readout matches a hand computation."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from prefixlab.engine.families import family_of
from prefixlab.engine.models import get_module
from prefixlab.engine.prefix import save_prefix, text_key_values
from prefixlab.interpret import bank as B
from prefixlab.interpret import maps as M
from prefixlab.interpret.attention import attention_maps, prefix_attention
from prefixlab.interpret.frame import KINDS, InterpretError, key_frame
from prefixlab.interpret.nearest import CAVEAT, nearest_tokens, ordinary_token_ids
from prefixlab.interpret.values import value_readout
from prefixlab.runs import inspection
from prefixlab.runs.config import RunConfig
from prefixlab.runs.folder import RunFolder

TEXT = "the movie was"  # 10 distinct tokens with the test tokenizer
_USER_CACHE = os.environ.get("PREFIXLAB_CACHE")


@pytest.fixture(autouse=True)
def isolated_cache(monkeypatch, tmp_path):
    """Banks go to a fresh folder, never to the user's cache."""
    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models gain nothing from threads, and on a shared 2-core CPU two threads made
    these tests up to 100x slower (spin-waiting on busy cores); the real model keeps them."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _ids(loaded, text):
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


def _random_like(kv, seed=0):
    g = torch.Generator().manual_seed(seed)
    scale = kv.std(dim=(2, 3, 4), keepdim=True)  # (L, 2, 1, 1, 1), as init_prefix("random")
    return torch.randn(kv.shape, generator=g) * scale


@pytest.mark.parametrize("shortlist", [16, None])
def test_text_prefix_projects_back_to_its_tokens_at_every_layer(loaded, shortlist):
    ids = _ids(loaded, TEXT)
    assert len(set(ids)) == len(ids)
    P = len(ids) + 3  # the text repeats to fill P: positions 10..12 are its first tokens again
    kv = text_key_values(loaded.model, loaded.tokenizer, TEXT, P)
    bank = B.reference_bank(loaded, 2000, extra_ids=ids)
    result = nearest_tokens(loaded, kv, bank, top_k=5, shortlist=shortlist)
    expected = np.array((ids * 2)[:P])
    L = loaded.shape.num_layers
    assert result.token_ids.shape == (L, 2, P, 5)
    np.testing.assert_array_equal(result.token_ids[..., 0],
                                  np.broadcast_to(expected, (L, 2, P)))
    assert result.scores[..., 0].min() > 0.9999
    assert (result.scores[..., 0] > result.scores[..., 1]).all()  # a clear winner
    assert (result.margin > 0.2).all()
    vocabulary = len(ordinary_token_ids(loaded.tokenizer, loaded.model.config.vocab_size))
    assert (result.ranked_among[0] == vocabulary).all()  # layer 0: the whole vocabulary
    if shortlist is None:
        assert (result.ranked_among[1:] >= len(bank.token_ids)).all()
    else:
        assert (result.ranked_among[1:] < len(bank.token_ids)).all()


def test_words_outside_a_small_bank_read_back_from_the_whole_vocabulary(loaded):
    # The bank holds the 20 lowest ids; the text's tokens are all beyond it. Layer 0 ranks the
    # whole vocabulary, and its matches join the deeper layers' shortlists, so the text still
    # reads back at rank 1 everywhere.
    bank = B.reference_bank(loaded, 20)
    vocab = len(loaded.tokenizer)
    assert vocab > 2 * len(bank.token_ids)
    ids = [i for i in _ids(loaded, TEXT) if i not in bank.token_ids]
    assert len(ids) >= 3
    text = loaded.tokenizer.decode(ids[:3])
    ids = _ids(loaded, text)
    kv = text_key_values(loaded.model, loaded.tokenizer, text, len(ids))
    result = nearest_tokens(loaded, kv, bank, top_k=3)
    L = loaded.shape.num_layers
    np.testing.assert_array_equal(result.token_ids[..., 0], np.broadcast_to(ids, (L, 2, len(ids))))
    assert not set(ids) & set(bank.token_ids)
    bank_only = nearest_tokens(loaded, kv, bank, top_k=3, vocabulary=False)
    assert not set(bank_only.token_ids[0].ravel()) & set(ids)  # what the old bank-only view saw


def test_layer_zero_from_the_kept_vocabulary_equals_reading_it_slot_by_slot(loaded):
    bank = B.reference_bank(loaded, 20)
    if family_of(loaded.model.config).rope == "none":
        assert bank.vocabulary is None  # learned positions: layer 0 depends on the slot
        return
    assert bank.vocabulary is not None
    assert bank.vocabulary.token_ids == ordinary_token_ids(loaded.tokenizer,
                                                             loaded.model.config.vocab_size)
    kv = _random_like(text_key_values(loaded.model, loaded.tokenizer, TEXT, 5), seed=4)
    kv = 0.5 * kv + text_key_values(loaded.model, loaded.tokenizer, TEXT, 5)
    kept = nearest_tokens(loaded, kv, bank, top_k=5)
    streamed = nearest_tokens(loaded, kv, replace(bank, vocabulary=None), top_k=5)
    np.testing.assert_array_equal(kept.token_ids, streamed.token_ids)
    np.testing.assert_allclose(kept.scores, streamed.scores, atol=1e-5)
    # the baseline draws other random directions in the frame: the same law, not the same draws
    np.testing.assert_allclose(kept.baseline[0], streamed.baseline[0], atol=0.15)


def test_random_prefix_scores_sit_near_the_random_baseline(loaded):
    kv = text_key_values(loaded.model, loaded.tokenizer, TEXT, 8)
    bank = B.reference_bank(loaded, 2000)
    result = nearest_tokens(loaded, _random_like(kv), bank, top_k=3, samples=64)
    gap = result.scores[..., 0] - result.baseline  # (L, 2, P)
    assert abs(gap.mean()) < 0.05
    assert (np.abs(gap) < 3 * result.baseline_std + 0.05).mean() > 0.9
    text = nearest_tokens(loaded, kv, bank, top_k=3, samples=64)
    assert text.margin.mean() > 0.3


def test_key_frame_undoes_rope_and_layer_zero_matches_the_bank(loaded):
    ids = _ids(loaded, TEXT)
    kv = text_key_values(loaded.model, loaded.tokenizer, TEXT, len(ids))
    framed = key_frame(loaded, kv)
    torch.testing.assert_close(key_frame(loaded, framed, inverse=True), kv,
                               atol=1e-5, rtol=1e-5)
    if family_of(loaded.model.config).rope != "none":
        assert not torch.allclose(framed[:, 0, :, 1:], kv[:, 0, :, 1:])
    torch.testing.assert_close(framed[:, 1], kv[:, 1])  # values are never rotated
    # Layer 0 reads no context: at position 1, where the bank reads its tokens, the text's
    # layer-0 key/values are the bank's (up to its float16 storage). With RoPE, keys in the
    # frame and values match at every position; learned absolute positions differ elsewhere.
    bank = B.reference_bank(loaded, 2000, extra_ids=ids)
    rows = [bank.token_ids.index(i) for i in ids]
    keys, values = framed[0].transpose(1, 2).flatten(2)  # (P, H*D) each
    close = dict(atol=2e-2, rtol=2e-3)
    torch.testing.assert_close(keys[1], bank.keys[0, rows[1]], **close)
    torch.testing.assert_close(values[1], bank.values[0, rows[1]], **close)
    if family_of(loaded.model.config).rope != "none":
        torch.testing.assert_close(keys, bank.keys[0, rows], **close)
        torch.testing.assert_close(values, bank.values[0, rows], **close)


@pytest.mark.parametrize("kind", ["key", "value"])
def test_prefix_placed_on_reference_tokens_lands_on_them_in_pca(loaded, kind):
    bank = B.reference_bank(loaded, 2000)
    L, H, D = loaded.shape.num_layers, loaded.shape.num_kv_heads, loaded.shape.head_dim
    rows = [3, 17, 42, 5, 99]
    P, layer = len(rows), L - 1
    kv = torch.randn(L, 2, H, P, D)
    for i in range(2):
        placed = bank.vectors(KINDS[i])[layer, rows].view(P, H, D).transpose(0, 1)  # (H,P,D)
        kv[layer, i] = placed
    kv = key_frame(loaded, kv, inverse=True)  # bank keys are in the frame: rotate to 0..P-1
    result = M.pca_map(loaded, bank, {"placed": kv, "other": _random_like(kv)}, layer, kind)
    assert result.cloud.shape == (len(bank.token_ids), 3)
    np.testing.assert_allclose(result.prefixes["placed"], result.cloud[rows], atol=1e-4)
    assert result.explained_variance.sum() <= 1 + 1e-6


def test_layers_map_is_in_units_of_the_cloud(loaded):
    bank = B.reference_bank(loaded, 2000)
    kv = text_key_values(loaded.model, loaded.tokenizer, TEXT, 6)
    result = M.layers_map(loaded, bank, kv, "key")
    assert result.coords.shape == (loaded.shape.num_layers, 6, 2)
    assert result.cloud.shape[1] == len(result.tokens) <= 200
    np.testing.assert_allclose(result.cloud.std(axis=1)[:, 0], 1.0, atol=0.25)  # cloud units
    assert (result.coords.mean(axis=1) >= 0).all()  # signs fixed: the prefix mean is positive
    far = M.layers_map(loaded, bank, kv * 50, "key")
    assert np.abs(far.coords).max() > np.abs(result.coords).max()


def test_pca_fit_matches_sklearn():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(1)
    for shape in [(300, 12), (5, 40)]:  # covariance path, thin-SVD path
        x = rng.normal(size=shape) * np.linspace(3, 0.5, shape[1])
        ours, ref = M._fit_pca(x, 3), PCA(3).fit(x)
        np.testing.assert_allclose(ours.explained_variance_ratio_, ref.explained_variance_ratio_,
                                   rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(np.abs(ours.transform(x)), np.abs(ref.transform(x)),
                                   rtol=1e-3, atol=1e-4)  # the same axes, up to sign


def test_every_layers_map_at_once_equals_each_layer_alone(loaded):
    bank = B.reference_bank(loaded, 300)
    kv = _random_like(text_key_values(loaded.model, loaded.tokenizer, TEXT, 6), seed=2)
    maps = M.layer_pca_maps(loaded, bank, kv, "value", dims=3)
    assert len(maps) == loaded.shape.num_layers
    for layer, m in enumerate(maps):
        alone = M.pca_map(loaded, bank, kv, layer, "value", dims=3)
        np.testing.assert_allclose(m.cloud, alone.cloud, atol=1e-3)
        np.testing.assert_allclose(m.prefixes["prefix"], alone.prefixes["prefix"], atol=1e-3)
        np.testing.assert_allclose(m.explained_variance, alone.explained_variance, atol=1e-5)
    # layers_map from those maps is the one it makes itself
    from_maps = M.layers_map(loaded, bank, kv, "value", maps=maps)
    np.testing.assert_allclose(from_maps.coords, M.layers_map(loaded, bank, kv, "value").coords,
                               atol=1e-3)
    with pytest.raises(InterpretError, match="one value map"):
        M.layers_map(loaded, bank, kv, "value", maps=maps[:1])


def test_value_readout_equals_a_hand_computation(loaded):
    model, cfg = loaded.model, loaded.model.config
    kv = _random_like(text_key_values(model, loaded.tokenizer, TEXT, 4), seed=3)
    readout = value_readout(loaded, kv, top_k=5)
    layer, p = loaded.shape.num_layers - 1, 2
    H, H_kv = cfg.num_attention_heads, loaded.shape.num_kv_heads
    v = kv[layer, 1, :, p]  # (H_kv, D)
    merged = torch.cat([v[h // (H // H_kv)] for h in range(H)])  # (H*D,): head h -> kv h//g
    family = family_of(cfg)
    attn = getattr(get_module(model, family.layers)[layer], family.attention)
    norm = get_module(model, family.final_norm)
    if cfg.model_type == "gpt2":
        out = merged @ attn.c_proj.weight + attn.c_proj.bias  # Conv1D: x W + b
        hidden = torch.nn.functional.layer_norm(out, (out.shape[-1],), norm.weight, norm.bias,
                                                norm.eps)
    else:
        out = merged @ attn.o_proj.weight.T
        hidden = out * torch.rsqrt(out.pow(2).mean() + norm.variance_epsilon) * norm.weight
    logits = hidden @ model.get_output_embeddings().weight.T  # (V,)
    top = logits.topk(5)
    np.testing.assert_array_equal(readout.token_ids[layer, p], top.indices.numpy())
    np.testing.assert_allclose(readout.logits[layer, p], top.values.numpy(), rtol=1e-4,
                               atol=1e-4)
    assert set(readout.labels) >= set(readout.token_ids.ravel().tolist())


def test_attention_on_the_prefix_is_a_share_and_depends_on_the_prefix(loaded):
    model = loaded.model
    before = model.config._attn_implementation
    kv = text_key_values(model, loaded.tokenizer, TEXT, 5)
    maps = attention_maps(loaded, kv, "a terrible boring film")
    T = len(_ids(loaded, "a terrible boring film"))
    assert maps.shape == (loaded.shape.num_layers, model.config.num_attention_heads, T, 5 + T)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)  # every query row is a distribution
    assert model.config._attn_implementation == before  # eager was only borrowed
    texts = ["a terrible boring film", "this is fine"]
    mass = prefix_attention(loaded, {"text": kv, "random": _random_like(kv)}, texts)
    assert mass.mass.shape == (2, loaded.shape.num_layers, model.config.num_attention_heads)
    assert ((mass.mass >= 0) & (mass.mass <= 1)).all()
    assert np.abs(mass.mass[0] - mass.mass[1]).max() > 1e-3
    by_hand = np.mean([attention_maps(loaded, kv, t)[..., :5].sum(-1).mean(-1) for t in texts],
                      axis=0)
    np.testing.assert_allclose(mass.mass[0], by_hand, rtol=1e-6)


def test_movement_follows_the_snapshots(loaded, tmp_path):
    kv0 = text_key_values(loaded.model, loaded.tokenizer, TEXT, 4)
    folder = RunFolder(tmp_path / "run")
    moved = kv0.clone()
    moved[1] *= 1.5  # only layer 1 moves: by half its norm
    for step, kv in [(0, kv0), (10, kv0 + 0.0), (20, moved)]:
        folder.save_snapshot(step, kv)
    snapshots = inspection.load_snapshots(folder.path)
    assert [s for s, _ in snapshots] == [0, 10, 20]
    result = M.prefix_movement(snapshots)
    assert result.relative and result.trajectory.shape == (3, 2)
    np.testing.assert_allclose(result.distance[:, 0], 0.0, atol=1e-6)
    np.testing.assert_allclose(result.distance[2, 1], [0.5, 0.5], rtol=1e-5)
    np.testing.assert_allclose(result.trajectory[0], result.trajectory[1], atol=1e-4)
    zero = M.prefix_movement([(0, torch.zeros_like(kv0)), (5, kv0)])
    assert not zero.relative  # a zero init has no scale: distances are absolute
    np.testing.assert_allclose(zero.distance[1, 0, 0], kv0[0, 0].norm().item(), rtol=1e-5)
    with pytest.raises(InterpretError, match="no snapshots"):
        M.prefix_movement([])


def test_compare_prefixes_has_a_unit_diagonal(loaded):
    kv = text_key_values(loaded.model, loaded.tokenizer, TEXT, 4)
    result = M.compare_prefixes({"a": kv, "b": _random_like(kv), "c": 2 * kv})
    L = loaded.shape.num_layers
    assert result.similarity.shape == (L, 3, 3)
    np.testing.assert_allclose(np.diagonal(result.similarity, axis1=1, axis2=2), 1.0, atol=1e-5)
    np.testing.assert_allclose(result.similarity[:, 0, 2], 1.0, atol=1e-5)  # scale-free
    np.testing.assert_allclose(result.similarity, result.similarity.transpose(0, 2, 1))
    with pytest.raises(InterpretError, match="share one shape"):
        M.compare_prefixes({"a": kv, "b": kv[:, :, :, :2]})


def test_bank_is_cached_on_disk_and_loads_equal(loaded, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "elsewhere"))
    first = B.reference_bank(loaded, 50, extra_ids=[7])
    assert not first.loaded_from_disk
    assert first.path.parent == tmp_path / "elsewhere" / "banks"
    assert first.path.name.startswith(loaded.name) and first.path.is_file()
    second = B.reference_bank(loaded, 50, extra_ids=[7])
    assert second.loaded_from_disk and second.path == first.path
    assert second.token_ids == first.token_ids and 7 in second.token_ids
    torch.testing.assert_close(second.keys, first.keys, atol=0, rtol=0)
    torch.testing.assert_close(second.values, first.values, atol=0, rtol=0)
    other = B.reference_bank(loaded, 40)
    assert other.path != first.path
    first.path.write_bytes(b"torn")  # a damaged cache is recomputed, not trusted
    again = B.reference_bank(loaded, 50, extra_ids=[7])
    assert not again.loaded_from_disk
    torch.testing.assert_close(again.keys, first.keys)


def test_runs_share_the_models_bank_and_keep_their_words_apart(loaded, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "c"))
    base = B.model_bank(loaded, 30)
    assert base.extra_ids == [] and base.words_path is None
    words_a, words_b = [200, 201], [250, 201]
    a = B.with_words(base, loaded, words_a)
    b = B.with_words(base, loaded, words_b)
    assert a.path == b.path == base.path  # one file of frequent tokens per model
    assert a.words_path != b.words_path and a.key != b.key
    assert a.extra_ids == words_a and 250 not in a.token_ids and 200 not in b.token_ids
    # the words read alone equal the words read with the bank
    whole = B.reference_bank(loaded, 30, extra_ids=words_a, use_cache=False)
    assert whole.token_ids == a.token_ids
    torch.testing.assert_close(a.keys, whole.keys, atol=2e-3, rtol=0)
    torch.testing.assert_close(a.values, whole.values, atol=2e-3, rtol=0)
    again = B.with_words(B.model_bank(loaded, 30), loaded, words_a)
    assert again.loaded_from_disk and again.key == a.key
    if base.vocabulary is not None:
        assert base.vocabulary.path.is_file() and again.vocabulary.path == base.vocabulary.path
        torch.testing.assert_close(again.vocabulary.keys, base.vocabulary.keys)


def test_frequent_tokens_skip_specials_and_junk(loaded):
    tok = loaded.tokenizer
    ids = B.frequent_token_ids(tok, 1000)
    assert ids == sorted(ids) and tok.eos_token_id not in ids
    for i in ids:
        text = tok.decode([i])
        assert text.strip() and "\ufffd" not in text
    assert B.frequent_token_ids(tok, 5) == ids[:5]
    with pytest.raises(InterpretError, match="outside the vocabulary"):
        B.reference_bank(loaded, 10, extra_ids=[10**6])


def test_a_prefix_of_the_wrong_shape_is_refused(loaded):
    bank = B.reference_bank(loaded, 20)
    with pytest.raises(InterpretError, match="does not fit"):
        nearest_tokens(loaded, torch.zeros(1, 2, 1, 3, 4), bank)


def _tiny_run(tmp_path, loaded, kv0, kv):
    folder = RunFolder(tmp_path / "run")
    cfg = RunConfig(train_csv=str(tmp_path / "missing.csv"), model=loaded.name)
    folder.write_config({"format": "prefixlab-run/1", "name": "run", "run": cfg.to_dict(),
                         "labels": ["positive", "negative"]})
    save_prefix(folder.prefix_path, kv, loaded.name, step="3")
    folder.save_snapshot(0, kv0)
    folder.save_snapshot(3, kv)
    return folder


def test_inspect_run_writes_the_three_files(loaded, tmp_path):
    kv0 = text_key_values(loaded.model, loaded.tokenizer, TEXT, 4)
    kv = kv0 + 0.1 * _random_like(kv0)
    folder = _tiny_run(tmp_path, loaded, kv0, kv)
    out = inspection.inspect_run(folder.path, tmp_path / "out", loaded, top_k=3,
                        texts=["a terrible boring film"])
    assert out == tmp_path / "out"
    nearest = json.loads((out / "nearest_tokens.json").read_text())
    L = loaded.shape.num_layers
    assert len(nearest["layers"]) == L and nearest["caveat"] == CAVEAT
    cell = nearest["layers"][0]["key"][0]
    assert len(cell["top"]) == 3 and {"token", "id", "score"} <= set(cell["top"][0])
    assert {"mean", "std"} == set(cell["baseline"])
    assert len(nearest["layers"][0]["value_readout"][3]["top"]) == 3
    pca = json.loads((out / "pca.json").read_text())
    assert set(pca["maps"]) == {"key", "value"}
    assert set(pca["maps"]["key"]["prefixes"]) == {"trained", "start"}
    assert pca["movement"]["steps"] == [0, 3]
    assert np.array(pca["layers"]["value"]["coords"]).shape == (L, 4, 2)
    page = (out / "inspection.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "Plotly.newPlot" in page
    assert '<script src="http' not in page and len(page) > 1_000_000  # plotly.js inlined
    assert "Prompt Waywardness" in page and "Attention on the prefix" in page
    # Without texts and with the training CSV gone, the attention view is left out.
    out2 = inspection.inspect_run(folder.path, tmp_path / "out2", loaded, top_k=2)
    assert "No texts were available" in (out2 / "inspection.html").read_text()


@pytest.mark.slow
def test_default_model_text_prefix_projects_back_at_every_layer(monkeypatch, tmp_path):
    from prefixlab.engine.models import load_model

    if _USER_CACHE:
        monkeypatch.setenv("PREFIXLAB_CACHE", _USER_CACHE)  # where the model is converted
    else:
        monkeypatch.delenv("PREFIXLAB_CACHE")
    loaded = load_model()
    text = "Classify the sentiment of the review. Answer with one of: positive, negative."
    ids = _ids(loaded, text)[:10]
    kv = text_key_values(loaded.model, loaded.tokenizer, text, 10)
    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "cache"))  # a cold bank, timed
    start = time.perf_counter()
    bank = B.reference_bank(loaded, extra_ids=ids)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    warm_bank = B.reference_bank(loaded, extra_ids=ids)
    warm = time.perf_counter() - start
    assert warm_bank.loaded_from_disk and warm < cold
    start = time.perf_counter()
    result = nearest_tokens(loaded, kv, bank, top_k=10)
    readout_time = time.perf_counter() - start
    print(f"\nbank of {len(bank.token_ids)} tokens: {cold:.1f} s cold, {warm:.2f} s warm; "
          f"nearest tokens for P=10: {readout_time:.1f} s")
    np.testing.assert_array_equal(result.token_ids[..., 0],
                                  np.broadcast_to(np.array(ids), result.token_ids.shape[:3]))
    assert result.scores[..., 0].min() > 0.999


@pytest.mark.slow
def test_default_model_reads_back_words_far_beyond_the_bank(monkeypatch):
    """`train --init-text " elephant volcano banana" --max-steps 0` starts from exactly these
    key/values; none of the three words is among the bank's 2,000 frequent tokens."""
    from prefixlab.engine.models import load_model

    if _USER_CACHE:
        monkeypatch.setenv("PREFIXLAB_CACHE", _USER_CACHE)  # the converted model, a warm bank
    else:
        monkeypatch.delenv("PREFIXLAB_CACHE")
    loaded = load_model()
    text = " elephant volcano banana"
    ids = _ids(loaded, text)
    assert ids == [17032, 18051, 21285]
    kv = text_key_values(loaded.model, loaded.tokenizer, text, 10)
    bank = B.reference_bank(loaded)
    assert not set(ids) & set(bank.token_ids)
    result = nearest_tokens(loaded, kv, bank, top_k=5)
    expected = np.array((ids * 4)[:10])
    assert result.ranked_among[0].min() > 49_000  # the whole vocabulary at layer 0
    np.testing.assert_array_equal(result.token_ids[0, :, :, 0], np.broadcast_to(expected, (2, 10)))
    # Deeper layers rank a shortlist that holds the layer-0 matches: rank 1 there too.
    np.testing.assert_array_equal(result.token_ids[..., 0],
                                  np.broadcast_to(expected, result.token_ids.shape[:3]))
