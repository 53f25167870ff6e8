"""A run's inspection: the readouts of its prefix, written as JSON and a standalone page.

The orchestration over the `interpret` wing (readouts, bank, maps, knockout, summary: the
math) and the `figures` wing (plots, causal: the figures); the CLI's `inspect` and the app
call it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from prefixlab.data.labeled import load_labeled_csv
from prefixlab.data.reading import DataError
from prefixlab.engine.cpu import native_bf16
from prefixlab.engine.models import LoadedModel
from prefixlab.engine.predict import score_log_likelihoods
from prefixlab.engine.prefix import default_init_text
from prefixlab.figures.causal import knockout_figure, label_push_figure
from prefixlab.figures.plots import inspection_html
from prefixlab.files import atomic_write_json, atomic_write_text
from prefixlab.interpret.attention import AttentionMass, prefix_attention
from prefixlab.interpret.bank import (
    DEFAULT_BANK_SIZE,
    data_word_ids,
    label_token_ids,
    reference_bank,
    text_token_ids,
)
from prefixlab.interpret.frame import KINDS, InterpretError, _kind_index
from prefixlab.interpret.knockout import (
    Knockout,
    LabelPush,
    knockout,
    knockout_streams,
    label_push,
    target_log_likelihoods,
)
from prefixlab.interpret.maps import (
    LayersMap,
    Movement,
    PCAMap,
    layers_map,
    pca_map,
    prefix_movement,
)
from prefixlab.interpret.nearest import CAVEAT, METHOD, NearestTokens, nearest_tokens
from prefixlab.interpret.summary import GLOSSARY, summary_markdown
from prefixlab.interpret.values import ValueReadout, value_readout
from prefixlab.runs.experiment import prepare_data
from prefixlab.runs.finished import Run, open_run
from prefixlab.runs.folder import RunFolder


def load_snapshots(run_dir: str | Path) -> list[tuple[int, torch.Tensor]]:
    """The run's prefix snapshots as (step, kv (L, 2, H_kv, P, D)), oldest first."""

    found = []
    for step, path in RunFolder(run_dir).snapshots():
        try:
            found.append((step, load_file(str(path))["key_values"].float()))
        except (SafetensorError, OSError, KeyError) as e:
            raise InterpretError(f"snapshot {path} is unreadable: {e}") from e
    return found


def _round(x, digits: int = 4):
    return np.round(np.asarray(x, dtype=float), digits).tolist()


def nearest_tokens_json(nearest: NearestTokens, readout: ValueReadout | None = None) -> dict:
    """nearest_tokens.json: per layer, per kind, per position the top-k with the baseline."""
    L, _, P, _ = nearest.token_ids.shape
    layers = []
    for layer in range(L):
        entry: dict = {"layer": layer}
        for kind in KINDS:
            i = _kind_index(kind)
            entry[kind] = [{
                "position": p,
                "ranked_among": int(nearest.ranked_among[layer, p]),
                "baseline": {"mean": round(float(nearest.baseline[layer, i, p]), 4),
                             "std": round(float(nearest.baseline_std[layer, i, p]), 4)},
                "top": [{"token": s, "id": t, "score": round(c, 4)}
                        for s, t, c in nearest.top(layer, kind, p)],
            } for p in range(P)]
        if readout is not None:
            entry["value_readout"] = [{
                "position": p,
                "top": [{"token": readout.labels[int(t)], "id": int(t), "logit": round(float(g), 3)}
                        for t, g in zip(readout.token_ids[layer, p], readout.logits[layer, p],
                                        strict=True)],
            } for p in range(P)]
        layers.append(entry)
    return {"format": "prefixlab-nearest-tokens/1", "prefix_length": P, "method": METHOD,
            "caveat": CAVEAT, "layers": layers}


def pca_json(maps: Mapping[str, PCAMap], layers: Mapping[str, LayersMap],
             movement: Movement | None) -> dict:
    out: dict = {"format": "prefixlab-pca/1", "maps": {}, "layers": {}, "movement": None}
    for kind, m in maps.items():
        out["maps"][kind] = {
            "layer": m.layer, "explained_variance": _round(m.explained_variance),
            "prefixes": {name: _round(x) for name, x in m.prefixes.items()},
            "cloud": {"tokens": m.tokens, "ids": m.token_ids, "coords": _round(m.cloud, 3)},
        }
    for kind, lm in layers.items():
        out["layers"][kind] = {"coords": _round(lm.coords),
                               "explained_variance": _round(lm.explained_variance)}
    if movement is not None:
        out["movement"] = {
            "steps": movement.steps, "trajectory": _round(movement.trajectory),
            "explained_variance": _round(movement.explained_variance),
            "relative": movement.relative,
            "distance": {kind: _round(movement.distance[:, :, i]) for i, kind in enumerate(KINDS)},
        }
    return out


def _training_texts(run: Run) -> list[str]:
    cfg = run.config
    try:
        data = load_labeled_csv(cfg.train_csv, cfg.text_column, cfg.label_column)
    except (DataError, OSError):
        return []  # the CSV moved or changed: the readouts that need it are left out
    return [t for t in data.texts if t.strip()]


def _sample_texts(run: Run, count: int = 3) -> list[str]:
    return _training_texts(run)[:count]


def run_words(run: Run) -> dict[str, list[int]]:
    """The token groups a run's readouts always rank and its maps highlight, by name.

    "label words": every token of every label (with and without a leading space);
    "init text": the tokens of the text the prefix started from (when it started from text);
    "data words": the training data's most frequent words. These join the reference bank and
    every deeper layer's shortlist, so the bank (and its cache key) is per run's words: two
    runs with different labels on one model never share label words.
    """
    tok = run.loaded.tokenizer
    cfg = run.config
    init = None
    if cfg.prefix.init == "text" or cfg.prefix.init_text:
        init = cfg.prefix.init_text or default_init_text(run.labels, cfg.task)
    return {"label words": label_token_ids(tok, run.labels),
            "init text": text_token_ids(tok, init),
            "data words": data_word_ids(tok, _training_texts(run))}


def word_ids(words: Mapping[str, Sequence[int]]) -> list[int]:
    """The groups of run_words as one list, without repeats, in group order."""
    return list(dict.fromkeys(i for ids in words.values() for i in ids))


KNOCKOUT_FILE = "knockout.json"
DEFAULT_KNOCKOUT_ROWS = 100


@dataclass
class CausalReadout:
    """What a run's prefix does: knockouts, the attention share per layer, the label push."""

    knockout: Knockout
    push: LabelPush | None  # None for a generation run (no labels)
    attention: AttentionMass | None  # share of attention on the prefix (None: no texts)

    def to_json(self, run_name: str, stamp: float) -> dict:
        out = {"run": run_name, "prefix_mtime": stamp, **self.knockout.to_json(),
               "label_push": None if self.push is None else {
                   "labels": self.push.labels, "push": _round(self.push.push)}}
        if self.attention is not None:
            out["attention_share"] = _round(self.attention.mass[-1].mean(-1))
        return out


def _held_out(run: Run, rows: int) -> tuple[list[str], list[int]]:
    """The run's own validation rows (the split it was evaluated on), first `rows` of them."""
    try:
        validation = prepare_data(run.config).validation
    except (DataError, OSError) as e:
        raise InterpretError(f"the knockout needs the run's data to score held-out rows, but "
                             f"{run.config.train_csv} cannot be read: {e}") from e
    known = [(t, run.labels.index(y)) for t, y in zip(validation.texts, validation.labels,
                                                       strict=True) if y in run.labels]
    if not known:
        raise InterpretError("the run has no held-out rows with a label it knows")
    known = known[:rows]
    return [t for t, _ in known], [g for _, g in known]


def _stored(run: Run) -> dict | None:
    """knockout.json of the run folder when it was measured on the current prefix file."""
    path = run.folder.path / KNOCKOUT_FILE
    try:
        found = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None  # unreadable: measured again and rewritten
    stamp = run.folder.prefix_path.stat().st_mtime
    return found if isinstance(found, dict) and found.get("prefix_mtime") == stamp else None


NEAREST_CACHE = "nearest_cache.json"


def cached_nearest_tokens(run: Run, bank, top_k: int, candidates: Sequence[int],
                          progress: Callable[[str], None] | None = None) -> NearestTokens:
    """nearest_tokens for the run's prefix, kept in the run folder (nearest_cache.json) while
    the prefix file, the bank (its cache file names its token list and weights), top_k and
    the candidates are unchanged: ranking deeper layers reads ~1,000 tokens through every
    layer, the slowest part of opening a run."""
    stamp = run.folder.prefix_path.stat().st_mtime
    key = {"prefix_mtime": stamp, "bank": bank.key, "extra_ids": list(bank.extra_ids),
           "top_k": top_k, "candidates": [int(i) for i in candidates]}
    path = run.folder.path / NEAREST_CACHE
    try:
        found = json.loads(path.read_text()) if path.is_file() else None
        if found and found.get("key") == key:
            return NearestTokens.from_dict(found["nearest"])
    except (OSError, ValueError, KeyError, TypeError):
        pass  # unreadable or from another version: ranked again and rewritten
    nearest = nearest_tokens(run.loaded, run.kv, bank, top_k, candidates=candidates,
                             progress=progress)
    if key["bank"] is not None:
        atomic_write_json(path, {"key": key, "nearest": nearest.to_dict()})
    return nearest


def stored_knockout_rows(run: Run) -> int | None:
    """How many rows the run folder's knockout was measured on (None: none for this prefix)."""
    found = _stored(run)
    return found.get("rows") if found else None


def knockout_dtype(loaded: LoadedModel, precision: str = "auto") -> torch.dtype:
    """What the knockout runs in: "auto" is bfloat16 for a float32 model on a device that
    multiplies bf16 natively (cpu.native_bf16), else the model's own dtype."""
    own = next(loaded.model.parameters()).dtype
    if precision == "auto":
        return torch.bfloat16 if own == torch.float32 and native_bf16(loaded.device) else own
    if precision not in ("float32", "bfloat16"):
        raise InterpretError(f"precision must be auto, float32 or bfloat16, got {precision!r}")
    return getattr(torch, precision)


def run_knockout(run: Run, rows: int = DEFAULT_KNOCKOUT_ROWS, *, use_cache: bool = True,
                 progress: Callable[[float, str], None] | None = None,
                 precision: str = "auto") -> CausalReadout:
    """Knock out each slot and each layer on `rows` held-out rows; cached in the run folder
    (knockout.json, valid while the prefix file, the row count and the precision are
    unchanged). precision: see knockout_dtype."""
    if rows < 1:
        raise InterpretError(f"the knockout needs at least 1 held-out row, got {rows}")
    loaded, kv = run.loaded, run.kv
    dtype = knockout_dtype(loaded, precision)
    stamp = run.folder.prefix_path.stat().st_mtime
    cached = run.folder.path / KNOCKOUT_FILE
    if run.is_generation:  # the score is each held-out target's mean token log-probability
        from prefixlab.runs.generation import prepare_pairs

        try:
            pairs = prepare_pairs(run.config)[1]
        except (DataError, OSError) as e:
            raise InterpretError(f"the knockout needs the run's data to score held-out rows, "
                                 f"but {run.config.train_csv} cannot be read: {e}") from e
        texts, targets, gold = pairs.inputs[:rows], pairs.targets[:rows], None
        push = None  # no labels to push toward

        def score(model):
            return target_log_likelihoods(model, kv, run.encoder, texts, targets)
    else:
        texts, gold = _held_out(run, rows)
        push = label_push(loaded, kv, run.labels, run.encoder.label_ids)

        def score(model):  # the run's decision rule: the F1 its predictions would have
            return run.encoder.rule.log_probs(score_log_likelihoods(model, kv, run.encoder,
                                                                    texts))

    attention = prefix_attention(loaded, kv, texts[:8])
    found = _stored(run) if use_cache else None
    if (found is not None and found.get("rows") == len(texts)
            and found.get("precision", "float32") == str(dtype).removeprefix("torch.")):
        try:
            return CausalReadout(Knockout.from_json(found), push, attention)
        except (KeyError, TypeError, ValueError):
            pass  # from another version: measured again and rewritten

    # Both scores read each batch of rows in one forward call, in a fixed order (multi-token
    # labels continue from a cache, which the replayed layers would not have filled).
    replay = run.is_generation or all(len(t) == 1 for t in run.encoder.label_ids)
    result = CausalReadout(knockout(loaded, kv, score, gold, progress, replay=replay,
                                    dtype=dtype, streams=knockout_streams(loaded.device)),
                           push, attention)
    atomic_write_json(cached, result.to_json(run.folder.path.name, stamp))
    return result


def inspect_run(
    run_dir: str | Path,
    output_dir: str | Path,
    loaded: LoadedModel | None = None,
    top_k: int = 10,
    *,
    texts: Sequence[str] | None = None,
    bank_size: int = DEFAULT_BANK_SIZE,
    knockout_rows: int = DEFAULT_KNOCKOUT_ROWS,
    knockout_precision: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write nearest_tokens.json, pca.json, knockout.json and a standalone inspection.html.

    texts: read after the prefix for the attention view; None takes up to three rows of the
    run's training CSV (the attention view is left out when it cannot be read).
    knockout_rows: held-out rows for the knockout (0: none; it is skipped, with a note on
    the page, when the run's data cannot be read); knockout_precision: see knockout_dtype.
    Returns output_dir.
    """

    run = open_run(run_dir, loaded)
    loaded, kv = run.loaded, run.kv
    output = Path(output_dir)
    words = run_words(run)
    bank = reference_bank(loaded, bank_size, word_ids(words), progress=progress)
    nearest = nearest_tokens(loaded, kv, bank, top_k, candidates=word_ids(words),
                             progress=progress)
    readout = value_readout(loaded, kv, top_k)
    snapshots = load_snapshots(run_dir)
    compared = {"trained": kv}
    if snapshots and snapshots[0][1].shape == kv.shape:
        compared[f"step {snapshots[0][0]}"] = snapshots[0][1]
    layer = loaded.shape.num_layers // 2
    maps = {kind: pca_map(loaded, bank, compared, layer, kind) for kind in KINDS}
    layers = {kind: layers_map(loaded, bank, kv, kind) for kind in KINDS}
    movement = prefix_movement(snapshots) if snapshots else None
    texts = list(texts) if texts is not None else _sample_texts(run)
    attention = prefix_attention(loaded, compared, texts) if texts else None
    atomic_write_json(output / "nearest_tokens.json",
                      {"run": run.folder.path.name, "model": loaded.name, "top_k": top_k,
                       **nearest_tokens_json(nearest, readout)})
    atomic_write_json(output / "pca.json", {"run": run.folder.path.name,
                                            **pca_json(maps, layers, movement), "words": words})
    causal, note = None, ""
    if knockout_rows > 0:
        try:
            causal = run_knockout(run, knockout_rows, precision=knockout_precision, progress=(
                (lambda f, m: progress(m)) if progress else None))
        except InterpretError as e:
            note = f"The knockout was not measured: {e}"
    if causal is not None:
        stamp = run.folder.prefix_path.stat().st_mtime
        atomic_write_json(output / KNOCKOUT_FILE, causal.to_json(run.folder.path.name, stamp))
        extra = [("What each part does", knockout_figure(causal.knockout, causal.attention))]
        if causal.push is not None:
            extra.append(("Which label each layer pushes", label_push_figure(causal.push)))
    else:
        extra = []
    initial = snapshots[0][1] if snapshots else None
    summary = summary_markdown(nearest, kv, initial, causal.knockout if causal else None)
    page = inspection_html(
        title=f"Inside the prefix of {run.folder.path.name}",
        model=loaded.name, nearest=nearest, readout=readout, maps=maps, layers=layers,
        movement=movement, attention=attention, summary=summary + (f"\n\n{note}" * bool(note)),
        glossary=GLOSSARY, extra=extra, words=words,
    )
    atomic_write_text(output / "inspection.html", page)
    return output


__all__ = ["DEFAULT_KNOCKOUT_ROWS", "KNOCKOUT_FILE", "NEAREST_CACHE", "CausalReadout",
           "cached_nearest_tokens", "inspect_run", "knockout_dtype", "load_snapshots",
           "nearest_tokens_json", "pca_json", "run_knockout", "run_words", "stored_knockout_rows",
           "word_ids"]
