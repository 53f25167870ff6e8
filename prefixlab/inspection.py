"""A run's inspection: the readouts of its prefix, written as JSON and a standalone page.

The orchestration over interpret.py, interpret_bank.py and interpret_maps.py (the math) and
plots.py (the figures); the CLI's `inspect` and the app call it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from prefixlab import data as datamod
from prefixlab.experiment import Run, RunFolder, open_run
from prefixlab.files import atomic_write_json, atomic_write_text
from prefixlab.interpret import (
    CAVEAT,
    KINDS,
    METHOD,
    InterpretError,
    NearestTokens,
    ValueReadout,
    _kind_index,
    nearest_tokens,
    prefix_attention,
    value_readout,
)
from prefixlab.interpret_bank import (
    DEFAULT_BANK_SIZE,
    data_word_ids,
    label_token_ids,
    reference_bank,
    text_token_ids,
)
from prefixlab.interpret_maps import (
    LayersMap,
    Movement,
    PCAMap,
    layers_map,
    pca_map,
    prefix_movement,
)
from prefixlab.models import LoadedModel
from prefixlab.plots import inspection_html
from prefixlab.prefix import default_init_text


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
        data = datamod.load_labeled_csv(cfg.train_csv, cfg.text_column, cfg.label_column)
    except (datamod.DataError, OSError):
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


def inspect_run(
    run_dir: str | Path,
    output_dir: str | Path,
    loaded: LoadedModel | None = None,
    top_k: int = 10,
    *,
    texts: Sequence[str] | None = None,
    bank_size: int = DEFAULT_BANK_SIZE,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write nearest_tokens.json, pca.json and a standalone inspection.html for a run.

    texts: read after the prefix for the attention view; None takes up to three rows of the
    run's training CSV (the attention view is left out when it cannot be read).
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
                                            **pca_json(maps, layers, movement)})
    page = inspection_html(
        title=f"Inside the prefix of {run.folder.path.name}",
        model=loaded.name, nearest=nearest, readout=readout, maps=maps, layers=layers,
        movement=movement, attention=attention,
    )
    atomic_write_text(output / "inspection.html", page)
    return output


__all__ = ["inspect_run", "load_snapshots", "nearest_tokens_json", "pca_json", "run_words",
           "word_ids"]
