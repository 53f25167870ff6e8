"""Exchange prefixes with Hugging Face PEFT: export ours as a PREFIX_TUNING adapter, import theirs.

Layouts (checked against PEFT 0.21.2, `PeftModel.get_prompt` and `BasePromptEncoder`):
- ours: `kv` (L, 2, H_kv, P, D), index 0 = keys, 1 = values.
- PEFT: one tensor `prompt_embeddings` (P, L*2*token_dim) in `adapter_model.safetensors`.
  `get_prompt` views it as (B, P, 2L, num_attention_heads, token_dim // num_attention_heads)
  and permutes to per-layer (2, B, H, P, D): row 2l holds layer l's keys, row 2l+1 its values.
- GQA: for PREFIX_TUNING, PEFT (since huggingface/peft#1901) overrides the config with
  `num_attention_heads = num_key_value_heads` and `token_dim = num_key_value_heads * head_dim`,
  so its H and D are our H_kv and D. Adapters made before that fix carry query-head counts and
  are refused with a message naming both numbers.
- `prefix_projection=True`: `save_pretrained` stores the MLP's *output* as `prompt_embeddings`
  (the same (P, L*2*token_dim) tensor), so such adapters import like plain ones. A raw state
  dict of the prompt encoder (`embedding.weight` + `transform.{0,2}.*`, e.g. from a training
  checkpoint) is folded here: embedding -> Linear -> Tanh -> Linear.

Weights are read only from safetensors; pickle files (`adapter_model.bin`) are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from prefixlab.engine.models import PrefixShape
from prefixlab.errors import PrefixLabError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
EMBEDDINGS_KEY = "prompt_embeddings"
# The PEFT release whose file layout this module writes and was checked against.
PEFT_FORMAT_VERSION = "0.21.2"
# Suffixes of a raw prefix-encoder state dict with prefix_projection=True.
_MLP_KEYS = (
    "embedding.weight",  # (P, token_dim)
    "transform.0.weight",  # (encoder_hidden_size, token_dim)
    "transform.0.bias",  # (encoder_hidden_size,)
    "transform.2.weight",  # (L*2*token_dim, encoder_hidden_size)
    "transform.2.bias",  # (L*2*token_dim,)
)


class PeftFormatError(PrefixLabError, ValueError):
    """A PEFT adapter that is not a prefix-tuning adapter for this model, or not safely readable."""


def _shape_of(model_config: transformers.PretrainedConfig) -> PrefixShape:
    """Prefix geometry of the (text part of the) model: L, H_kv, D."""
    return PrefixShape.of(model_config.get_text_config())


def export_peft(
    kv: torch.Tensor,
    model_config: transformers.PretrainedConfig,
    output_dir: str | Path,
    base_model_name_or_path: str,
    *,
    overwrite: bool = False,
    notes: str | None = None,
) -> None:
    """Write `kv` (L, 2, H_kv, P, D) as a PEFT PREFIX_TUNING adapter folder.

    `peft.PeftModel.from_pretrained(base_model, output_dir)` then gives the same logits as our
    cache injection. The folder is written next to `output_dir` and renamed into place, so a
    crash leaves either the old folder or the complete new one. An existing non-empty
    `output_dir` is refused unless `overwrite=True`. A README.md says what the adapter is,
    for which base model, and `notes` (e.g. where the base weights came from).
    """
    shape = _shape_of(model_config)
    problems = []
    if not torch.is_floating_point(kv):
        problems.append(f"dtype must be floating point, got {kv.dtype}")
    if kv.dim() != 5 or kv.shape[1] != 2:
        problems.append(f"shape must be (L, 2, H_kv, P, D), got {tuple(kv.shape)}")
    else:
        expected = {
            "num_layers (dim 0)": (shape.num_layers, kv.shape[0]),
            "num_key_value_heads (dim 2)": (shape.num_kv_heads, kv.shape[2]),
            "head_dim (dim 4)": (shape.head_dim, kv.shape[4]),
        }
        problems += [
            f"{name}: model has {want}, kv has {got}"
            for name, (want, got) in expected.items()
            if want != got
        ]
    if problems:
        raise ValueError("cannot export this prefix for this model: " + "; ".join(problems))

    L, _, H, P, D = kv.shape
    token_dim = H * D  # PEFT's token_dim for prefix tuning: KV width, not hidden size (GQA)
    embeddings = kv.detach().to("cpu").permute(3, 0, 1, 2, 4)  # (P, L, 2, H, D)
    embeddings = embeddings.reshape(P, L * 2 * token_dim).contiguous()  # (P, L*2*H*D)
    adapter_config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "peft_version": PEFT_FORMAT_VERSION,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": P,
        "token_dim": token_dim,
        "num_layers": L,
        "num_attention_heads": H,  # PEFT's name; it holds the KV head count for prefix tuning
        "num_transformer_submodules": 1,  # decoder-only
        "encoder_hidden_size": token_dim,  # unused without prefix_projection
        "prefix_projection": False,
        "init_weights": None,
        "modules_to_save": None,
        "auto_mapping": None,
    }

    readme = (f"# Prefix-tuning adapter (PEFT PREFIX_TUNING)\n\n"
              f"Trained with PrefixLab: {P} virtual tokens at each of {L} layers, for the base "
              f"model `{base_model_name_or_path}`.\n\n"
              "```python\nfrom peft import PeftModel\nfrom transformers import "
              "AutoModelForCausalLM\n"
              f"base = AutoModelForCausalLM.from_pretrained({base_model_name_or_path!r})\n"
              "model = PeftModel.from_pretrained(base, 'this folder')\n```\n")
    if notes:
        readme += f"\n## Base weights\n\n{notes}\n"

    def write(folder: Path) -> None:
        (folder / CONFIG_NAME).write_text(json.dumps(adapter_config, indent=2) + "\n")
        (folder / "README.md").write_text(readme)
        save_file({EMBEDDINGS_KEY: embeddings}, str(folder / WEIGHTS_NAME), {"format": "pt"})

    _write_dir_atomically(Path(output_dir), write, overwrite=overwrite)


def _write_dir_atomically(
    output_dir: Path, write: Callable[[Path], None], *, overwrite: bool
) -> None:
    """Fill a temporary sibling folder with `write(folder)`, then rename it to `output_dir`."""
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"{output_dir} exists and is not a folder; choose another path")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{output_dir} already exists and is not empty; pass overwrite=True to replace it "
            "or choose another folder"
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(
        tempfile.mkdtemp(prefix=f".{output_dir.name}.", suffix=".tmp", dir=output_dir.parent)
    )
    old = None
    try:
        write(tmp)
        if output_dir.exists():
            # rename() cannot replace a non-empty folder: move the old one aside first
            old = Path(
                tempfile.mkdtemp(
                    prefix=f".{output_dir.name}.", suffix=".old", dir=output_dir.parent
                )
            )
            os.replace(output_dir, old)
        os.replace(tmp, output_dir)
    except BaseException:
        if old is not None and not output_dir.exists():
            os.replace(old, output_dir)  # put the previous adapter back
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def import_peft(
    adapter_dir: str | Path, model_config: transformers.PretrainedConfig
) -> torch.Tensor:
    """Read a PEFT PREFIX_TUNING adapter folder as plain `kv` (L, 2, H_kv, P, D).

    Raises PeftFormatError if it is not a decoder-only prefix-tuning adapter that fits
    `model_config` (the message lists every mismatch), or if its weights are only a pickle file.
    """
    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / CONFIG_NAME
    weights_path = adapter_dir / WEIGHTS_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {adapter_dir}: not a PEFT adapter folder")
    if not weights_path.is_file():
        if (adapter_dir / PICKLE_WEIGHTS_NAME).is_file():
            raise PeftFormatError(
                f"{adapter_dir} holds only {PICKLE_WEIGHTS_NAME}, a pickle file, which can run "
                "arbitrary code when loaded; PrefixLab refuses pickle files. Convert it where you "
                "trust its origin: load the adapter with PEFT and re-save it with "
                f"`model.save_pretrained(dir, safe_serialization=True)` to get {WEIGHTS_NAME}."
            )
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {adapter_dir}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PeftFormatError(f"{config_path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise PeftFormatError(f"{config_path} must hold a JSON object, got {type(config).__name__}")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise PeftFormatError(f"{weights_path} is not a readable safetensors file: {e}") from e

    shape = _shape_of(model_config)
    L, H, D = shape.num_layers, shape.num_kv_heads, shape.head_dim
    query_heads = model_config.get_text_config().num_attention_heads
    _check_config(config, shape, query_heads, adapter_dir)
    P = config["num_virtual_tokens"]
    embeddings = _prompt_embeddings(tensors, adapter_dir)  # (P', L'*2*token_dim')
    if tuple(embeddings.shape) != (P, L * 2 * H * D):
        raise PeftFormatError(
            f"{adapter_dir}: prompt embeddings have shape {tuple(embeddings.shape)}, expected "
            f"(num_virtual_tokens, num_layers*2*token_dim) = ({P}, {L * 2 * H * D})"
        )
    kv = embeddings.reshape(P, L, 2, H, D).permute(1, 2, 3, 0, 4)  # (L, 2, H, P, D)
    return kv.contiguous()


def _check_config(
    config: dict[str, Any], shape: PrefixShape, query_heads: int, adapter_dir: Path
) -> None:
    """Raise one PeftFormatError listing every way `config` does not fit the model."""
    L, H, D = shape.num_layers, shape.num_kv_heads, shape.head_dim
    if config.get("peft_type") != "PREFIX_TUNING":
        raise PeftFormatError(
            f"{adapter_dir}: peft_type is {config.get('peft_type')!r}, expected 'PREFIX_TUNING'"
        )
    expected: dict[str, Any] = {
        "num_layers": L,
        "num_attention_heads": H,  # PEFT stores the KV head count here for GQA models
        "token_dim": H * D,
    }
    problems = [
        f"{name}: expected {want}, got {config.get(name)!r}"
        for name, want in expected.items()
        if config.get(name) != want
    ]
    submodules = config.get("num_transformer_submodules")
    if submodules not in (None, 1):
        problems.append(
            f"num_transformer_submodules: expected 1 (decoder-only), got {submodules!r} "
            f"(task_type {config.get('task_type')!r})"
        )
    P = config.get("num_virtual_tokens")
    if not isinstance(P, int) or isinstance(P, bool) or P < 1:
        problems.append(f"num_virtual_tokens: expected a positive integer, got {P!r}")
    if problems:
        hint = ""
        if config.get("num_attention_heads") == query_heads != H:
            hint = (
                f" (num_attention_heads {query_heads} is the query-head count; this GQA model "
                f"caches {H} key/value heads, which PEFT uses since huggingface/peft#1901)"
            )
        raise PeftFormatError(
            f"{adapter_dir} does not fit this model: " + "; ".join(problems) + hint
        )


def _prompt_embeddings(tensors: dict[str, torch.Tensor], adapter_dir: Path) -> torch.Tensor:
    """PEFT's flat prefix (P, L*2*token_dim): stored as is, or computed from the projection MLP."""
    if EMBEDDINGS_KEY in tensors:
        return tensors[EMBEDDINGS_KEY]
    found = {}
    for suffix in _MLP_KEYS:
        keys = [k for k in tensors if k == suffix or k.endswith("." + suffix)]
        if len(keys) == 1:
            found[suffix] = tensors[keys[0]]
    if len(found) != len(_MLP_KEYS):
        raise PeftFormatError(
            f"{adapter_dir / WEIGHTS_NAME} holds neither {EMBEDDINGS_KEY!r} nor one complete "
            f"prefix-projection MLP ({', '.join(_MLP_KEYS)}); keys found: {sorted(tensors)}"
        )
    emb, w0, b0, w2, b2 = (found[k] for k in _MLP_KEYS)
    if not (
        emb.dim() == w0.dim() == w2.dim() == 2
        and b0.dim() == b2.dim() == 1
        and w0.shape == (b0.shape[0], emb.shape[1])
        and w2.shape == (b2.shape[0], w0.shape[0])
    ):
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in found.items())
        raise PeftFormatError(f"{adapter_dir}: prefix-projection MLP shapes do not chain: {shapes}")
    with torch.no_grad():
        h = torch.tanh(torch.nn.functional.linear(emb, w0, b0))  # (P, encoder_hidden_size)
        return torch.nn.functional.linear(h, w2, b2)  # (P, L*2*token_dim)
