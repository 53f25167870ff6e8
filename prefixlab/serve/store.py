"""A store of many prefixes for one loaded model: on disk by the thousand, in memory by budget.

A prefix is found by a key (a run id, or a folder path) and loaded on demand from a run folder
(`config.json` + `prefix.safetensors`) or a PEFT prefix-tuning adapter folder. A run's prefix
is kept with its template's head already read after it (`ServedPrefix.head_kv`), so scoring a
text reads only the text's own tokens and the template's tail. Loaded prefixes
stay in an LRU cache bounded by a memory budget in bytes; the least recently used are dropped
first. A prefix made for another base model is refused with both names, never guessed.

Only a finished run's prefix is served (`check_served`): a completed run, or a cancelled one
whose prefix its user kept. A running run's prefix file is a mid-training checkpoint, and a
failed or interrupted run's is wherever it broke: a request naming one is refused with the
run's name and state, on every request (a completed run that is resumed stops answering).
A generation run's prefix carries its template (`ServedPrefix.writer`), so that an input is
written into the prompt it was trained on, unless a request asks for raw text.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from prefixlab.engine.encode import Encoder, PairEncoder
from prefixlab.engine.mixed import ScoreItem
from prefixlab.engine.models import LoadedModel, model_source
from prefixlab.engine.prefix import PrefixFileError, extend_prefix, load_prefix
from prefixlab.errors import PrefixLabError
from prefixlab.files import read_json
from prefixlab.runs.config import ConfigError, RunConfig
from prefixlab.runs.folder import RunFolder
from prefixlab.runs.generation import pair_encoder

DEFAULT_BUDGET_BYTES = 256 * 2**20  # ~550 resident 10-token prefixes of SmolLM2-135M


class PrefixStoreError(PrefixLabError, LookupError):
    """A prefix that cannot be served: missing, unreadable, unfinished, or made for another
    model."""


_UNFINISHED_ADVICE = {
    "created": "it has not started",
    "queued": "wait until it completes",
    "running": "wait until it completes (its prefix file is a mid-training checkpoint)",
    "cancelled": "to use the prefix it stopped with, keep it (Runs tab: Keep this cancelled "
                 "run's prefix)",
    "interrupted": "resume it to finish",
    "failed": "start it again",
}


def served_state(folder: RunFolder) -> str | None:
    """Why a run's prefix is not served, as `"<state>[ (step s of n)]: <advice>"`, or None
    when it is: a completed run, or a cancelled run whose prefix its user kept."""
    status = folder.status()
    state = str(status.get("state", "created"))
    if state == "completed" or (state == "cancelled" and folder.kept()):
        return None
    step, total = folder.progress()
    at = f" (step {step} of {total})" if step and total else ""
    error = f"; its error: {status['error']}" if state == "failed" and status.get("error") else ""
    return (f"{state}{at}: only completed runs are served; "
            f"{_UNFINISHED_ADVICE.get(state, 'wait until it completes')}{error}")


def check_served(folder: RunFolder, key: str) -> None:
    """PrefixStoreError naming the run and its state unless its prefix may be served."""
    refusal = served_state(folder)
    if refusal is not None:
        try:
            name = str(folder.read_config().get("name") or folder.path.name)
        except (ValueError, OSError, PrefixLabError):
            name = folder.path.name
        raise PrefixStoreError(f"run {name!r} ({key}) is {refusal}")


@dataclass(frozen=True)
class ServedPrefix:
    """A prefix ready for mixed batches: its key/values and, for a run, what scoring needs."""

    key: str
    name: str
    kv: torch.Tensor  # (L, 2, H_kv, P, D), float32
    labels: list[str]  # empty for an imported adapter: it can generate but not score
    encoder: Encoder | None
    source: Path
    mtime: float
    load_s: float  # seconds it took to read from disk (files only, not head_s)
    text_column: str | None = None  # the run's text column, for predicting a table
    # A generation run's template and stop strings: a request's input is written into the
    # prompt the run was trained on, and its output ends at a stop string. None: raw text.
    writer: PairEncoder | None = None
    stop: tuple[str, ...] = ()
    # The prefix with its template's head read after it, (L, 2, H_kv, P + S, D); kv is a view
    # of its first P slots. None without labels (nothing to score) or a head.
    head_kv: torch.Tensor | None = None
    head_s: float = 0.0  # seconds the model took to read the template's head

    @property
    def nbytes(self) -> int:
        held = self.kv if self.head_kv is None else self.head_kv
        return held.numel() * held.element_size()

    def score_item(self, text: str, with_prefix: bool = True) -> ScoreItem:
        """`text` to score under this prefix (or the bare model on its prompt): after the
        head-extended prefix when there is one, so the row reads only text and tail."""
        if not with_prefix:
            return ScoreItem(None, self.encoder, text)
        if self.head_kv is not None:
            return ScoreItem(self.head_kv, self.encoder, text, head_read=True)
        return ScoreItem(self.kv, self.encoder, text)


def _same_model(named: str, loaded: LoadedModel) -> bool:
    """Whether a file's base-model name means the loaded model (a folder may be named by path)."""
    source = model_source(loaded.name)
    return named in (loaded.name, source) or Path(named).name == Path(source).name


class PrefixStore:
    """Prefixes for one loaded model, loaded on demand into a memory-bounded LRU.

    `locate` maps a key to its folder (e.g. a run id to its run folder); by default the key is
    the folder's path. Thread-safe; a prefix whose file changed on disk is read again.
    """

    def __init__(self, loaded: LoadedModel, locate: Callable[[str], Path] | None = None,
                 budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        self.loaded = loaded
        self.locate = locate or Path
        self.budget_bytes = budget_bytes
        self._resident: OrderedDict[str, ServedPrefix] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    @property
    def resident_bytes(self) -> int:
        with self._lock:
            return sum(p.nbytes for p in self._resident.values())

    def resident(self) -> list[str]:
        """Keys in memory, least recently used first."""
        with self._lock:
            return list(self._resident)

    def get(self, key: str) -> ServedPrefix:
        """The prefix named `key`, from memory or disk; PrefixStoreError when it cannot be."""
        try:
            folder = Path(self.locate(key))
        except (ValueError, LookupError) as e:  # e.g. a run id that is not ours
            raise PrefixStoreError(f"no prefix {key!r}: {e}") from e
        if (folder / "config.json").is_file():  # a run folder: served once finished, only
            check_served(RunFolder(folder), key)
        weights = folder / "prefix.safetensors"
        if not weights.is_file():
            weights = folder / "adapter_model.safetensors"
        mtime = weights.stat().st_mtime if weights.is_file() else -1.0
        with self._lock:
            cached = self._resident.get(key)
            if cached is not None and cached.mtime == mtime:
                self._resident.move_to_end(key)
                self.hits += 1
                return cached
        if mtime < 0:
            raise PrefixStoreError(f"no prefix {key!r}: {folder} holds neither a trained prefix "
                                   "(prefix.safetensors) nor a PEFT adapter")
        served = self._read(key, folder, mtime)
        with self._lock:
            self.misses += 1
            self._resident[key] = served
            self._resident.move_to_end(key)
            total = sum(p.nbytes for p in self._resident.values())
            # The newest entry always stays, even alone over budget: a batch needs it now.
            while total > self.budget_bytes and len(self._resident) > 1:
                _, dropped = self._resident.popitem(last=False)
                total -= dropped.nbytes
                self.evictions += 1
        return served

    def _read(self, key: str, folder: Path, mtime: float) -> ServedPrefix:
        start = time.perf_counter()
        if (folder / "config.json").is_file():
            served = self._read_run(key, folder, mtime)
        else:
            served = self._read_adapter(key, folder, mtime)
        return replace(served, load_s=time.perf_counter() - start - served.head_s)

    def _read_run(self, key: str, folder: Path, mtime: float) -> ServedPrefix:
        try:
            info = read_json(folder / "config.json")
            cfg = RunConfig.from_dict(info["run"])
            labels = [str(x) for x in info["labels"]]
        except (KeyError, TypeError, ValueError, ConfigError, OSError) as e:
            raise PrefixStoreError(f"prefix {key!r}: {folder / 'config.json'} is not a valid "
                                   f"run config ({e})") from e
        if not _same_model(cfg.model, self.loaded):
            raise PrefixStoreError(f"prefix {key!r} was made for base model {cfg.model!r}; this "
                                   f"server runs {self.loaded.name!r}")
        try:
            kv = load_prefix(folder / "prefix.safetensors", self.loaded.shape).kv
        except PrefixFileError as e:
            raise PrefixStoreError(f"prefix {key!r}: {e}") from e
        # A generation run has no labels: like an imported adapter, it generates but not scores.
        data = info.get("data") or {}
        encoder = cfg.label_encoder(self.loaded.tokenizer, labels, data.get("label_counts"),
                                    data.get("prior_scale")) if labels else None
        head_kv, start = None, time.perf_counter()
        if encoder is not None and encoder.head_ids:
            # Every text this run scores starts with the template's head: read it here, once,
            # and texts read only their own tokens and the tail (3 of ~16 tokens per row for
            # the default template; more for a long instruction).
            head_kv = extend_prefix(self.loaded.model, kv, encoder.head_ids)
            kv = head_kv[:, :, :, :kv.shape[3]]  # a view: the prefix is held once
        name = str(info.get("name") or folder.name)
        head_s = time.perf_counter() - start
        writer = pair_encoder(self.loaded.tokenizer, cfg) if cfg.is_generation else None
        return ServedPrefix(key, name, kv, labels, encoder, folder, mtime, 0.0,
                            text_column=cfg.text_column, head_kv=head_kv, head_s=head_s,
                            writer=writer,
                            stop=tuple(cfg.generation.stop) if cfg.is_generation else ())

    def _read_adapter(self, key: str, folder: Path, mtime: float) -> ServedPrefix:
        from prefixlab.engine.peft_interop import PeftFormatError, import_peft

        try:
            config = read_json(folder / "adapter_config.json")
            base = str(config.get("base_model_name_or_path") or "")
            if base and not _same_model(base, self.loaded):
                raise PrefixStoreError(f"prefix {key!r} is a PEFT adapter for base model "
                                       f"{base!r}; this server runs {self.loaded.name!r}")
            kv = import_peft(folder, self.loaded.model.config)
        except (PeftFormatError, ValueError, OSError) as e:
            raise PrefixStoreError(f"prefix {key!r}: {e}") from e
        return ServedPrefix(key, folder.name, kv.float(), [], None, folder, mtime, 0.0)
