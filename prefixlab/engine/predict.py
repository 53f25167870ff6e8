"""Label scoring and free generation, with a prefix or with the bare model.

Scoring compares every label's full token sequence after the prompt, through the one scoring
path of engine.mixed (a single prefix is a mixed batch whose rows all read it). Texts are
batched by length, with ThreadTuner (engine.cpu) picking the CPU thread count batch by batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from prefixlab.engine.cpu import ThreadTuner
from prefixlab.engine.decode import Sampling, decode_rows
from prefixlab.engine.encode import Encoder
from prefixlab.engine.families import cache_keyword
from prefixlab.engine.mixed import mixed_label_log_likelihoods
from prefixlab.engine.prefix import build_cache


def label_log_likelihoods(
    model: nn.Module,
    kv: torch.Tensor | None,
    prompts: Sequence[Sequence[int]],
    label_ids: Sequence[Sequence[int]],
    pad_id: int,
) -> torch.Tensor:
    """log p(label tokens | prefix, prompt) for one batch: (B, K), summed over label tokens.

    The mixed-batch path with every row reading the same prefix and labels: one scoring
    path for one prefix and for many.
    """
    B = len(prompts)
    return torch.stack(mixed_label_log_likelihoods(model, [kv] * B, prompts, [label_ids] * B,
                                                   pad_id))


@torch.inference_mode()
def score_log_likelihoods(
    model: nn.Module,
    kv: torch.Tensor | None,
    encoder: Encoder,
    texts: Sequence[str],
    batch_size: int = 16,
) -> np.ndarray:
    """log p(label tokens | prompt) (N, K) over the full vocabulary, in `encoder.labels` order.

    Texts are batched by length (little padding) and results returned in input order. The
    gold column gives the validation loss too, so evaluation reads each text once.
    """
    prompts = encoder.prompts(texts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = np.zeros((len(prompts), len(encoder.labels)), dtype=np.float64)
    pad = encoder.tokenizer.pad_token_id
    # one thread while other processes hold the cores
    tuner = ThreadTuner(next(model.parameters()).device)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            tuner.start()
            ll = label_log_likelihoods(model, kv, [prompts[i] for i in idx], encoder.label_ids,
                                       pad)
            tuner.stop(len(idx) * max(len(prompts[i]) for i in idx))
            out[idx] = ll.double().numpy()
    finally:
        tuner.close()
    return out


def score_labels(
    model: nn.Module,
    kv: torch.Tensor | None,
    encoder: Encoder,
    texts: Sequence[str],
    batch_size: int = 16,
) -> np.ndarray:
    """Label probabilities (N, K) in `encoder.labels` order, by the encoder's decision rule;
    kv None scores the bare model."""
    return encoder.rule.probs(score_log_likelihoods(model, kv, encoder, texts, batch_size))


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    kv: torch.Tensor | None,
    prompts: Sequence[str],
    max_new_tokens: int = 40,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Continue each prompt after the prefix; returns only the new text per prompt.

    Greedy continuations go through transformers' generate. The prefix goes in through
    generate's current cache keyword with a (B, P+T) mask, so generate derives positions
    itself (a T-long mask would silently drop P input tokens). Sampling runs our own loop
    (decode.decode_rows), prompt j on a torch.Generator of its own seeded from `seed`
    (`Sampling.for_row`): transformers' generate draws from torch's global RNG, which a
    request thread of the app must not reseed, and with a generator per row a prompt's text
    is the same alone or in a mixed batch with other requests.
    """
    device = next(model.parameters()).device
    rows = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) or [tokenizer.eos_token_id]
            for p in prompts]
    pad = tokenizer.pad_token_id
    if do_sample:
        sampling = Sampling(seed, temperature, top_p)
        new_ids = decode_rows(model, kv, rows, tokenizer.eos_token_id, pad, max_new_tokens,
                              [sampling.for_row(j) for j in range(len(rows))])
        return [tokenizer.decode(row, skip_special_tokens=True) for row in new_ids]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding: new tokens follow every prompt directly
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    ids, mask = ids.to(device), mask.to(device)
    kwargs: dict = {"attention_mask": mask}
    if kv is not None:
        P = kv.shape[3]
        kwargs["attention_mask"] = torch.cat(
            [torch.ones(len(rows), P, dtype=mask.dtype, device=device), mask], 1
        )
        # generate takes the same keyword as forward: `cache` from transformers 5.24 on.
        kwargs[cache_keyword(model)] = build_cache(kv.to(device), len(rows), model)
    out = model.generate(
        input_ids=ids, max_new_tokens=max_new_tokens, pad_token_id=pad, do_sample=False,
        **kwargs,
    )
    new = out[:, T:]
    return [tokenizer.decode(row, skip_special_tokens=True) for row in new]
