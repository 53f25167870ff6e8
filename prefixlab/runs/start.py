"""The prefix a run started from, so its readouts can tell what training changed.

Training saves its initialization as the step-0 snapshot (experiment._starting_prefix). A run
without one (its snapshots were removed, or it predates them) has its start recomputed from
its config exactly as training made it: the same init text, init kind and seed. An imported
prefix was trained elsewhere: its start is unknown, and the page says so.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from prefixlab.engine.models import LoadedModel
from prefixlab.engine.prefix import Prefix, default_init_text, init_prefix
from prefixlab.runs.config import RunConfig
from prefixlab.runs.folder import RunFolder
from prefixlab.runs.generation import default_generation_init_text


@dataclass
class Start:
    """The start of a run's prefix (L, 2, H_kv, P, D), or None with the reason in `source`."""

    kv: torch.Tensor | None
    source: str  # in words: where the start comes from, or why it is unavailable


def init_text(cfg: RunConfig, labels: list[str]) -> str:
    """The text training hands init_prefix: the config's, else the default derived from the
    task (and labels). A random init reads it too, for its scale."""
    if cfg.prefix.init_text:
        return cfg.prefix.init_text
    if cfg.is_generation:
        return default_generation_init_text(cfg.task)
    return default_init_text(labels, cfg.task)


def start_text(cfg: RunConfig, labels: list[str]) -> str | None:
    """The text whose key/values the prefix started as (None: it started random or zero)."""
    if cfg.prefix.init != "text" and not cfg.prefix.init_text:
        return None
    return init_text(cfg, labels)


def find_start(folder: RunFolder, cfg: RunConfig, labels: list[str], loaded: LoadedModel,
               kv: torch.Tensor) -> Start:
    """The start of the prefix `kv` of the run in `folder`: the step-0 snapshot, else
    recomputed from the run's config (see the module). A finished run's parts are passed one
    by one: finished.py imports experiment.py, which takes init_text from here."""
    if folder.read_config().get("imported_from"):
        return Start(None, "the prefix was imported, so where its training started is unknown")
    first = folder.snapshots()[:1]
    if first and first[0][0] == 0:
        try:
            snapshot = load_file(str(first[0][1]))["key_values"].float()
            if snapshot.shape == kv.shape:
                return Start(snapshot, "the step-0 snapshot")
        except (SafetensorError, OSError, KeyError):
            pass  # unreadable: recomputed below, as for a run without one
    # The plain parameterization: a reparameterized prefix starts at its base (the MLP's last
    # layer is zero), and building its MLP would draw from the global random generator.
    prefix = Prefix(loaded.shape, replace(cfg.prefix, reparameterize=False))
    text = init_text(cfg, labels)
    init_prefix(prefix, loaded.model, loaded.tokenizer, text, cfg.training.seed)
    start = prefix.folded()
    if start.shape != kv.shape:
        return Start(None, f"the start recomputed from the config has shape "
                           f"{tuple(start.shape)}, the prefix {tuple(kv.shape)}")
    how = {"text": f"the init text {text!r}", "random": f"random init, seed {cfg.training.seed}",
           "zero": "zero init"}[cfg.prefix.init]
    return Start(start, f"recomputed from the run's config ({how}): no step-0 snapshot was "
                        "saved")


__all__ = ["Start", "find_start", "init_text", "start_text"]
