"""Knockouts: hiding a slot is exact (as if never cached), and a prefix whose signal lives in
one slot or one layer has that part ranked first; the label push reads the value readout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prefixlab.engine.encode import Encoder, Template
from prefixlab.engine.predict import score_log_likelihoods
from prefixlab.engine.prefix import text_key_values
from prefixlab.interpret import knockout as C

TEXTS = ["the movie was great", "the movie was bad", "a terrible boring film", "great fun",
         "bad acting", "the film was fun"]
LABELS = ["positive", "negative"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _scorer(loaded, kv):
    encoder = Encoder(loaded.tokenizer, Template(), LABELS, 48)
    return encoder, (lambda model: score_log_likelihoods(model, kv, encoder, TEXTS, batch_size=4))


def _signal_in(loaded, slot: int | None = None, layer: int | None = None, scale=60.0):
    """Every slot neutral (zero key: score 0; zero value: writes nothing) except `slot` (at
    every layer) or every slot of `layer`, whose values are large: the only signal."""
    kv = text_key_values(loaded.model, loaded.tokenizer, "the movie was", 6)
    g = torch.Generator().manual_seed(1)
    signal = torch.randn(kv.shape, generator=g) * scale
    out = torch.zeros_like(kv)
    if slot is not None:
        out[:, :, :, slot] = signal[:, :, :, slot]
    else:
        out[layer] = signal[layer]
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_hiding_a_slot_equals_a_prefix_without_it(loaded, attention):
    """Exactness: with slot 0 hidden at every layer, scores equal those of the prefix that
    never had it, read at the same positions (slot 0 replaced by nothing: the remaining
    slots keep positions 1..P-1 and inputs start at P). SDPA hands the hook a boolean mask,
    eager attention an additive float one: both must hide the slot."""
    loaded.model.set_attn_implementation(attention)
    kv = text_key_values(loaded.model, loaded.tokenizer, "the movie was", 5)
    _, score = _scorer(loaded, kv)
    with C.knocked_out(loaded, {layer: [0] for layer in range(kv.shape[0])}) as model:
        hidden = score(model)
    # The same prefix with slot 0 hidden through the plain 2-D attention mask instead.
    encoder = Encoder(loaded.tokenizer, Template(), LABELS, 48)
    from prefixlab.engine.prefix import build_cache

    rows = []
    for prompt in encoder.prompts(TEXTS):
        ids = torch.tensor([prompt + [encoder.label_ids[0][0]]])
        T = ids.shape[1]
        mask = torch.ones(1, 5 + T, dtype=torch.long)
        mask[0, 0] = 0
        positions = torch.arange(5, 5 + T).view(1, T)
        out = loaded.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           cache=build_cache(kv, 1, loaded.model), use_cache=True)
        logp = torch.log_softmax(out.logits[0, T - 2].float(), -1)
        rows.append([float(logp[ids[0, -1]])])
    direct = np.array(rows)
    # The first label's first token: the whole label when labels are one token each.
    single = all(len(t) == 1 for t in encoder.label_ids)
    assert single, "the test tokenizer reads each label as one token"
    np.testing.assert_allclose(hidden[:, :1], direct, atol=1e-4)
    # And hiding changes something while the shared model is left alone.
    assert not np.allclose(hidden, score(loaded.model), atol=1e-4)


def test_layer_knockouts_started_from_the_intact_layers_equal_full_passes(loaded):
    kv = _signal_in(loaded, layer=1, scale=3.0) + text_key_values(
        loaded.model, loaded.tokenizer, "the movie was", 6)
    _, score = _scorer(loaded, kv)
    gold = [0, 1, 1, 0, 1, 0]
    calls = []

    def counted(model):
        calls.append(1)
        return score(model)

    full = C.knockout(loaded, kv, counted, gold)
    fast = C.knockout(loaded, kv, counted, gold, replay=True)
    assert len(calls) == 2 * (1 + 6 + loaded.shape.num_layers + 1)
    np.testing.assert_allclose(fast.layer_log_prob, full.layer_log_prob, atol=1e-5)
    np.testing.assert_allclose(fast.slot_log_prob, full.slot_log_prob, atol=1e-5)
    assert fast.all_log_prob == pytest.approx(full.all_log_prob, abs=1e-5)
    assert np.abs(full.layer_log_prob).max() > 1e-3  # the layers' knockouts change something
    # A replayed pass really skips the layers below its start.
    saved = C.Replay()
    seen = []
    family = C.family_of(loaded.model.config)
    blocks = C.get_module(C._twin(loaded.model), family.layers)
    handles = [getattr(b, family.attention).register_forward_pre_hook(
        lambda m, a, i=i: seen.append(i)) for i, b in enumerate(blocks)]  # ran, not skipped
    try:
        with C.knocked_out(loaded, {}, saved) as model:
            saved.record()
            score(model)
        seen.clear()
        saved.start(loaded.shape.num_layers - 1)
        with C.knocked_out(loaded, {}, saved) as model:
            again = score(model)
    finally:
        for h in handles:
            h.remove()
    np.testing.assert_allclose(again, score(loaded.model), atol=1e-5)
    assert set(seen) == {loaded.shape.num_layers - 1}


@pytest.mark.parametrize("signal_slot", [0, 4])
def test_the_slot_that_carries_the_signal_ranks_first(loaded, signal_slot):
    kv = _signal_in(loaded, slot=signal_slot)
    _, score = _scorer(loaded, kv)
    gold = score(loaded.model).argmax(1)  # what the prefix makes the model say
    result = C.knockout(loaded, kv, score, gold)
    assert result.ranked("slot")[0][0] == signal_slot
    first, second = result.ranked("slot")[:2]
    assert first[1] < 2 * second[1] - 0.1  # clearly first
    assert result.log_prob > result.log_prob + first[1]


def test_the_layer_that_carries_the_signal_ranks_first(loaded):
    L = loaded.shape.num_layers
    kv = _signal_in(loaded, layer=L - 1)
    _, score = _scorer(loaded, kv)
    gold = score(loaded.model).argmax(1)
    steps = []
    result = C.knockout(loaded, kv, score, gold, progress=lambda f, m: steps.append((f, m)))
    assert result.ranked("layer")[0][0] == L - 1
    assert steps[-1][0] == 1.0 and len(steps) == 2 + kv.shape[3] + L + 1
    again = C.Knockout.from_json(result.to_json())
    np.testing.assert_allclose(again.layer_log_prob, result.layer_log_prob, atol=1e-4)


def test_generation_targets_knock_out_through_the_same_score(loaded):
    kv = _signal_in(loaded, slot=2)
    _, score = _scorer(loaded, kv)
    def target(model):
        return score(model)[:, :1]  # one log-likelihood per row: no classes
    result = C.knockout(loaded, kv, target, None)
    assert result.f1 is None and result.slot_f1 is None
    assert result.slot_log_prob.shape == (kv.shape[3],)


def test_label_push_is_the_value_readout_on_the_labels(loaded):
    from prefixlab.interpret.values import value_logits

    kv = text_key_values(loaded.model, loaded.tokenizer, "the movie was", 4)
    encoder = Encoder(loaded.tokenizer, Template(), LABELS, 48)
    push = C.label_push(loaded, kv, LABELS, encoder.label_ids)
    logits = value_logits(loaded, kv)
    first = [ids[0] for ids in encoder.label_ids]
    expected = logits[..., first].mean(1)
    expected = expected - expected.mean(-1, keepdim=True)
    np.testing.assert_allclose(push.push, expected.numpy(), atol=1e-5)
    assert push.push.shape == (loaded.shape.num_layers, 2)


def test_macro_f1():
    from prefixlab.engine.balance import macro_f1

    assert macro_f1(np.array([0, 1, 1]), np.array([0, 1, 1]), range(2)) == 1.0
    assert macro_f1(np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1]), range(2)) == pytest.approx(
        (2 / 3 + 0.8) / 2)


def test_the_knockout_and_the_report_agree_on_a_label_absent_from_the_rows():
    """Label 2 is neither gold nor predicted on these rows: both count it as 0, so the
    knockout's intact macro-F1 is the report's on the same rows."""
    from prefixlab.engine.balance import macro_f1
    from prefixlab.runs.evaluate import classification_report

    gold = np.array([0, 0, 1, 1])
    ll = np.log(np.array([[.8, .1, .1], [.3, .6, .1], [.2, .7, .1], [.1, .8, .1]]))
    _, intact = C._measure(ll, gold)
    names = ["a", "b", "c"]
    report = classification_report([names[g] for g in gold], [names[p] for p in ll.argmax(1)],
                                   names)
    assert intact == pytest.approx(report["macro_f1"]) == pytest.approx((2 / 3 + 0.8 + 0) / 3)
    assert macro_f1(gold, ll.argmax(1), range(3)) == pytest.approx(intact)


def test_the_summary_names_the_slot_and_layer_that_matter(loaded):
    from prefixlab.interpret.bank import reference_bank
    from prefixlab.interpret.nearest import nearest_tokens
    from prefixlab.interpret.summary import knockout_lines, summary_markdown

    kv = _signal_in(loaded, slot=3)
    _, score = _scorer(loaded, kv)
    result = C.knockout(loaded, kv, score, score(loaded.model).argmax(1))
    slots_line = knockout_lines(result)[1]
    assert slots_line.startswith("- Slots that cost most when hidden: P3 (")
    nearest = nearest_tokens(loaded, kv, reference_bank(loaded, 50), top_k=2)
    text = summary_markdown(nearest, kv, torch.zeros_like(kv) + 1.0, result)
    assert "P3 (" in text and "Prompt Waywardness" in text and "**Movement**" in text
    # A text prefix sits on its own words: they are named as clearly above random.
    words = text_key_values(loaded.model, loaded.tokenizer, "the movie was", 3)
    near_text = nearest_tokens(loaded, words, reference_bank(loaded, 50), top_k=2)
    assert "clearly above random" in summary_markdown(near_text, words, None, None)
    noise = torch.randn(words.shape, generator=torch.Generator().manual_seed(0)) * words.std()
    near_noise = nearest_tokens(loaded, noise, reference_bank(loaded, 50), top_k=2)
    assert "none stands clearly above" in summary_markdown(near_noise, noise, None, None)


def test_a_generation_target_is_scored_per_row_and_knocked_out(loaded):
    from prefixlab.data.pairs import TextPairs
    from prefixlab.engine.encode import PairEncoder
    from prefixlab.runs.generation import target_loss

    encoder = PairEncoder(loaded.tokenizer, Template("{text} ->"), 48, 8)
    inputs, targets = ["the movie was", "great fun"], [" great", " bad acting"]
    kv = _signal_in(loaded, slot=1, scale=5.0)
    per_row = C.target_log_likelihoods(loaded.model, kv, encoder, inputs, targets)
    assert per_row.shape == (2, 1)
    # Each row alone: its mean log-probability is minus its own target loss.
    for i in range(2):
        pair = TextPairs([inputs[i]], [targets[i]], [i + 1], "input", "target")
        assert per_row[i, 0] == pytest.approx(-target_loss(loaded.model, kv, encoder, pair),
                                              abs=1e-4)

    def score(model):
        return C.target_log_likelihoods(model, kv, encoder, inputs, targets)

    result = C.knockout(loaded, kv, score, None)
    assert result.f1 is None and result.slot_log_prob.shape == (kv.shape[3],)
    # Slot 1 holds the only large values: hiding it moves the target most.
    assert int(np.argmax(np.abs(result.slot_log_prob))) == 1


def test_a_bfloat16_knockout_ranks_like_float32_and_leaves_the_model_alone(loaded):
    """The bf16 twin holds its own bf16 weights: the shared model stays float32 (and scores as
    before), and the knockout ranks the signal's slot first as float32 does, with changes
    close to float32's."""
    kv = _signal_in(loaded, slot=2)
    _, score = _scorer(loaded, kv)
    before = score(loaded.model)
    gold = before.argmax(1)
    exact = C.knockout(loaded, kv, score, gold, replay=True)
    fast = C.knockout(loaded, kv, score, gold, replay=True, dtype=torch.bfloat16)
    assert exact.precision == "float32" and fast.precision == "bfloat16"
    assert fast.ranked("slot")[0][0] == exact.ranked("slot")[0][0] == 2
    np.testing.assert_allclose(fast.slot_log_prob, exact.slot_log_prob, atol=0.05, rtol=0.05)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    np.testing.assert_allclose(score(loaded.model), before, atol=1e-6)
    assert C.Knockout.from_json(fast.to_json()).precision == "bfloat16"


def test_knockout_precision_auto_follows_the_processor(loaded, monkeypatch):
    from prefixlab.interpret.frame import InterpretError
    from prefixlab.runs import inspection

    monkeypatch.setattr(inspection, "native_bf16", lambda device: True)
    assert inspection.knockout_dtype(loaded) == torch.bfloat16
    monkeypatch.setattr(inspection, "native_bf16", lambda device: False)
    assert inspection.knockout_dtype(loaded) == torch.float32
    assert inspection.knockout_dtype(loaded, "bfloat16") == torch.bfloat16
    with pytest.raises(InterpretError, match="precision"):
        inspection.knockout_dtype(loaded, "float16")


def test_passes_in_parallel_streams_equal_one_at_a_time(loaded):
    """Two twins, one thread each, passes handed out as they free up: the same knockout (up to
    float rounding), progress for every pass, and torch's thread count as it was."""
    kv = _signal_in(loaded, slot=1)
    _, score = _scorer(loaded, kv)
    gold = score(loaded.model).argmax(1)
    one = C.knockout(loaded, kv, score, gold, replay=True)
    torch.set_num_threads(2)
    steps = []
    two = C.knockout(loaded, kv, score, gold, replay=True, streams=2,
                     progress=lambda f, m: steps.append(f))
    assert torch.get_num_threads() == 2
    np.testing.assert_allclose(two.slot_log_prob, one.slot_log_prob, atol=1e-5)
    np.testing.assert_allclose(two.layer_log_prob, one.layer_log_prob, atol=1e-5)
    assert two.all_log_prob == pytest.approx(one.all_log_prob, abs=1e-5)
    n = 2 + kv.shape[3] + kv.shape[0]
    assert len(steps) == n + 2 and steps == sorted(steps) and steps[-1] == 1.0  # start, passes, end
    assert C.knockout_streams(torch.device("cuda")) == 1


def test_a_failing_pass_in_a_stream_reaches_the_caller(loaded):
    kv = _signal_in(loaded, slot=1)
    _, score = _scorer(loaded, kv)
    calls = []

    def flaky(model):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("out of memory")
        return score(model)

    with pytest.raises(RuntimeError, match="out of memory"):
        C.knockout(loaded, kv, flaky, score(loaded.model).argmax(1), streams=2)


def test_overlapping_knockouts_leave_every_thread_count_as_it_was(loaded, monkeypatch):
    """Two knockouts in request threads, overlapping, and a score beside them: each gives what
    it gives alone, and no thread's torch count changes, nor the count a new thread starts
    from (torch.set_num_threads in a knockout's worker once set that count process-wide, and
    a later request thread then ran on one thread)."""
    import threading

    from prefixlab.engine import cpu

    wait_s = 60
    torch.set_num_threads(2)
    monkeypatch.setattr(cpu, "_pinned", 2)  # as the app does: request threads never tune
    kv = _signal_in(loaded, slot=2)
    encoder, score = _scorer(loaded, kv)
    gold = [0, 1, 1, 0, 0, 1][:len(TEXTS)]
    alone = C.knockout(loaded, kv, score, gold, streams=2)
    scored_alone = score(loaded.model)
    first_running, second_entered = threading.Event(), threading.Event()

    def first_score(model):
        if threading.current_thread().name.startswith("knockout"):  # a knockout's worker
            first_running.set()
            second_entered.wait(wait_s)
        return score(model)

    results: dict[str, object] = {}

    def first():
        results["first"] = C.knockout(loaded, kv, first_score, gold, streams=2)

    def second():
        first_running.wait(wait_s)
        torch.get_num_threads()  # this thread's first torch call, while the first's passes run
        second_entered.set()
        results["second"] = C.knockout(loaded, kv, score, gold, streams=2)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    first_running.wait(wait_s)
    scored_beside = score(loaded.model)
    for t in threads:
        t.join(wait_s)
    assert set(results) == {"first", "second"}
    counts: list[int] = []
    fresh = threading.Thread(target=lambda: counts.append(torch.get_num_threads()))
    fresh.start()
    fresh.join()
    assert counts == [2] and torch.get_num_threads() == 2
    np.testing.assert_allclose(scored_beside, scored_alone, rtol=1e-5, atol=1e-6)
    for name in ("first", "second"):
        got = results[name]
        np.testing.assert_allclose(got.slot_log_prob, alone.slot_log_prob, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.layer_log_prob, alone.layer_log_prob, rtol=1e-4, atol=1e-5)
