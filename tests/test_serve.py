"""The batcher: concurrent clients naming different prefixes share mixed batches; a bad
request fails alone; table prediction under several prefixes."""

from __future__ import annotations

import threading

import pandas as pd
import pytest
import torch

from prefixlab.engine.decode import DecodeConfig, Sampling, mixed_generate
from prefixlab.engine.predict import generate, score_labels
from prefixlab.engine.prefix import PrefixConfig, save_prefix, text_key_values
from prefixlab.files import atomic_write_json
from prefixlab.runs.config import RunConfig
from prefixlab.runs.folder import RunFolder
from prefixlab.runs.generation import generate as run_generate
from prefixlab.runs.generation import pair_encoder
from prefixlab.serve.batcher import Batcher, ServeError, predict_frame
from prefixlab.serve.store import PrefixStore, PrefixStoreError
from tests.test_store import make_prefixes, write_run_folder

TEXTS = ["the movie was great", "a terrible boring film", "fine", "hello world"]


@pytest.fixture
def served(loaded, tmp_path):
    keys = make_prefixes(loaded, tmp_path, 4)
    store = PrefixStore(loaded)
    batcher = Batcher(loaded, store, window_s=0.3, max_rows=64)
    yield loaded, store, batcher, keys
    batcher.close()


def test_concurrent_clients_share_batches_and_get_their_own_answers(served):
    loaded, store, batcher, keys = served
    results: dict[int, object] = {}

    def client(i: int) -> None:
        key, texts = keys[i % 4], TEXTS[: 1 + i % 3]
        if i % 2:
            results[i] = batcher.generate(key, texts, max_new_tokens=3 + i % 3)
        else:
            results[i] = batcher.score(key, texts)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 8
    assert batcher.stats.batches < 8  # requests met in shared batches
    for i, got in results.items():
        p = store.get(keys[i % 4])
        texts = TEXTS[: 1 + i % 3]
        if i % 2:
            assert got == generate(loaded.model, loaded.tokenizer, p.kv, texts, 3 + i % 3)
        else:
            alone = score_labels(loaded.model, p.kv, p.encoder, texts)
            for row, want in zip(got.probabilities, alone, strict=True):
                assert row == pytest.approx(want, abs=1e-5)
            assert got.prefix.key == keys[i % 4]


def test_sampled_greedy_and_beam_requests_share_batches_and_keep_their_own_texts(served):
    """Clients sampling with their own seeds, greedy clients and beam-search clients at once:
    sampled and greedy rows share batches; every answer is the request's text alone, so a
    seed gives the same text whoever else is batched."""
    loaded, store, batcher, keys = served
    requests = [(keys[i % 4], TEXTS[: 1 + i % 2], Sampling(seed=i % 3, temperature=1.4)
                 if i % 3 else None, 2 if i == 3 else 1) for i in range(9)]
    results: dict[int, list[str]] = {}
    barrier = threading.Barrier(len(requests))

    def client(i: int) -> None:
        key, texts, sampling, beams = requests[i]
        barrier.wait()
        results[i] = batcher.generate(key, texts, 5, sampling, num_beams=beams)

    state = torch.random.get_rng_state()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert len(results) == len(requests)
    assert batcher.stats.batches < len(requests) // 2
    for i, (key, texts, sampling, beams) in enumerate(requests):
        kv = store.get(key).kv
        if beams > 1:
            want = mixed_generate(loaded.model, loaded.tokenizer, [kv] * len(texts), texts, 5,
                                  num_beams=beams)
        elif sampling is None:
            want = generate(loaded.model, loaded.tokenizer, kv, texts, 5)
        else:
            want = generate(loaded.model, loaded.tokenizer, kv, texts, 5, do_sample=True,
                            temperature=sampling.temperature, seed=sampling.seed)
        assert results[i] == want, i
    with pytest.raises(ServeError, match="not both"):
        batcher.submit_generate(keys[0], TEXTS[:1], 4, Sampling(1), num_beams=2)


def test_missing_and_foreign_prefixes_fail_alone_without_poisoning_the_batch(served, tmp_path):
    loaded, store, batcher, keys = served
    kv = store.get(keys[0]).kv
    foreign = write_run_folder(tmp_path / "foreign", loaded, kv, model="another-model")
    good = batcher.submit_score(keys[1], TEXTS[:2])
    missing = batcher.submit_score(str(tmp_path / "missing"), TEXTS[:1])
    alien = batcher.submit_generate(str(foreign), TEXTS[:1], 4)
    also_good = batcher.submit_generate(keys[2], TEXTS[:1], 4)
    with pytest.raises(PrefixStoreError, match="missing"):
        missing.result(timeout=60)
    with pytest.raises(PrefixStoreError, match="another-model"):
        alien.result(timeout=60)
    assert len(good.result(timeout=60).probabilities) == 2
    assert also_good.result(timeout=60) == generate(loaded.model, loaded.tokenizer,
                                                    store.get(keys[2]).kv, TEXTS[:1], 4)
    assert batcher.stats.failed == 2


def test_bare_generation_and_bare_scoring(served):
    loaded, store, batcher, keys = served
    assert batcher.generate(None, TEXTS[:1], 3) == generate(loaded.model, loaded.tokenizer,
                                                            None, TEXTS[:1], 3)
    bare = batcher.score(keys[0], TEXTS[:1], with_prefix=False)
    want = score_labels(loaded.model, None, store.get(keys[0]).encoder, TEXTS[:1])[0]
    assert not bare.with_prefix and bare.probabilities[0] == pytest.approx(want, abs=1e-5)
    with pytest.raises(ServeError, match="at least one text"):
        batcher.submit_score(keys[0], [])


def test_predict_frame_writes_one_column_group_per_prefix(loaded, tmp_path):
    keys = make_prefixes(loaded, tmp_path, 2)
    store = PrefixStore(loaded)
    prefixes = [store.get(k) for k in keys]
    frame = pd.DataFrame({"text": TEXTS, "id": range(4)})
    out = predict_frame(loaded, prefixes, frame, "text", batch_size=3)
    for p in prefixes:
        want = score_labels(loaded.model, p.kv, p.encoder, TEXTS)
        cols = [f"{p.name}: p_{label}" for label in p.labels]
        assert out[cols].to_numpy() == pytest.approx(want, abs=1e-5)
        assert list(out[f"{p.name}: predicted_label"]) == [p.labels[j] for j in want.argmax(1)]
    assert list(out["id"]) == [0, 1, 2, 3]


def test_cli_predicts_a_csv_under_several_runs(tmp_path, capsys):
    from prefixlab.cli.main import main
    from prefixlab.engine.models import load_model
    from tests.conftest import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model", "llama")
    loaded = load_model(str(model_dir), "cpu")
    runs = [write_run_folder(tmp_path / name, loaded,
                             text_key_values(loaded.model, loaded.tokenizer, text, n))
            for name, text, n in [("alpha", "good great", 3), ("beta", "bad awful", 6)]]
    csv = tmp_path / "in.csv"
    csv.write_text("text\nthe movie was great\nbad film\n")
    out = tmp_path / "out.csv"
    assert main(["predict", "--run", str(runs[0]), "--run", str(runs[1]), "--csv", str(csv),
                 "--output", str(out)]) == 0
    frame = pd.read_csv(out)
    assert {"alpha: predicted_label", "beta: p_negative"} <= set(frame.columns)
    assert main(["predict", "--run", str(runs[0]), "--run", str(runs[1]),
                 "--text", "good"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    foreign = write_run_folder(tmp_path / "foreign", loaded, text_key_values(
        loaded.model, loaded.tokenizer, "x", 2), model="some-other-model")
    assert main(["predict", "--run", str(runs[0]), "--run", str(foreign), "--text", "x"]) == 2
    assert "some-other-model" in capsys.readouterr().err


def test_scoring_a_prefix_without_labels_is_refused_but_it_generates(served, tmp_path):
    from prefixlab.engine.peft_interop import export_peft

    loaded, store, batcher, keys = served
    kv = store.get(keys[0]).kv
    export_peft(kv, loaded.model.config, tmp_path / "adapter", loaded.name)
    scored = batcher.submit_score(str(tmp_path / "adapter"), TEXTS[:1])
    written = batcher.submit_generate(str(tmp_path / "adapter"), TEXTS[:1], 3)
    with pytest.raises(ServeError, match="no labels to score"):
        scored.result(timeout=60)
    assert written.result(timeout=60) == generate(loaded.model, loaded.tokenizer, kv,
                                                  TEXTS[:1], 3)


def write_generation_run(path, loaded, kv, stop=()) -> str:
    """A completed generation run folder (an input column, a target column, a stop string)."""
    cfg = RunConfig(train_csv="", model=loaded.name, max_length=96, text_column="mr",
                    target_column="ref", prefix=PrefixConfig(prefix_length=kv.shape[3]),
                    generation=DecodeConfig(max_new_tokens=16, stop=list(stop)))
    path.mkdir(parents=True)
    atomic_write_json(path / "config.json", {"format": "prefixlab-run/1", "name": path.name,
                                             "task": "generation", "run": cfg.to_dict(),
                                             "labels": []})
    save_prefix(path / "prefix.safetensors", kv, loaded.name)
    RunFolder(path).set_status("completed")
    return str(path)


def test_a_generation_run_reads_its_prompts_in_its_template_unless_raw(served, tmp_path):
    """As the run was trained and as its report decodes (runs.generation.generate): the
    input in the template, the text cut at a stop string; raw=True continues the prompt."""
    loaded, _, batcher, keys = served
    kv = text_key_values(loaded.model, loaded.tokenizer, "a place to eat", 4)
    texts = ["name[Aromi], eatType[pub]", "name[Cotto], food[Italian]"]
    raw = generate(loaded.model, loaded.tokenizer, kv, texts, 6)
    uncut = None
    for stop in ((), (" ", "e")):  # no stop string; stop strings the outputs hold
        key = write_generation_run(tmp_path / f"gen{len(stop)}", loaded, kv, stop)
        cfg = RunFolder(key).run_config()
        want = run_generate(loaded.model, pair_encoder(loaded.tokenizer, cfg), kv, texts,
                            DecodeConfig(max_new_tokens=6, stop=list(stop)))
        assert want != raw and want != uncut  # (the stop strings cut something)
        uncut = uncut or want
        assert batcher.generate(key, texts, 6) == want
        assert batcher.generate(key, texts, 6, raw=True) == raw
        # Batched with a classification prefix, which continues its prompt as given.
        mine = batcher.submit_generate(key, texts, 6)
        theirs = batcher.submit_generate(keys[0], texts, 6)
        assert mine.result(timeout=60) == want
        assert theirs.result(timeout=60) == generate(loaded.model, loaded.tokenizer,
                                                     batcher.store.get(keys[0]).kv, texts, 6)
