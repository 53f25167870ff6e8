"""A readable prompt: real tokens whose label decisions match a prefix's (soft-to-hard).

The search is PEZ (Wen et al. 2023, "Hard Prompts Made Easy") with a KL objective. Continuous
embeddings E (N, d) are kept; every step projects each row to its nearest vocabulary embedding
(cosine), reads the projected prompt and the template's head once, lets a batch of rows read
their text after that cache, and takes KL(prefix's label distribution || the prompt's) on the
batch. The gradient of the projected embeddings is applied to E (straight-through), so E can
drift until a slot's projection flips to another token. What is kept is the best projected
prompt by agreement with the prefix's argmax label over the search rows, never E itself.

A prompt is a sequence of token ids; the text exported is their decoding, which may not
tokenize back to the same ids, so every reported figure is of the text read back
(`prompt_key_values`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prefixlab.engine.balance import LabelRule
from prefixlab.engine.encode import Encoder
from prefixlab.engine.families import returned_cache
from prefixlab.engine.mixed import ScoreItem, mixed_score_labels
from prefixlab.engine.prefix import prefix_inputs, text_key_values
from prefixlab.interpret.frame import InterpretError
from prefixlab.interpret.nearest import NearestTokens, ordinary_token_ids


@dataclass(frozen=True)
class SearchConfig:
    """How hard the PEZ search looks (the defaults fit the default model on 2 CPU cores)."""

    steps: int = 60
    """Gradient steps at most; each reads `batch_size` rows forward and backward."""
    batch_size: int = 8
    """Rows per step: few, because on a CPU a step costs as much as a training step."""
    lr: float | None = None
    """AdamW's rate on E; None: a quarter of the vocabulary embeddings' per-dimension spread
    (PEZ's 0.1 is 0.7 of it on the default model, where each step then moves E most of an
    embedding's length and the projections flip at random rather than where the gradient
    keeps pushing)."""
    label_bias: bool = True
    """Learn one bias per label beside the prompt (kept only for the search's objective) and
    fit one per finalist: a text prompt to a small model is often miscalibrated (it picks
    one label for every row) where the prefix is not, and a calibration offset is not what
    the tokens should be spent on. The prompt is reported with and without its bias."""
    weight_decay: float = 0.1
    """PEZ's: keeps E near the embedding sphere, where projections are meaningful."""
    seconds: float | None = None
    """Stop the steps after this long (None: only `steps` stops them)."""
    finalists: int = 3
    """Distinct prompts rescored at the end: the best by batch agreement, and the start."""
    rescore_rows: int = 64
    """Search rows the finalists are rescored on (a seeded sample): a row read costs the same
    for every finalist, and 64 rows tell prompts apart that differ on a few percent of them
    as well as the noise of the batches they were seen on allows."""
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        if self.steps < 0:
            problems.append(f"steps must be 0 or more, got {self.steps}")
        if self.batch_size < 1 or self.finalists < 1 or self.rescore_rows < 1:
            problems.append("batch_size, finalists and rescore_rows must be positive")
        if self.seconds is not None and self.seconds <= 0:
            problems.append(f"seconds must be positive or None, got {self.seconds}")
        if self.lr is not None and self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if problems:
            raise InterpretError("; ".join(problems))


@dataclass
class Prompt:
    """A hard prompt and how it reads beside the prefix on some rows."""

    ids: list[int]
    text: str
    agreement: float  # share of rows whose argmax label matches the prefix's, with the bias
    probs: np.ndarray = field(repr=False)  # (R, K) its label probabilities on those rows
    # (in a SearchResult: the rescored sample of the search rows, SearchConfig.rescore_rows)
    bias: np.ndarray | None = None  # (K,) added to its label log-probabilities (fit_bias)


@dataclass
class SearchResult:
    best: Prompt  # on the search rows
    start: list[int]  # the ids the search started from
    steps: int  # gradient steps taken
    seconds: float
    history: list[float]  # per step: the KL on its batch
    rescored: list[int] = field(default_factory=list)  # the search rows finalists were read on
    finalists: dict[str, Prompt] = field(default_factory=dict)  # by text, on those rows


def fit_length(ids: Sequence[int], n: int) -> list[int]:
    """`ids` repeated to fill `n` tokens, or cut to `n` (text_key_values' rule)."""
    if not ids:
        raise InterpretError("a prompt needs at least one token")
    return (list(ids) * (n // len(ids) + 1))[:n]


def nearest_ids(nearest: NearestTokens) -> list[int]:
    """One token per prefix slot: at layer 0 (ranked against the whole vocabulary), the token
    whose key and value scores sum highest among the tokens both top-k lists name, else the
    key's top-1 (a slot whose key and value point to different tokens)."""
    out = []
    for p in range(nearest.token_ids.shape[2]):
        keys = dict(zip(nearest.token_ids[0, 0, p].tolist(), nearest.scores[0, 0, p].tolist(),
                        strict=True))
        values = dict(zip(nearest.token_ids[0, 1, p].tolist(),
                          nearest.scores[0, 1, p].tolist(), strict=True))
        both = {t: keys[t] + values[t] for t in keys if t in values}
        out.append(int(max(both, key=both.__getitem__)) if both
                   else int(nearest.token_ids[0, 0, p, 0]))
    return out


def prompt_key_values(model: nn.Module, tokenizer, text: str) -> torch.Tensor:
    """The key/values (L, 2, H_kv, S, D) of `text` read as it is, S its own token count: a
    prefix of this is the text placed before the template."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InterpretError(f"the prompt {text!r} has no tokens")
    return text_key_values(model, tokenizer, text, len(ids))


def score_prompt(model: nn.Module, encoder: Encoder, text: str, texts: Sequence[str],
                 batch_size: int = 16) -> np.ndarray:
    """Label probabilities (R, K) of `texts` with the text prompt read first, by the encoder's
    rule (engine.mixed: the path every prefix is scored on)."""
    kv = prompt_key_values(model, encoder.tokenizer, text)
    return np.stack(mixed_score_labels(model, [ScoreItem(kv, encoder, t) for t in texts],
                                       batch_size))


def fit_bias(probs: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The per-label offset b (K,), mean zero, that brings softmax(log probs + b) closest to
    the target (R, K) in cross-entropy (so in KL): convex in b, solved by L-BFGS."""
    logp = torch.tensor(np.log(np.clip(probs, 1e-12, None)), dtype=torch.float64)
    goal = torch.tensor(target, dtype=torch.float64)
    b = torch.zeros(logp.shape[1], dtype=torch.float64, requires_grad=True)
    optim = torch.optim.LBFGS([b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optim.zero_grad()
        loss = -(goal * (logp + b).log_softmax(-1)).sum(-1).mean()
        loss.backward()
        return loss

    with torch.enable_grad():
        optim.step(closure)
    out = b.detach().numpy()
    return out - out.mean()


def biased(probs: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Label probabilities (R, K) with a per-label log offset added (None: as they are)."""
    if bias is None:
        return probs
    logits = np.log(np.clip(probs, 1e-12, None)) + bias
    logits -= logits.max(1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(1, keepdims=True)


def agreement(probs: np.ndarray, target: np.ndarray) -> float:
    """Share of rows whose argmax label is the target's."""
    return float((probs.argmax(1) == target.argmax(1)).mean()) if len(target) else 0.0


def readable_vocabulary(tokenizer, vocab_size: int | None = None) -> list[int]:
    """The ordinary tokens a slot may become: those that decode to whole characters and read
    back as themselves, so that the exported text mostly tokenizes back to the prompt found
    (a byte-level token holding half a character decodes to U+FFFD and would not)."""
    ids = ordinary_token_ids(tokenizer, vocab_size)
    texts = [tokenizer.decode([i]) for i in ids]
    back = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [i for i, t, b in zip(ids, texts, back, strict=True)
            if t.strip() and "\ufffd" not in t and t.isprintable() and b == [i]]


def _rule_log_probs(rule: LabelRule, ll: torch.Tensor) -> torch.Tensor:
    """LabelRule.log_probs in torch, so that the KL has a gradient: (B, K) -> (B, K)."""
    if rule.lengths is not None:
        ll = ll / torch.tensor(rule.lengths, dtype=ll.dtype, device=ll.device)
    out = ll.log_softmax(-1)
    if rule.offset is not None:
        out = (out - torch.tensor(rule.offset, dtype=ll.dtype, device=ll.device)).log_softmax(-1)
    return out


def _label_log_likelihoods(model: nn.Module, kv: torch.Tensor, rows: Sequence[Sequence[int]],
                           label_ids: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """log p(label | kv, row) (B, K), differentiable in kv (L, 2, H_kv, S, D). One forward when
    every label is one token; else one per label, each row continued with that label."""
    device = kv.device
    single = all(len(t) == 1 for t in label_ids)
    reads = [[]] if single else [list(t[:-1]) for t in label_ids]
    columns = []
    for cont in reads:
        seqs = [list(r) + cont for r in rows]
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad_id, dtype=torch.long, device=device)
        mask = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
        keep = torch.zeros(len(seqs), T, dtype=torch.bool, device=device)
        for i, (r, s) in enumerate(zip(rows, seqs, strict=True)):
            ids[i, :len(s)] = torch.tensor(s, device=device)
            mask[i, :len(s)] = 1
            keep[i, len(r) - 1:len(s)] = True  # each row's last prompt token, then the label's
        out = model(input_ids=ids, logits_to_keep=keep, use_cache=True,
                    **prefix_inputs(model, kv, mask))
        logp = out.logits.float().log_softmax(-1)  # (B * (len(cont)+1), V)
        if single:
            columns = [logp[:, [t[0] for t in label_ids]]]  # (B, K)
            break
        label = label_ids[len(columns)]
        per_row = logp.view(len(rows), len(label), -1)  # (B, M, V)
        tokens = torch.tensor(label, device=device)
        columns.append(per_row.gather(-1, tokens.expand(len(rows), -1)[..., None]).sum((1, 2)))
    return columns[0] if single else torch.stack(columns, 1)


def _prompt_cache(model: nn.Module, x: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Key/values (L, 2, H_kv, N + h, D) of the prompt embeddings x (N, d) and the template's
    head embeddings (h, d), differentiable in x."""
    out = model(inputs_embeds=torch.cat([x, head])[None], use_cache=True, logits_to_keep=1)
    cache = returned_cache(out)
    return torch.stack([torch.stack([layer.keys[0], layer.values[0]])
                        for layer in cache.layers])  # (L, 2, H, N+h, D)


class Targets:
    """The prefix's label probabilities on the search rows, read only for the rows a batch or
    the rescoring draws: a search cut short by its time budget reads a share of them."""

    def __init__(self, texts: Sequence[str],
                 decide: np.ndarray | Callable[[list[str]], np.ndarray]) -> None:
        self.texts = list(texts)
        self.known: dict[int, np.ndarray] = {}
        if isinstance(decide, np.ndarray):
            if len(decide) != len(self.texts):
                raise InterpretError(f"the search needs one target per row; got "
                                     f"{len(self.texts)} texts and {len(decide)} targets")
            self.known = dict(enumerate(decide))
        self.decide = decide

    def __call__(self, rows: Sequence[int]) -> np.ndarray:
        """(len(rows), K) targets of these rows."""
        if missing := [i for i in dict.fromkeys(rows) if i not in self.known]:
            assert callable(self.decide)
            self.known.update(zip(missing, self.decide([self.texts[i] for i in missing]),
                                  strict=True))
        return np.stack([self.known[i] for i in rows])


def search_prompt(model: nn.Module, encoder: Encoder, texts: Sequence[str],
                  target: np.ndarray | Callable[[list[str]], np.ndarray],
                  start_ids: Sequence[int], config: SearchConfig | None = None,
                  vocabulary: Sequence[int] | None = None,
                  progress: Callable[[str], None] | None = None) -> SearchResult:
    """PEZ from `start_ids` (its length is the prompt's): the prompt whose label decisions on
    `texts` agree most with the prefix's label probabilities on them: `target` (R, K), or a
    function from texts to them, called for the rows the search reads (Targets).

    vocabulary: the token ids a slot may project to (default: every ordinary token).
    """
    cfg = config or SearchConfig()
    began = time.monotonic()
    tok = encoder.tokenizer
    if not len(texts):
        raise InterpretError("the search needs rows to match the prefix on")
    targets = target if isinstance(target, Targets) else Targets(texts, target)
    embed = model.get_input_embeddings()
    weight = embed.weight.detach()  # (V_model, d)
    vocab = torch.tensor(list(vocabulary) if vocabulary is not None
                         else readable_vocabulary(tok, weight.shape[0]), device=weight.device)
    table = weight[vocab].float()  # (V, d)
    unit = F.normalize(table, dim=-1)  # (V, d)
    head = weight[torch.tensor(encoder.head_ids, dtype=torch.long,
                               device=weight.device)].float()  # (h, d)
    rows = [encoder.prompt(t)[0][len(encoder.head_ids):] for t in texts]
    E = nn.Parameter(weight[torch.tensor(list(start_ids), device=weight.device)].float().clone())
    lr = cfg.lr if cfg.lr is not None else 0.25 * float(table.std())
    bias = nn.Parameter(torch.zeros(len(encoder.label_ids)))
    optim = torch.optim.AdamW([{"params": [E]},
                               {"params": [bias], "lr": 0.1, "weight_decay": 0.0}],
                              lr=lr, weight_decay=cfg.weight_decay)
    generator = np.random.default_rng(cfg.seed)
    seen: dict[tuple[int, ...], list[float]] = {}  # ids -> [rows agreeing, rows read, KL sum]
    history: list[float] = []
    dtype = weight.dtype
    steps = 0
    for step in range(cfg.steps):
        if cfg.seconds is not None and time.monotonic() - began > cfg.seconds:
            break
        batch = generator.choice(len(rows), min(cfg.batch_size, len(rows)), replace=False)
        nearest = (F.normalize(E.detach(), dim=-1) @ unit.T).argmax(-1)  # (N,)
        projected = table[nearest]  # (N, d)
        x = E + (projected - E).detach()  # forward reads the projection; gradient reaches E
        with torch.enable_grad():
            kv = _prompt_cache(model, x.to(dtype), head.to(dtype))
            ll = _label_log_likelihoods(model, kv, [rows[i] for i in batch], encoder.label_ids,
                                        tok.pad_token_id)
            logp = _rule_log_probs(encoder.rule, ll.float())  # (B, K)
            if cfg.label_bias:
                logp = (logp + bias).log_softmax(-1)
            p = torch.tensor(targets(batch.tolist()), dtype=torch.float32)  # (B, K)
            loss = (p * (p.clamp_min(1e-12).log() - logp)).sum(-1).mean()  # KL(prefix||prompt)
            optim.zero_grad()
            loss.backward()
        optim.step()
        ids = tuple(vocab[nearest].tolist())
        count = seen.setdefault(ids, [0, 0, 0.0])
        count[0] += int((logp.argmax(-1) == p.argmax(-1)).sum())
        count[1] += len(batch)
        count[2] += float(loss.detach()) * len(batch)
        history.append(float(loss.detach()))
        steps = step + 1
        if progress and step % 5 == 0:
            progress(f"readable prompt: step {step + 1}/{cfg.steps}, KL {history[-1]:.3f}, "
                     f"{len(seen)} prompts seen")
    ranked = sorted(seen, key=lambda k: (-seen[k][0] / seen[k][1], seen[k][2] / seen[k][1]))
    finalists = list(dict.fromkeys([*ranked[:cfg.finalists - 1], tuple(start_ids)]))
    pick = np.sort(generator.choice(len(rows), min(cfg.rescore_rows, len(rows)), replace=False))
    held, goal_rows = [texts[i] for i in pick], targets(pick.tolist())
    if progress:
        progress(f"readable prompt: rescoring {len(finalists)} prompts on {len(held)} rows")
    best, best_kl = None, np.inf
    read: dict[str, Prompt] = {}
    for ids in finalists:  # ties go to the lower KL on the rescored rows
        text = tok.decode(list(ids))
        probs = score_prompt(model, encoder, text, held)
        offset = fit_bias(probs, goal_rows) if cfg.label_bias else None
        found = Prompt(list(ids), text, agreement(biased(probs, offset), goal_rows), probs,
                       offset)
        read[text] = found
        kl = float((goal_rows * (np.log(np.clip(goal_rows, 1e-12, None))
                                 - np.log(np.clip(biased(probs, offset), 1e-12, None))))
                   .sum(1).mean())
        if best is None or (found.agreement, -kl) > (best.agreement, -best_kl):
            best, best_kl = found, kl
    return SearchResult(best, list(start_ids), steps, time.monotonic() - began, history,
                        pick.tolist(), read)


__all__ = ["Prompt", "SearchConfig", "SearchResult", "Targets", "agreement", "biased", "fit_bias",
           "fit_length", "nearest_ids", "prompt_key_values", "readable_vocabulary",
           "score_prompt", "search_prompt"]
