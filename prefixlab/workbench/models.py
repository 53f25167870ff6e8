"""The models room: base models loaded once per process, their shapes, and a prefix's size."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

from prefixlab.engine.models import LoadedModel, ModelInfo, describe_model, load_model
from prefixlab.engine.prefix import Prefix, PrefixConfig
from prefixlab.runs.presets import PRESETS
from prefixlab.workbench.memo import Memo


class ModelRoom:
    """Loading and describing base models. A prefix is only a tensor: switching prefixes
    never reloads a model.

    Set up by Workbench.__init__: `default_model`, `model_status`, `_models`, `_infos`.
    """

    default_model: str
    precision: str  # the compute dtype every shared model is loaded in; "auto" decides per ISA
    device: str | None  # where the shared models compute (None: CUDA when present, else CPU)
    model_status: str  # what the app's status line says about the default model
    _models: Memo[str, LoadedModel]
    _infos: Memo[str, ModelInfo]
    in_background: Callable[..., threading.Thread]

    def model(self, name: str | None = None) -> LoadedModel:
        """A loaded base model, once per process (two tabs asking at once load it once)."""
        name = name or self.default_model
        return self._models.get(name, lambda: self._load(name))

    def _load(self, name: str) -> LoadedModel:
        self.model_status = f"loading {name}"
        loaded = load_model(name, self.device, progress=self._progress,
                            precision=self.precision)
        self.model_status = f"{name} ready on {loaded.device} ({loaded.precision})"
        return loaded

    def _progress(self, message: str) -> None:
        self.model_status = message

    def warm_up(self) -> threading.Thread:
        """Load the default model in the background so the page is served at once."""
        return self.in_background(self._warm, name="model-warm-up")

    def _warm(self) -> None:
        try:
            self.model()
        except Exception as e:  # shown in the app's status line; the app keeps serving
            self.model_status = f"could not load {self.default_model}: {e}"

    def model_info(self, name: str | None = None) -> ModelInfo:
        name = name or self.default_model
        if (m := self._models.peek(name)) is not None:
            return ModelInfo(m.name, m.shape, m.num_parameters)
        return self._infos.get(name, lambda: describe_model(name, progress=self._progress))

    def prefix_size(self, settings: dict, model: str | None = None) -> dict:
        """Trainable parameters, their share of the model, and the prefix file size."""
        s = {**PRESETS["Quick look"], **settings}
        info = self.model_info(model)
        cfg = PrefixConfig(prefix_length=int(s["prefix_length"]),
                           reparameterize=bool(s["reparameterize"]))
        with torch.device("meta"):
            trainable = Prefix(info.shape, cfg).trainable_parameters()
        folded = info.shape.params(cfg.prefix_length)
        return {"trainable": trainable, "share": trainable / info.num_parameters,
                "model_parameters": info.num_parameters, "file_bytes": folded * 4}
