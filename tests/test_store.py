"""The prefix store: on-demand loading, LRU eviction under a byte budget, refusals."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from prefixlab.engine.prefix import PrefixConfig, load_prefix, save_prefix, text_key_values
from prefixlab.files import atomic_write_json
from prefixlab.runs.config import RunConfig
from prefixlab.runs.folder import RunError, RunFolder
from prefixlab.serve.store import PrefixStore, PrefixStoreError

LABELS = ["positive", "negative"]


def write_run_folder(path: Path, loaded, kv: torch.Tensor, labels=LABELS, model=None,
                     name=None, state: str = "completed") -> Path:
    """A run folder as training leaves it in `state`: config.json + prefix.safetensors +
    status.json."""
    model = model or loaded.name
    cfg = RunConfig(train_csv="", model=model, max_length=96,
                    prefix=PrefixConfig(prefix_length=kv.shape[3]))
    path.mkdir(parents=True)
    atomic_write_json(path / "config.json", {"format": "prefixlab-run/1", "name": name or path.name,
                                             "run": cfg.to_dict(), "labels": list(labels)})
    save_prefix(path / "prefix.safetensors", kv, model)
    RunFolder(path).set_status(state)
    return path


def make_prefixes(loaded, root: Path, n: int, length: int = 4, vary: bool = True) -> list[str]:
    words = ["good", "bad", "fine", "great", "awful", "hello", "world", "the", "fox", "dog"]
    keys = []
    for i in range(n):
        kv = text_key_values(loaded.model, loaded.tokenizer, f"{words[i % 10]} {i}",
                              length + (i % 3 if vary else 0))
        keys.append(str(write_run_folder(root / f"run{i}", loaded, kv)))
    return keys


def test_loads_on_demand_and_serves_from_memory(loaded, tmp_path):
    key = make_prefixes(loaded, tmp_path, 1)[0]
    store = PrefixStore(loaded)
    first = store.get(key)
    assert first.labels == LABELS and first.encoder is not None and first.load_s > 0
    assert store.get(key) is first and (store.hits, store.misses) == (1, 1)
    # A retrained prefix (new file) is read again.
    time.sleep(0.01)
    save_prefix(Path(key) / "prefix.safetensors", first.kv + 1, loaded.name)
    again = store.get(key)
    assert again is not first and torch.equal(again.kv, first.kv + 1)


def test_a_run_prefix_is_held_with_its_template_head_read_once(loaded, tmp_path):
    """kv is the file's prefix (a view of head_kv's first slots, held once); scoring a text
    after head_kv reads only the text and the tail, and gives the full prompt's scores."""
    from prefixlab.engine.mixed import mixed_score_labels
    from prefixlab.engine.predict import score_labels

    key = make_prefixes(loaded, tmp_path, 1, length=5)[0]
    served = PrefixStore(loaded).get(key)
    head = served.encoder.head_ids
    assert head and served.head_kv.shape[3] == 5 + len(head)
    assert served.kv.data_ptr() == served.head_kv.data_ptr()  # one copy of the prefix
    on_disk = load_prefix(Path(key) / "prefix.safetensors", loaded.shape).kv
    assert torch.equal(served.kv, on_disk)
    assert served.nbytes == served.head_kv.numel() * 4
    item = served.score_item("the movie was great")
    assert item.head_read and item.prompt() == served.encoder.prompt(item.text)[0][len(head):]
    got = mixed_score_labels(loaded.model, [item, served.score_item("awful", False)])
    want = score_labels(loaded.model, on_disk, served.encoder, ["the movie was great"])[0]
    assert got[0] == pytest.approx(want, abs=1e-5)
    bare = score_labels(loaded.model, None, served.encoder, ["awful"])[0]
    assert got[1] == pytest.approx(bare, abs=1e-5)


def test_lru_evicts_least_recently_used_under_budget(loaded, tmp_path):
    keys = make_prefixes(loaded, tmp_path, 4, vary=False)
    one = PrefixStore(loaded).get(keys[0]).nbytes
    store = PrefixStore(loaded, budget_bytes=int(one * 2.5))  # room for two
    store.get(keys[0])
    store.get(keys[1])
    assert store.resident() == keys[:2]
    store.get(keys[2])
    assert store.resident() == [keys[1], keys[2]]  # the oldest went
    store.get(keys[1])  # used again: now the most recent
    store.get(keys[3])
    assert store.resident() == [keys[1], keys[3]]
    assert store.resident_bytes == 2 * one <= store.budget_bytes
    assert (store.misses, store.hits, store.evictions) == (4, 1, 2)


def test_a_prefix_over_budget_alone_is_still_served(loaded, tmp_path):
    key = make_prefixes(loaded, tmp_path, 1)[0]
    store = PrefixStore(loaded, budget_bytes=1)
    assert store.get(key).kv.numel() > 0 and store.resident() == [key]


def test_foreign_model_prefix_is_refused_with_both_names(loaded, tmp_path):
    kv = text_key_values(loaded.model, loaded.tokenizer, "hello", 3)
    path = write_run_folder(tmp_path / "other", loaded, kv, model="gpt-neo-125m")
    with pytest.raises(PrefixStoreError, match="gpt-neo-125m.*" + loaded.name):
        PrefixStore(loaded).get(str(path))


def test_wrong_shape_prefix_is_refused(loaded, tmp_path):
    kv = text_key_values(loaded.model, loaded.tokenizer, "hello", 3)
    path = write_run_folder(tmp_path / "r", loaded, torch.cat([kv, kv]))  # twice the layers
    with pytest.raises(PrefixStoreError, match="num_layers"):
        PrefixStore(loaded).get(str(path))


def test_missing_prefix_is_named(loaded, tmp_path):
    with pytest.raises(PrefixStoreError, match="nowhere"):
        PrefixStore(loaded).get(str(tmp_path / "nowhere"))


def test_peft_adapter_folder_is_served_and_foreign_adapter_refused(loaded, tmp_path):
    from prefixlab.engine.peft_interop import export_peft

    kv = text_key_values(loaded.model, loaded.tokenizer, "good great", 5)
    export_peft(kv, loaded.model.config, tmp_path / "mine", loaded.name)
    served = PrefixStore(loaded).get(str(tmp_path / "mine"))
    torch.testing.assert_close(served.kv, kv)
    assert served.encoder is None  # no labels: generation only
    export_peft(kv, loaded.model.config, tmp_path / "theirs", "meta-llama/Llama-3-8B")
    with pytest.raises(PrefixStoreError, match="Llama-3-8B"):
        PrefixStore(loaded).get(str(tmp_path / "theirs"))


@pytest.mark.parametrize("state", ["created", "queued", "running", "failed", "cancelled",
                                   "interrupted"])
def test_only_a_finished_run_is_served(loaded, tmp_path, state):
    """A running run's prefix file is a mid-training checkpoint; a failed or interrupted
    run's is where it broke; a cancelled run's is used only once its user keeps it."""
    kv = text_key_values(loaded.model, loaded.tokenizer, "hello", 3)
    path = write_run_folder(tmp_path / "r", loaded, kv, name="half done", state=state)
    with pytest.raises(PrefixStoreError, match=f"run 'half done' \\({path}\\) is {state}: "
                                               "only completed runs are served"):
        PrefixStore(loaded).get(str(path))


def test_a_kept_cancelled_run_is_served_until_its_prefix_changes(loaded, tmp_path):
    kv = text_key_values(loaded.model, loaded.tokenizer, "hello", 3)
    path = write_run_folder(tmp_path / "r", loaded, kv, state="cancelled")
    store = PrefixStore(loaded)
    with pytest.raises(PrefixStoreError, match="is cancelled.*keep it"):
        store.get(str(path))
    RunFolder(path).keep_prefix()
    torch.testing.assert_close(store.get(str(path)).kv, kv)
    time.sleep(0.01)  # resumed and cancelled again: a newer prefix, not the one kept
    save_prefix(path / "prefix.safetensors", kv + 1, loaded.name)
    with pytest.raises(PrefixStoreError, match="is cancelled"):
        store.get(str(path))


def test_a_served_run_that_trains_again_is_refused_from_memory_too(loaded, tmp_path):
    kv = text_key_values(loaded.model, loaded.tokenizer, "hello", 3)
    path = write_run_folder(tmp_path / "r", loaded, kv)
    store = PrefixStore(loaded)
    store.get(str(path))
    RunFolder(path).set_status("running")  # resumed: same prefix file, held in memory
    with pytest.raises(PrefixStoreError, match="is running"):
        store.get(str(path))
    with pytest.raises(RunError, match="only a cancelled run's prefix is kept"):
        RunFolder(path).keep_prefix()
