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
from prefixlab.figures.causal import knockout_figure, label_push_figure, movement_figure
from prefixlab.figures.plots import inspection_html
from prefixlab.files import atomic_write_json, atomic_write_text
from prefixlab.interpret.ablation import Sink, attention_sinks, reset_knockout
from prefixlab.interpret.attention import AttentionMass, prefix_attention
from prefixlab.interpret.bank import (
    DEFAULT_BANK_SIZE,
    data_word_ids,
    label_token_ids,
    reference_bank,
    text_token_ids,
)
from prefixlab.interpret.change import PrefixChange, prefix_change, word_origin
from prefixlab.interpret.frame import KINDS, InterpretError, _kind_index
from prefixlab.interpret.knockout import (
    Knockout,
    LabelPush,
    knocked_out,
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
from prefixlab.interpret.summary import GLOSSARY, Reference, summary_markdown
from prefixlab.interpret.values import ValueReadout, value_readout
from prefixlab.runs.experiment import prepare_data
from prefixlab.runs.finished import Run, open_run
from prefixlab.runs.folder import RunFolder
from prefixlab.runs.start import Start, find_start, start_text


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


def nearest_tokens_json(nearest: NearestTokens, readout: ValueReadout | None = None,
                        words: Mapping[str, Sequence[int]] | None = None) -> dict:
    """nearest_tokens.json: per layer, per kind, per position the top-k with the baseline;
    with `words` (run_words) each token says where it comes from (change.word_origin)."""
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
                "top": [{"token": s, "id": t, "score": round(c, 4),
                         **({"origin": word_origin(t, words)} if words is not None else {})}
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
    "init text": the tokens of the text the prefix started from (when it started from text,
    and was trained here: an imported prefix's start is unknown);
    "data words": the training data's most frequent words. These join the reference bank and
    every deeper layer's shortlist, so the bank (and its cache key) is per run's words: two
    runs with different labels on one model never share label words.
    """
    tok = run.loaded.tokenizer
    imported = run.folder.read_config().get("imported_from")  # its start text is unknown
    return {"label words": label_token_ids(tok, run.labels),
            "init text": text_token_ids(tok, None if imported else start_text(run.config,
                                                                               run.labels)),
            "data words": data_word_ids(tok, _training_texts(run))}


def word_ids(words: Mapping[str, Sequence[int]]) -> list[int]:
    """The groups of run_words as one list, without repeats, in group order."""
    return list(dict.fromkeys(i for ids in words.values() for i in ids))


KNOCKOUT_FILE = "knockout.json"
ABLATION_FILES = {"hide": KNOCKOUT_FILE, "reset": "knockout_reset.json"}
ABLATIONS = tuple(ABLATION_FILES)  # hide from attention; reset to the start
DEFAULT_KNOCKOUT_ROWS = 100
CHANGE_FILE = "change.json"


@dataclass
class CausalReadout:
    """What a run's prefix does: knockouts, the attention share per layer, the label push."""

    knockout: Knockout
    push: LabelPush | None  # None for a generation run (no labels)
    attention: AttentionMass | None  # share of attention on the prefix (None: no texts)
    held_out: int | None = None  # the run's validation rows, of which the first `rows` scored

    @property
    def sinks(self) -> list[Sink]:
        """Slots that act as attention sinks (ablation.attention_sinks)."""
        slots = None if self.attention is None else self.attention.slots
        return attention_sinks(self.knockout, None if slots is None else slots[-1])

    def to_json(self, run_name: str, stamp: float) -> dict:
        out = {"run": run_name, "prefix_mtime": stamp, **self.knockout.to_json(),
               "held_out_rows": self.held_out,
               "label_push": None if self.push is None else {
                   "labels": self.push.labels, "push": _round(self.push.push)}}
        if self.attention is not None:
            out["attention_share"] = _round(self.attention.mass[-1].mean(-1))
            if self.attention.slots is not None:
                out["slot_attention_share"] = _round(self.attention.slots[-1])
        out["attention_sinks"] = [{"slot": k.slot, "evidence": k.evidence} for k in self.sinks]
        return out


def _held_out(run: Run, rows: int) -> tuple[list[str], list[int], int]:
    """The run's own validation rows (the split its report scored), first `rows` of them, and
    how many there are in all."""
    try:
        validation = prepare_data(run.config).validation
    except (DataError, OSError) as e:
        raise InterpretError(f"the knockout needs the run's data to score held-out rows, but "
                             f"{run.config.train_csv} cannot be read: {e}") from e
    known = [(t, run.labels.index(y)) for t, y in zip(validation.texts, validation.labels,
                                                       strict=True) if y in run.labels]
    if not known:
        raise InterpretError("the run has no held-out rows with a label it knows")
    total = len(known)
    known = known[:rows]
    return [t for t, _ in known], [g for _, g in known], total


def _stored(run: Run, ablation: str = "hide") -> dict | None:
    """The ablation's file in the run folder when it was measured on the current prefix."""
    path = run.folder.path / ABLATION_FILES[ablation]
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


def stored_knockout_rows(run: Run, ablation: str = "hide") -> int | None:
    """How many rows the run folder's knockout was measured on (None: none for this prefix)."""
    found = _stored(run, ablation)
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
                 precision: str = "auto", ablation: str = "hide",
                 start: Start | None = None) -> CausalReadout:
    """Knock out each slot and each layer on the first `rows` held-out rows: hidden from
    attention (ablation "hide") or set back to the run's start ("reset"; start: run_start's,
    found when None). Cached in the run folder (ABLATION_FILES, valid while the prefix file,
    the row count and the precision are unchanged). precision: see knockout_dtype."""
    if rows < 1:
        raise InterpretError(f"the knockout needs at least 1 held-out row, got {rows}")
    if ablation not in ABLATION_FILES:
        raise InterpretError(f"the ablation is one of {', '.join(ABLATIONS)}, got {ablation!r}")
    loaded, kv = run.loaded, run.kv
    dtype = knockout_dtype(loaded, precision)
    stamp = run.folder.prefix_path.stat().st_mtime
    if run.is_generation:  # the score is each held-out target's mean token log-probability
        from prefixlab.runs.generation import prepare_pairs

        try:
            pairs = prepare_pairs(run.config)[1]
        except (DataError, OSError) as e:
            raise InterpretError(f"the knockout needs the run's data to score held-out rows, "
                                 f"but {run.config.train_csv} cannot be read: {e}") from e
        texts, targets, gold = pairs.inputs[:rows], pairs.targets[:rows], None
        total = len(pairs.inputs)
        push = None  # no labels to push toward

        def score(model, prefix):
            return target_log_likelihoods(model, prefix, run.encoder, texts, targets)
    else:
        texts, gold, total = _held_out(run, rows)
        push = label_push(loaded, kv, run.labels, run.encoder.label_ids)

        def score(model, prefix):  # the run's decision rule: the F1 its predictions would have
            return run.encoder.rule.log_probs(score_log_likelihoods(model, prefix, run.encoder,
                                                                    texts))

    attention = prefix_attention(loaded, kv, texts[:8])
    found = _stored(run, ablation) if use_cache else None
    if (found is not None and found.get("rows") == len(texts)
            and found.get("precision", "float32") == str(dtype).removeprefix("torch.")):
        try:
            return CausalReadout(Knockout.from_json(found), push, attention, total)
        except (KeyError, TypeError, ValueError):
            pass  # from another version: measured again and rewritten

    if ablation == "reset":
        start = start or run_start(run)
        if start.kv is None:
            raise InterpretError(f"the prefix cannot be reset to its start: {start.source}")
        with knocked_out(loaded, {}, dtype=dtype) as model:
            result = reset_knockout(kv, start.kv, lambda prefix: score(model, prefix), gold,
                                    str(dtype).removeprefix("torch."), progress)
    else:
        # Both scores read each batch of rows in one forward call, in a fixed order
        # (multi-token labels continue from a cache, which the replayed layers would not
        # have filled).
        replay = run.is_generation or all(len(t) == 1 for t in run.encoder.label_ids)
        result = knockout(loaded, kv, lambda model: score(model, kv), gold, progress,
                          replay=replay, dtype=dtype, streams=knockout_streams(loaded.device))
    causal = CausalReadout(result, push, attention, total)
    atomic_write_json(run.folder.path / ABLATION_FILES[ablation],
                      causal.to_json(run.folder.path.name, stamp))
    return causal


def report_reference(run: Run, causal: CausalReadout | None) -> Reference | None:
    """The run report's macro-F1 beside which the knockout's intact figure is read."""
    report = run.folder.read_report() if causal is not None else None
    if not report or causal.held_out is None or "macro_f1" not in report:
        return None
    own = str(next(run.loaded.model.parameters()).dtype).removeprefix("torch.")
    return Reference(float(report["macro_f1"]), causal.held_out, own)


def run_start(run: Run) -> Start:
    """Where the run's prefix started (start.find_start): the step-0 snapshot, else
    recomputed from its config; kv None, with the reason, when it cannot be known."""
    return find_start(run.folder, run.config, run.labels, run.loaded, run.kv)


def run_change(run: Run, start: Start, top_k: int = 10) -> PrefixChange | None:
    """The change of the run's prefix from its start (None when the start is unavailable)."""
    if start.kv is None:
        return None
    labels = [] if run.is_generation else run.labels
    label_ids = [] if run.is_generation else run.encoder.label_ids
    return prefix_change(run.loaded, run.kv, start.kv, top_k, labels, label_ids)


def run_summary(run: Run, nearest: NearestTokens, start: Start, change: PrefixChange | None,
                hidden: CausalReadout | None, reset: CausalReadout | None,
                words: Mapping[str, Sequence[int]]) -> str:
    """The summary of a run's inspection (summary.summary_markdown), from its parts."""
    return summary_markdown(
        nearest, run.kv, start.kv, hidden.knockout if hidden else None, change=change,
        start_note=start.source, words=words, reset=reset.knockout if reset else None,
        sinks=hidden.sinks if hidden else (), reference=report_reference(run, hidden or reset))


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
    ablations: Sequence[str] = ("hide",),
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write nearest_tokens.json, pca.json, change.json, knockout.json (knockout_reset.json
    with the reset ablation), summary.md and a standalone inspection.html.

    texts: read after the prefix for the attention view; None takes up to three rows of the
    run's training CSV (the attention view is left out when it cannot be read).
    knockout_rows: held-out rows for the knockout (0: none; it is skipped, with a note on
    the page, when the run's data cannot be read); knockout_precision: see knockout_dtype;
    ablations: which knockouts, of ABLATIONS. Returns output_dir.
    """

    run = open_run(run_dir, loaded)
    loaded, kv = run.loaded, run.kv
    output = Path(output_dir)
    words = run_words(run)
    bank = reference_bank(loaded, bank_size, word_ids(words), progress=progress)
    nearest = cached_nearest_tokens(run, bank, top_k, word_ids(words), progress)
    readout = value_readout(loaded, kv, top_k)
    snapshots = load_snapshots(run_dir)
    start = run_start(run)
    change = run_change(run, start, top_k)
    compared = {"trained": kv}
    if start.kv is not None:
        compared["start"] = start.kv
    layer = loaded.shape.num_layers // 2
    maps = {kind: pca_map(loaded, bank, compared, layer, kind) for kind in KINDS}
    layers = {kind: layers_map(loaded, bank, kv, kind) for kind in KINDS}
    movement = prefix_movement(snapshots) if snapshots else None
    texts = list(texts) if texts is not None else _sample_texts(run)
    attention = prefix_attention(loaded, compared, texts) if texts else None
    atomic_write_json(output / "nearest_tokens.json",
                      {"run": run.folder.path.name, "model": loaded.name, "top_k": top_k,
                       **nearest_tokens_json(nearest, readout, words)})
    atomic_write_json(output / "pca.json", {"run": run.folder.path.name,
                                            **pca_json(maps, layers, movement), "words": words})
    atomic_write_json(output / CHANGE_FILE, {"run": run.folder.path.name, "start": start.source,
                                             **(change.to_json() if change else {})})
    measured: dict[str, CausalReadout] = {}
    notes = []
    for ablation in ablations if knockout_rows > 0 else ():
        try:
            measured[ablation] = run_knockout(
                run, knockout_rows, precision=knockout_precision, ablation=ablation,
                start=start, progress=(lambda f, m: progress(m)) if progress else None)
        except InterpretError as e:
            notes.append(f"The {ablation} knockout was not measured: {e}")
    stamp = run.folder.prefix_path.stat().st_mtime
    extra = []
    if change is not None and change.moved:
        extra.append(("How far each slot moved from its start", movement_figure(change)))
    for ablation, causal in measured.items():
        atomic_write_json(output / ABLATION_FILES[ablation],
                          causal.to_json(run.folder.path.name, stamp))
        what = "hidden" if ablation == "hide" else "reset to its start"
        extra.append((f"What each part does when {what}",
                      knockout_figure(causal.knockout, causal.attention)))
    hidden = measured.get("hide")
    if hidden is not None and hidden.push is not None:
        extra.append(("Which label each layer pushes", label_push_figure(hidden.push)))
    summary = run_summary(run, nearest, start, change, hidden, measured.get("reset"), words)
    summary += "".join(f"\n\n{note}" for note in notes)
    atomic_write_text(output / "summary.md", summary + "\n")
    page = inspection_html(
        title=f"Inside the prefix of {run.folder.path.name}",
        model=loaded.name, nearest=nearest, readout=readout, maps=maps, layers=layers,
        movement=movement, attention=attention, summary=summary,
        glossary=GLOSSARY, extra=extra, words=words, change=change,
    )
    atomic_write_text(output / "inspection.html", page)
    return output


__all__ = ["ABLATIONS", "ABLATION_FILES", "CHANGE_FILE", "DEFAULT_KNOCKOUT_ROWS", "KNOCKOUT_FILE",
           "NEAREST_CACHE", "CausalReadout", "cached_nearest_tokens", "inspect_run",
           "knockout_dtype", "load_snapshots", "nearest_tokens_json", "pca_json",
           "report_reference", "run_change", "run_knockout", "run_start", "run_summary",
           "run_words", "stored_knockout_rows", "word_ids"]
