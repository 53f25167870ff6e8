"""Greedy and beam decoding after a prefix, against hand-written references."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from prefixlab.engine.decode import DecodeConfig, beam_search, cut_at_stop, generate_texts, greedy
from prefixlab.engine.prefix import forward
from prefixlab.errors import ConfigError
from tests.conftest import tiny_model


def _random_kv(model, P: int = 3, seed: int = 1) -> torch.Tensor:
    cfg = model.config
    L = cfg.num_hidden_layers
    H = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    D = cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, 2, H, P, D, generator=g)  # (L, 2, H_kv, P, D)


@torch.no_grad()
def _next_logp(model, kv, ids: list[int]) -> torch.Tensor:
    """log p(next token | prefix, ids), reading the whole sequence again (no cache reuse)."""
    x = torch.tensor([ids])
    logits = forward(model, kv, x, torch.ones_like(x))
    return torch.log_softmax(logits[0, -1].float(), -1)


def _hand_greedy(model, kv, prompt: list[int], eos: int, steps: int) -> list[int]:
    out: list[int] = []
    for _ in range(steps):
        tok = int(_next_logp(model, kv, prompt + out).argmax())
        if tok == eos:
            break
        out.append(tok)
    return out


@pytest.mark.parametrize("with_prefix", [True, False])
def test_greedy_equals_a_hand_written_loop(loaded, with_prefix):
    model = loaded.model
    kv = _random_kv(model) if with_prefix else None
    prompts = [[5, 17, 40, 3], [9], [100, 101, 102, 103, 104, 105, 7]]  # left padding in a batch
    got = greedy(model, kv, prompts, eos_id=0, pad_id=0, max_new_tokens=8)
    want = [_hand_greedy(model, kv, p, 0, 8) for p in prompts]
    assert got == want
    assert any(len(g) == 8 for g in got)  # the loop really ran to the limit somewhere


def test_greedy_stops_at_eos_and_drops_finished_rows():
    model = tiny_model("llama", vocab_size=3).eval()
    kv = _random_kv(model)
    prompts = [[1, 2, 1], [2], [1, 1, 1, 2, 2]]
    got = greedy(model, kv, prompts, eos_id=0, pad_id=0, max_new_tokens=12)
    want = [_hand_greedy(model, kv, p, 0, 12) for p in prompts]
    assert got == want
    assert any(len(g) < 12 for g in got)  # some row met EOS before the limit


def _exhaustive(model, kv, prompt, eos, max_new, length_penalty, V=3):
    """The best sequence over every continuation of up to max_new tokens (EOS ends one)."""
    best, best_seq = -math.inf, None
    memo: dict[tuple[int, ...], torch.Tensor] = {}

    def logp(ctx: list[int]) -> torch.Tensor:
        if tuple(ctx) not in memo:
            memo[tuple(ctx)] = _next_logp(model, kv, ctx)
        return memo[tuple(ctx)]

    for n in range(1, max_new + 1):
        for seq in itertools.product(range(V), repeat=n):
            if eos in seq[:-1]:
                continue  # EOS only last
            if n < max_new and seq[-1] != eos:
                continue  # shorter than the limit only when it ends in EOS
            total, ctx = 0.0, list(prompt)
            for tok in seq:
                total += float(logp(ctx)[tok])
                ctx.append(tok)
            score = total / (n ** length_penalty)
            if score > best:
                best, best_seq = score, [t for t in seq if t != eos]
    return best_seq


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam_search_equals_exhaustive_search_on_three_tokens(length_penalty):
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=3).eval()
    with torch.no_grad():  # flatter next-token distributions: greedy choices are not the best
        model.model.norm.weight.mul_(0.1)
    kv = _random_kv(model, seed=1)
    prompts = [[1, 2], [2, 2, 1, 1], [1], [2, 1, 2]]
    max_new = 4
    want = [_exhaustive(model, kv, p, 0, max_new, length_penalty) for p in prompts]
    # 3**(max_new-1) beams hold every live sequence: beam search must find the exact best.
    got = beam_search(model, kv, prompts, eos_id=0, pad_id=0, max_new_tokens=max_new,
                      num_beams=27, length_penalty=length_penalty)
    assert got == want
    # The search is not trivial here: one beam (greedy) misses the best somewhere.
    one = beam_search(model, kv, prompts, 0, 0, max_new, num_beams=1,
                      length_penalty=length_penalty)
    assert one != want


def test_beam_search_scores_at_least_greedy(loaded):
    """Beam search's best is never less likely (same normalization) than the greedy path."""
    model = loaded.model
    kv = _random_kv(model)
    prompts = [[5, 17, 40, 3], [9, 8]]

    def score(prompt, seq):
        total = 0.0
        for i, tok in enumerate(seq):
            total += float(_next_logp(model, kv, prompt + seq[:i])[tok])
        return total

    g = greedy(model, kv, prompts, 0, 0, 6)
    b = beam_search(model, kv, prompts, 0, 0, 6, num_beams=4, length_penalty=0.0)
    for p, gs, bs in zip(prompts, g, b, strict=True):
        if len(gs) == len(bs) == 6:
            assert score(p, bs) >= score(p, gs) - 1e-5


def test_stop_string_cuts_the_text(loaded, tokenizer):
    model = loaded.model
    prompt = tokenizer("the movie was", add_special_tokens=False)["input_ids"]
    free = generate_texts(model, tokenizer, None, [prompt], DecodeConfig(max_new_tokens=12))[0]
    assert len(free) > 2
    stop = free[1:3]
    cut = generate_texts(model, tokenizer, None, [prompt],
                         DecodeConfig(max_new_tokens=12, stop=[stop]))[0]
    assert stop not in cut and free.startswith(cut) and len(cut) < len(free)


def test_decode_config_lists_every_problem():
    with pytest.raises(ConfigError) as e:
        DecodeConfig(max_new_tokens=0, num_beams=0, stop=[""])
    assert "max_new_tokens" in str(e.value) and "num_beams" in str(e.value)
    assert "stop" in str(e.value)


def test_a_stop_string_at_the_first_character_leaves_an_empty_output(loaded, tokenizer):
    model = loaded.model
    prompt = tokenizer("the movie was", add_special_tokens=False)["input_ids"]
    free = generate_texts(model, tokenizer, None, [prompt], DecodeConfig(max_new_tokens=12))[0]
    cut = generate_texts(model, tokenizer, None, [prompt],
                         DecodeConfig(max_new_tokens=12, stop=[free[0]]))[0]
    assert cut == ""
    assert cut_at_stop("The Eagle is a pub.\nMore", ["\n"]) == "The Eagle is a pub."


def test_beam_search_equals_transformers_where_beams_often_end():
    """Against transformers' beam search (early_stopping="never": the same stopping rule), with
    EOS made one of the likeliest tokens, so many of the best candidates end a beam. Beam
    search must then look past them (2N candidates per step) to keep N beams alive."""
    torch.manual_seed(0)
    model = tiny_model("llama", vocab_size=40).eval()
    eos, pad, N, max_new = 7, 0, 3, 8

    def likelier_eos(module, inputs, logits):  # EOS near the top everywhere, rarely certain
        logits = logits.clone()
        logits[..., eos] += 2.0
        return logits

    model.lm_head.register_forward_hook(likelier_eos)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 40, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 7, (45,), generator=g)]
    got = beam_search(model, None, prompts, eos, pad, max_new, num_beams=N)
    want = []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([p]), max_new_tokens=max_new,
                                 num_beams=N, do_sample=False, pad_token_id=pad,
                                 eos_token_id=eos, length_penalty=1.0, early_stopping="never")
        row = out[0, len(p):].tolist()
        want.append(row[:row.index(eos)] if eos in row else row)
    ended_early = sum(len(w) < max_new for w in want)
    assert ended_early >= 10  # the case this test is about: beams that end
    assert got == want
