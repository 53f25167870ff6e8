"""Decoding after a prefix: greedy, sampling and beam search, batched, stopping at EOS or a
stop string.

The prompt is read once per batch with the prefix's cache in front of it; for beam search that
cache (prefix + prompt) is then repeated once per beam (`batch_repeat_interleave`) and every
later step reads one new token per beam against it, reordering rows (`reorder_cache`) as
beams are chosen. Nothing re-reads the prefix or the prompt after the first forward.

Beam search ranks live beams by their summed log-probability and finished ones by that sum
divided by length**length_penalty (the length counts the EOS token). It stops a row only when
no live beam can still beat the worst of `num_beams` finished ones: with log-probabilities <= 0
that bound is exact, so with enough beams the result equals an exhaustive search (tested).

Every loop takes one prefix for the whole batch or one per row (`Prefixes`): rows of different
prefixes share a batch through engine.mixed's stacked cache, each row reading exactly what it
reads alone. `decode_rows` also gives each row its own token budget and its own way to pick
tokens (greedy, or drawn with a generator of its own seed: `Sampling`), so requests of many
clients, greedy and sampled, decode together and each row's text depends on its own seed only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from prefixlab.engine.families import cache_keyword, returned_cache
from prefixlab.engine.mixed import mixed_inputs, stack_prefixes
from prefixlab.engine.prefix import prefix_inputs
from prefixlab.errors import ConfigError

Prefixes = torch.Tensor | Sequence[torch.Tensor | None] | None
"""One prefix (L, 2, H_kv, P, D) for every row, one per row (None: that row has none), or
None: the bare model for every row."""


class DecodeError(ConfigError):
    """Decoding settings that cannot be used (a ConfigError: a run config collects them)."""


@dataclass
class DecodeConfig:
    """How texts are generated. Stored with a generation run (config.json)."""

    max_new_tokens: int = 64
    """Most tokens generated per input; E2E references are ~30 tokens, rarely over 60."""
    num_beams: int = 1
    """1 decodes greedily; Li & Liang used beam search with 5 beams."""
    length_penalty: float = 1.0
    """Finished beams are ranked by sum log p / length**length_penalty (0 = plain sum)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a generation (cut off with what follows); EOS always ends one."""
    batch_size: int = 16
    """Inputs decoded together; beam search holds batch_size * num_beams rows."""

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.max_new_tokens <= 4096:
            problems.append(f"max_new_tokens must be 1..4096, got {self.max_new_tokens}")
        if not 1 <= self.num_beams <= 64:
            problems.append(f"num_beams must be 1..64, got {self.num_beams}")
        if not -5 <= self.length_penalty <= 5:
            problems.append(f"length_penalty must be in [-5, 5], got {self.length_penalty}")
        if not 1 <= self.batch_size <= 1024:
            problems.append(f"batch_size must be 1..1024, got {self.batch_size}")
        self.stop = list(self.stop)
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append(f"stop strings must be non-empty strings, got {self.stop!r}")
        if problems:
            raise DecodeError(problems)


StopCheck = Callable[[list[int]], bool]
"""Whether a row's generated tokens so far contain a stop string."""


def _left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding, so that every row's next token follows its prompt directly."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, T - len(r):] = 1
    return ids, mask


def _prefill(model: nn.Module, kv: Prefixes, prompts: Sequence[Sequence[int]],
             pad_id: int, repeat: int, room: int):
    """Read the prompts after the prefix once: (next-token logits (B*repeat, V), cache with
    `room` free positions, attention mask over prefix + prompt (B*repeat, P+T)), rows
    repeated `repeat` times."""
    from transformers import DynamicCache

    from prefixlab.engine.kvcache import make_room

    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    if isinstance(kv, torch.Tensor) or kv is None:
        kwargs = prefix_inputs(model, kv.to(device) if kv is not None else None, mask)
    else:  # one prefix per row: stacked, shorter ones padded with masked slots
        if len(kv) != len(prompts):
            raise ValueError(f"{len(kv)} prefixes for {len(prompts)} prompts: give one per row")
        kwargs = mixed_inputs(model, stack_prefixes(kv, device), mask)
    if cache_keyword(model) not in kwargs:  # the bare model: generate a cache from nothing
        kwargs[cache_keyword(model)] = DynamicCache(config=model.config)
    out = model(input_ids=ids, logits_to_keep=1, use_cache=True, **kwargs)
    logits = out.logits[:, -1].float()  # (B, V)
    # Each step then writes its token in place instead of copying the whole cache (torch.cat).
    cache = make_room(returned_cache(out), room)
    full_mask = kwargs["attention_mask"]  # (B, P+T)
    if repeat > 1:  # the prefix + prompt cache copied once per beam, never re-read
        cache.batch_repeat_interleave(repeat)
        full_mask = full_mask.repeat_interleave(repeat, 0)
        logits = logits.repeat_interleave(repeat, 0)
    return logits, cache, full_mask


def _step(model: nn.Module, cache, tokens: torch.Tensor, mask: torch.Tensor):
    """One new token per row (N,) against the cache: (logits (N, V), mask (N, S+1))."""
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
    positions = mask.sum(-1, keepdim=True) - 1  # (N, 1): left padding and prefix counted right
    out = model(input_ids=tokens.unsqueeze(1), attention_mask=mask, position_ids=positions,
                use_cache=True, **{cache_keyword(model): cache})
    return out.logits[:, -1].float(), mask


@torch.inference_mode()
def greedy(model: nn.Module, kv: Prefixes, prompts: Sequence[Sequence[int]],
           eos_id: int, pad_id: int, max_new_tokens: int,
           stop_check: StopCheck | None = None) -> list[list[int]]:
    """The most likely next token until EOS (left out), a stop string or max_new_tokens.

    Rows that finish leave the batch (and the cache), so the rest run on fewer rows.
    """
    # The largest logit is the most likely token: no softmax over the vocabulary needed.
    return _decode(model, kv, prompts, eos_id, pad_id, max_new_tokens,
                   lambda logits, rows: logits.argmax(-1), stop_check)


@dataclass(frozen=True)
class Sampling:
    """How one row draws its tokens: from the temperature-scaled distribution, cut to its
    smallest set of tokens holding `top_p` of the mass (nucleus sampling), with a generator
    on the model's device seeded with `seed` (never torch's global RNG: concurrent requests
    neither disturb each other's seeded results nor anything else that uses the global RNG)."""

    seed: int = 0
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        # Written so NaN fails too: every comparison with NaN is False.
        if not (0 < self.temperature < math.inf and 0 < self.top_p <= 1):
            raise DecodeError(f"temperature must be > 0 and top_p in (0, 1], got "
                              f"{self.temperature} and {self.top_p}")
        if not 0 <= self.seed < 2**63:
            raise DecodeError(f"seed must be 0..2**63-1, got {self.seed}")

    def for_row(self, j: int) -> Sampling:
        """The sampling of a request's row j: its own stream, row 0 on the request's seed.
        Rows of one request differ (two identical prompts get two draws); adding the golden
        ratio's 64 bits per row keeps them apart from other requests' seeds."""
        return replace(self, seed=(self.seed + j * 0x9E3779B97F4A7C15) % 2**63)


def draw_tokens(logp: torch.Tensor, generator: torch.Generator, temperature: float = 1.0,
                top_p: float = 1.0) -> torch.Tensor:
    """One token per row of log-probabilities (N, V), drawn where they are with `generator`,
    a generator on their device: no row's vocabulary is copied to the host (only the drawn
    token ids are read there). A seed gives the same draws on one kind of device; a GPU's
    generator draws other numbers than the CPU's for the same seed."""
    probs = torch.softmax(logp.float() / temperature, dim=-1)  # (N, V)
    if top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass of the tokens ranked above each
        sorted_p[before >= top_p] = 0  # the most likely token always stays (before == 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (N,)


@torch.inference_mode()
def decode_rows(model: nn.Module, kv: Prefixes, prompts: Sequence[Sequence[int]],
                eos_id: int, pad_id: int, max_new_tokens: int | Sequence[int],
                sampling: Sequence[Sampling | None] | None = None,
                stop_check: StopCheck | None = None) -> list[list[int]]:
    """Like `greedy`, with a token budget per row and, per row, greedy (None) or drawn tokens
    (`Sampling`, one generator per row). A row's tokens depend on its prompt, prefix, budget
    and seed alone, not on the rows it shares the batch with (up to float rounding)."""
    rows = sampling or [None] * len(prompts)
    if len(rows) != len(prompts):
        raise ValueError(f"{len(rows)} samplings for {len(prompts)} prompts: give one per row")
    device = next(model.parameters()).device
    generators = [None if s is None else torch.Generator(device).manual_seed(s.seed)
                  for s in rows]

    def pick(logits: torch.Tensor, alive: list[int]) -> torch.Tensor:
        tokens = logits.argmax(-1)  # (N,)
        for i, row in enumerate(alive):
            s = rows[row]
            if s is not None:  # row by row: each row's draws come from its own generator
                tokens[i] = draw_tokens(torch.log_softmax(logits[i:i + 1], -1),
                                        generators[row], s.temperature, s.top_p)[0]
        return tokens

    return _decode(model, kv, prompts, eos_id, pad_id, max_new_tokens, pick, stop_check)


def _decode(model: nn.Module, kv: Prefixes, prompts: Sequence[Sequence[int]],
            eos_id: int, pad_id: int, max_new_tokens: int | Sequence[int],
            pick: Callable[[torch.Tensor, list[int]], torch.Tensor],
            stop_check: StopCheck | None) -> list[list[int]]:
    """One token per row at a time, chosen by `pick` from the logits (N, V) of the rows still
    alive, until EOS (left out), a stop string or the row's budget; finished rows leave the
    batch and the cache."""
    budgets = ([int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int)
               else [int(n) for n in max_new_tokens])
    logits, cache, mask = _prefill(model, kv, prompts, pad_id, 1, max(budgets))
    out: list[list[int]] = [[] for _ in prompts]
    alive = list(range(len(prompts)))  # the prompt each cache row belongs to
    for _ in range(max(budgets)):
        tokens = pick(logits, alive)  # (N,)
        finished = []
        for i, (row, tok) in enumerate(zip(alive, tokens.tolist(), strict=True)):
            if tok == eos_id:
                finished.append(i)
                continue
            out[row].append(tok)
            if len(out[row]) >= budgets[row] or (stop_check is not None
                                                 and stop_check(out[row])):
                finished.append(i)
        if len(finished) == len(alive):
            break
        if finished:
            gone = set(finished)
            keep = [i for i in range(len(alive)) if i not in gone]
            index = torch.tensor(keep, device=tokens.device)
            cache.batch_select_indices(index)
            mask, tokens = mask[index], tokens[index]
            alive = [alive[i] for i in keep]
        logits, mask = _step(model, cache, tokens, mask)
    return out


def _normalized(score: float, length: int, length_penalty: float) -> float:
    return score / (length ** length_penalty)


@torch.inference_mode()
def beam_search(model: nn.Module, kv: Prefixes, prompts: Sequence[Sequence[int]],
                eos_id: int, pad_id: int, max_new_tokens: int, num_beams: int,
                length_penalty: float = 1.0,
                stop_check: StopCheck | None = None) -> list[list[int]]:
    """The best finished beam per prompt (EOS left out); see the module docstring."""
    N = num_beams
    logits, cache, mask = _prefill(model, kv, prompts, pad_id, N, max_new_tokens)  # (B*N, V)
    logp = torch.log_softmax(logits, dim=-1)
    device = logp.device
    V = logp.shape[-1]
    alive = list(range(len(prompts)))  # prompts still searching, N cache rows each
    scores = torch.full((len(prompts), N), -math.inf, device=device)
    scores[:, 0] = 0.0  # all beams start equal: only the first may extend at step 0
    seqs: list[list[list[int]]] = [[[] for _ in range(N)] for _ in prompts]
    done: list[list[tuple[float, list[int]]]] = [[] for _ in prompts]  # (normalized, tokens)

    def finish(b: int, score: float, tokens: list[int], length: int) -> None:
        done[b].append((_normalized(score, length, length_penalty), tokens))
        done[b].sort(key=lambda d: -d[0])
        del done[b][N:]

    for t in range(max_new_tokens):
        last = t == max_new_tokens - 1
        cand = (scores[alive].reshape(-1, 1) + logp).view(len(alive), N * V)
        k = min(2 * N, N * V)
        top, idx = cand.topk(k, dim=1)  # (A, k) by summed log p
        top, idx = top.tolist(), idx.tolist()
        next_alive, reorder, next_tokens = [], [], []
        new_scores = torch.full((len(prompts), N), -math.inf, device=device)
        for a, b in enumerate(alive):
            kept: list[tuple[int, int, float]] = []  # (source beam, token, summed log p)
            for s, j in zip(top[a], idx[a], strict=True):
                if s == -math.inf or len(kept) == N:
                    break
                src, tok = divmod(j, V)
                seq = seqs[b][src]
                if tok == eos_id:
                    finish(b, s, list(seq), len(seq) + 1)
                elif last or (stop_check is not None and stop_check(seq + [tok])):
                    finish(b, s, seq + [tok], len(seq) + 1)
                else:
                    kept.append((src, tok, s))
            if not kept or last:
                continue
            # No live beam can still beat the worst kept finished one: this prompt is done.
            longest = max_new_tokens if length_penalty > 0 else t + 2
            bound = _normalized(kept[0][2], longest, length_penalty)
            if len(done[b]) >= N and bound <= done[b][-1][0]:
                continue
            kept += [(kept[0][0], pad_id, -math.inf)] * (N - len(kept))  # dead fillers
            next_alive.append(b)
            seqs[b] = [seqs[b][src] + [tok] for src, tok, _ in kept]
            for n, (src, tok, s) in enumerate(kept):
                new_scores[b, n] = s
                reorder.append(a * N + src)
                next_tokens.append(tok)
        if not next_alive:
            break
        scores = new_scores
        index = torch.tensor(reorder, device=device)
        cache.reorder_cache(index)  # picks (and drops) rows: one index_select per layer
        mask = mask[index]
        alive = next_alive
        logits, mask = _step(model, cache, torch.tensor(next_tokens, device=device), mask)
        logp = torch.log_softmax(logits, dim=-1)
    return [d[0][1] if d else [] for d in done]


def generate_ids(model: nn.Module, kv: torch.Tensor | None,
                 prompts: Sequence[Sequence[int]], eos_id: int, pad_id: int,
                 config: DecodeConfig, stop_check: StopCheck | None = None) -> list[list[int]]:
    """New token ids per prompt (EOS left out), prompts batched by length, results in order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), config.batch_size):
        idx = order[start: start + config.batch_size]
        rows = [prompts[i] for i in idx]
        if config.num_beams == 1:
            new = greedy(model, kv, rows, eos_id, pad_id, config.max_new_tokens, stop_check)
        else:
            new = beam_search(model, kv, rows, eos_id, pad_id, config.max_new_tokens,
                              config.num_beams, config.length_penalty, stop_check)
        for i, ids in zip(idx, new, strict=True):
            out[i] = ids
    return out


def mixed_generate(model: nn.Module, tokenizer, kvs: Sequence[torch.Tensor | None],
                   prompts: Sequence[str | Sequence[int]],
                   max_new_tokens: int | Sequence[int] = 40,
                   sampling: Sequence[Sampling | None] | None = None, num_beams: int = 1,
                   length_penalty: float = 1.0) -> list[str]:
    """The continuation of each prompt after its own prefix, only the new text per row, all
    rows in one batch: greedy or sampled per row (`decode_rows`), or beam search for every
    row (rows then share `max_new_tokens`, an int). A prompt is a text, or token ids already
    made (e.g. an input written into a run's template by its encoder)."""
    rows = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) if isinstance(p, str)
            else list(p) for p in prompts]
    rows = [row or [tokenizer.eos_token_id] for row in rows]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if num_beams > 1:
        if not isinstance(max_new_tokens, int) or sampling is not None:
            raise ValueError("beam search rows share one max_new_tokens and draw nothing")
        ids = beam_search(model, list(kvs), rows, eos, pad, max_new_tokens, num_beams,
                          length_penalty)
    else:
        ids = decode_rows(model, list(kvs), rows, eos, pad, max_new_tokens, sampling)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]


def decode_memory(config, rows: int, slots: int, prompt_tokens: int, new_tokens: int,
                  beams: int = 1, element_bytes: int = 4) -> int:
    """Bytes a batch's decoding holds at its peak, estimated from the model's shape before
    anything is allocated: every row's and beam's key/value cache with room for its new
    tokens (prefix slots + padded prompt + new tokens), plus the larger of what the prefill
    holds besides (one layer's activations and attention scores, and the cache before it is
    copied into room) and a few vocabulary-wide rows of logits per row and beam."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    hidden = config.hidden_size
    inner = getattr(config, "intermediate_size", None) or 4 * hidden
    per_position = layers * 2 * kv_heads * head_dim * element_bytes
    cache = per_position * rows * beams * (slots + prompt_tokens + new_tokens)
    read = slots + prompt_tokens
    prefill = max(rows * prompt_tokens * (3 * hidden + 2 * inner) * element_bytes
                  + rows * heads * prompt_tokens * read * element_bytes,
                  per_position * rows * read)
    logits = 4 * rows * beams * config.vocab_size * 4  # float32, a few copies per step
    return cache + prefill + logits


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop string, if any."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def generate_texts(model: nn.Module, tokenizer, kv: torch.Tensor | None,
                   prompts: Sequence[Sequence[int]], config: DecodeConfig) -> list[str]:
    """Generated text per prompt (token ids), cut at a stop string and stripped."""
    stop_check = None
    if config.stop:
        def stop_check(ids: list[int]) -> bool:
            # Leading whitespace is not an answer's end: a model that opens with a newline
            # (a bare model after "Output:") is not cut to nothing by a "\n" stop.
            text = tokenizer.decode(ids, skip_special_tokens=True).lstrip()
            return any(s in text for s in config.stop)
    eos = tokenizer.eos_token_id
    ids = generate_ids(model, kv, prompts, eos, tokenizer.pad_token_id, config, stop_check)
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    # One line-break convention for what shows the text: a lone carriage return breaks a
    # Markdown table row in the report and moves the cursor in a terminal.
    texts = [t.replace("\r\n", "\n").replace("\r", "\n") for t in texts]
    return [cut_at_stop(t.lstrip(), config.stop).strip() for t in texts]
