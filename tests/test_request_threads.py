"""Request threads of the app change nothing process-wide: caches are per key, sampling draws
from its own generator, the attention view leaves the shared model as it is.

Each test makes the interleaving it needs with events, so none depends on timing.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from prefixlab.engine.predict import generate
from prefixlab.engine.prefix import save_prefix
from prefixlab.interpret.attention import attention_maps, eager_twin
from prefixlab.interpret.frame import first_layer_references
from prefixlab.workbench import Workbench
from prefixlab.workbench.memo import Memo
from prefixlab.workbench.runs import run_config

WAIT_S = 60  # an upper bound that only a broken test reaches: events release every wait


def _in_thread(fn) -> tuple[threading.Thread, list]:
    """Run fn() in a thread; the list gets its result or its exception."""
    out: list = []

    def call():
        try:
            out.append(fn())
        except BaseException as e:  # handed to the test's thread
            out.append(e)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, out


# --- the per-key cache --------------------------------------------------------------------------


def test_a_slow_key_does_not_hold_up_another_and_each_key_is_computed_once():
    memo: Memo[str, str] = Memo()
    inside, release = threading.Event(), threading.Event()
    calls = {"slow": 0}

    def slow():
        calls["slow"] += 1
        inside.set()
        assert release.wait(WAIT_S)
        return "slow value"

    first, first_out = _in_thread(lambda: memo.get("slow", slow))
    assert inside.wait(WAIT_S)
    assert memo.get("fast", lambda: "fast value") == "fast value"  # while "slow" computes
    assert memo.peek("slow") is None  # not done: peek never waits
    second, second_out = _in_thread(lambda: memo.get("slow", slow))
    release.set()
    first.join(WAIT_S)
    second.join(WAIT_S)
    assert first_out == second_out == ["slow value"]
    assert calls["slow"] == 1
    assert memo.peek("slow") == "slow value"


def test_a_failed_computation_is_not_kept():
    memo: Memo[str, int] = Memo()

    def fail():
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        memo.get("k", fail)
    assert memo.peek("k") is None
    assert memo.get("k", lambda: 7) == 7
    memo.drop(lambda k: k == "k")
    assert memo.get("k", lambda: 8) == 8


# --- the workbench ----------------------------------------------------------------------------


def _run_with_a_prefix(wb: Workbench, csv: Path, name: str, seed: int) -> str:
    """A completed run with a (random) prefix file: enough to score and inspect."""
    cfg = run_config(str(csv), "text", "label", {"prefix_length": 3}, model=wb.default_model)
    run_id = wb.store.create(cfg, wb.model_info(), name=name)
    shape = wb.model().shape
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(shape.num_layers, 2, shape.num_kv_heads, 3, shape.head_dim, generator=g)
    save_prefix(wb.folder(run_id).prefix_path, kv, wb.default_model)
    wb.folder(run_id).set_status("completed")  # only a completed run's prefix is served
    return run_id


def test_building_a_reference_bank_does_not_stall_scoring_with_another_run(
    tmp_path, model_dir, monkeypatch
):
    """One lock over every cache once made each request wait for a bank being built."""
    from prefixlab.interpret import bank

    csv = tmp_path / "data.csv"
    csv.write_text("text,label\n" + "".join(
        f"the movie was {'great' if i % 2 else 'bad'} {i},{'positive' if i % 2 else 'negative'}\n"
        for i in range(20)))
    wb = Workbench(tmp_path / "data", model=str(model_dir))
    inspected = _run_with_a_prefix(wb, csv, "inspected", 0)
    scored = _run_with_a_prefix(wb, csv, "scored", 1)
    building, release = threading.Event(), threading.Event()
    real_bank = bank.model_bank  # the part built once per model

    def slow_bank(*args, **kwargs):
        building.set()
        assert release.wait(WAIT_S)
        return real_bank(*args, **kwargs)

    monkeypatch.setattr(bank, "model_bank", slow_bank)
    monkeypatch.setenv("PREFIXLAB_CACHE", str(tmp_path / "cache"))
    thread, out = _in_thread(lambda: wb.inspection(inspected, top_k=3))
    assert building.wait(WAIT_S)
    table = wb.compare(["the movie was great"], [scored])  # while the bank is being built
    assert not release.is_set() and thread.is_alive()
    assert len(table) == 2 and "p(positive)" in table.columns
    release.set()
    thread.join(WAIT_S)
    assert not isinstance(out[0], BaseException), out
    assert out[0].nearest.token_ids.shape[:3] == (wb.model().shape.num_layers, 2, 3)


# --- sampling --------------------------------------------------------------------------------


def test_concurrent_seeded_generations_repeat_and_leave_the_global_rng_alone(loaded):
    model, tok = loaded.model, loaded.tokenizer
    kv = torch.randn(loaded.shape.num_layers, 2, loaded.shape.num_kv_heads, 4,
                     loaded.shape.head_dim, generator=torch.Generator().manual_seed(0))
    prompts = ["the movie", "a terrible boring film was"]

    def sampled(seed: int) -> list[str]:
        return generate(model, tok, kv, prompts, max_new_tokens=10, do_sample=True,
                        temperature=1.5, top_p=0.95, seed=seed)

    want = {seed: sampled(seed) for seed in (1, 2)}
    assert want[1] != want[2]  # the seed reaches the draws
    state = torch.random.get_rng_state()
    barrier = threading.Barrier(4)

    def repeat(seed: int) -> list[list[str]]:
        barrier.wait()
        return [sampled(seed) for _ in range(3)]

    threads = [_in_thread(lambda s=s: repeat(s)) for s in (1, 2, 1, 2)]
    for thread, _ in threads:
        thread.join(WAIT_S)
    for (_, out), seed in zip(threads, (1, 2, 1, 2), strict=True):
        assert out == [[want[seed]] * 3]
    assert torch.equal(torch.random.get_rng_state(), state)


# --- the attention view -----------------------------------------------------------------------


def test_attention_maps_leave_the_shared_model_as_it_is(loaded):
    """Seen from inside every module that runs: the shared model keeps its attention
    implementation while maps are read (it was switched to eager, for every thread)."""
    model = loaded.model
    before = model.config._attn_implementation
    assert before != "eager"  # else there is nothing to switch
    seen = set()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda *_: seen.add(model.config._attn_implementation))
    try:
        maps = attention_maps(loaded, None, "the movie was great")
    finally:
        hook.remove()
    assert seen == {before}
    assert maps.shape[0] == loaded.shape.num_layers
    torch.testing.assert_close(torch.from_numpy(maps).sum(-1),
                               torch.ones(maps.shape[:-1]), atol=1e-5, rtol=0)
    twin = eager_twin(model)
    assert twin is eager_twin(model)  # made once per model
    assert twin.config._attn_implementation == "eager"
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert a.data_ptr() == b.data_ptr()  # the same weights, not a copy


def test_attention_maps_equal_the_shared_model_switched_to_eager(loaded):
    from prefixlab.engine.prefix import prefix_inputs

    kv = torch.randn(loaded.shape.num_layers, 2, loaded.shape.num_kv_heads, 3,
                     loaded.shape.head_dim, generator=torch.Generator().manual_seed(0))
    maps = attention_maps(loaded, kv, "a terrible boring film")
    model = loaded.model
    original = model.config._attn_implementation
    ids = torch.tensor([loaded.tokenizer("a terrible boring film",
                                         add_special_tokens=False)["input_ids"]])
    model.set_attn_implementation("eager")  # the old way, here where no one else runs
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True, use_cache=True, logits_to_keep=1,
                        **prefix_inputs(model, kv, torch.ones_like(ids)))
    finally:
        model.set_attn_implementation(original)
    want = torch.stack(out.attentions)[:, 0]
    torch.testing.assert_close(torch.from_numpy(maps), want, atol=1e-6, rtol=1e-5)


def test_the_first_layer_stop_hook_stops_only_its_own_thread(loaded):
    """first_layer_references stops the shared model after layer 0 with a hook: a forward
    from another thread meanwhile must run whole."""
    from prefixlab.engine.families import family_of
    from prefixlab.engine.models import get_module

    family = family_of(loaded.model.config)
    attention = getattr(get_module(loaded.model, family.layers)[0], family.attention)
    in_hook, release = threading.Event(), threading.Event()
    other: list = []

    def pause(*_):  # runs before the stop hook: the other thread's forward happens here
        if threading.current_thread().name == "references" and not in_hook.is_set():
            in_hook.set()
            assert release.wait(WAIT_S)

    pause_hook = attention.register_forward_hook(pause, prepend=True)
    try:
        def references():
            return first_layer_references(loaded, [5, 6], 2)

        thread = threading.Thread(target=lambda: other.append(references()), name="references")
        thread.start()
        assert in_hook.wait(WAIT_S)
        ids = torch.tensor([[5, 6, 7]])
        with torch.no_grad():
            logits = loaded.model(input_ids=ids).logits  # passes layer 0 while the hook is on
        release.set()
        thread.join(WAIT_S)
    finally:
        pause_hook.remove()
    assert logits.shape == (1, 3, loaded.model.config.vocab_size)
    assert other and other[0].shape[:3] == (2, 2, 2)
