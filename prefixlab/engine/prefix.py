"""The prefix: trainable key/value vectors at every layer of a frozen causal LM.

A prefix of length P is a tensor `kv` of shape (L, 2, H_kv, P, D): per layer, P keys and P
values with the model's key/value head count (GQA models have fewer KV heads than query heads).
It enters the model as a pre-filled `DynamicCache`, with the attention mask extended over the
prefix and input positions starting at P — exactly as if P tokens had been read before the input.

Two parameterizations:
- plain (default): `kv` itself is the parameter;
- reparameterized (Li & Liang 2021): a small embedding (P, E) through an MLP gives all layers'
  keys and values. We add the MLP's output to a fixed initial `kv` and zero the MLP's last layer,
  so training starts exactly at the initialization (e.g. real-text key/values). For inference
  and export the MLP is folded into plain `kv`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from prefixlab.engine.families import cache_keyword, returned_cache
from prefixlab.engine.models import PrefixShape
from prefixlab.errors import ConfigError, PrefixLabError
from prefixlab.files import atomic_save_tensors

FORMAT = "prefixlab-prefix/1"
INIT_CHOICES = ("text", "random", "zero")


class PrefixFileError(PrefixLabError, ValueError):
    """A prefix file that is corrupt or does not fit the base model."""


@dataclass
class PrefixConfig:
    """How the prefix is built. Stored in every run's config.json."""

    prefix_length: int = 10
    """P, the number of virtual tokens per layer; 10 is the paper's choice for generation."""
    init: Literal["text", "random", "zero"] = "text"
    """text: key/values of real text (works at once; random init stayed at chance on
    SmolLM2-135M in our measurements); random: Gaussian with real activations' scale; zero."""
    init_text: str | None = None
    """Text whose key/values start the prefix (implies init=text); unset (None) derives it
    from the task and labels."""
    reparameterize: bool = False
    """Train an embedding + MLP (the paper's reparameterization) instead of kv directly."""
    reparam_embed_dim: int = 64
    """Width of each virtual token's embedding under reparameterize."""
    reparam_hidden: int = 256
    """Hidden width of the MLP that maps the embeddings to every layer's key/values."""

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.prefix_length <= 512:
            problems.append(f"prefix_length must be 1..512, got {self.prefix_length}")
        if self.init not in INIT_CHOICES:
            problems.append(f"init must be one of {', '.join(INIT_CHOICES)}, got {self.init!r}")
        if self.reparam_embed_dim < 1 or self.reparam_hidden < 1:
            problems.append("reparameterization sizes must be positive")
        if problems:
            raise ConfigError(problems)


class Prefix(nn.Module):
    """Trainable prefix key/values for one model shape."""

    def __init__(self, shape: PrefixShape, config: PrefixConfig) -> None:
        super().__init__()
        self.shape = shape
        self.config = config
        L, H, P, D = shape.num_layers, shape.num_kv_heads, config.prefix_length, shape.head_dim
        if config.reparameterize:
            self.register_buffer("base", torch.zeros(L, 2, H, P, D))
            self.embedding = nn.Parameter(torch.randn(P, config.reparam_embed_dim))
            self.mlp = nn.Sequential(
                nn.Linear(config.reparam_embed_dim, config.reparam_hidden),
                nn.Tanh(),
                nn.Linear(config.reparam_hidden, L * 2 * H * D),
            )
            nn.init.zeros_(self.mlp[-1].weight)
            nn.init.zeros_(self.mlp[-1].bias)
        else:
            self.kv = nn.Parameter(torch.zeros(L, 2, H, P, D))

    @property
    def length(self) -> int:
        return self.config.prefix_length

    def key_values(self) -> torch.Tensor:
        """The prefix as (L, 2, H_kv, P, D), differentiable."""
        if not self.config.reparameterize:
            return self.kv
        L, H, D = self.shape.num_layers, self.shape.num_kv_heads, self.shape.head_dim
        delta = self.mlp(self.embedding)  # (P, L*2*H*D)
        delta = delta.view(self.length, L, 2, H, D).permute(1, 2, 3, 0, 4)  # (L, 2, H, P, D)
        return self.base + delta

    @torch.no_grad()
    def folded(self) -> torch.Tensor:
        """Plain key/values for inference and export: (L, 2, H_kv, P, D), detached, on CPU."""
        return self.key_values().detach().float().cpu().clone()

    @torch.no_grad()
    def set_key_values(self, kv: torch.Tensor) -> None:
        """Start from `kv` (L, 2, H_kv, P, D); a reparameterized prefix keeps it as its base."""
        expected = (*self.key_values().shape,)
        if tuple(kv.shape) != expected:
            raise ValueError(f"key/values of shape {tuple(kv.shape)} do not fit {expected}")
        target = self.base if self.config.reparameterize else self.kv
        target.copy_(kv.to(target.device, target.dtype))

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


# --- injecting the prefix -------------------------------------------------------------------


def build_cache(kv: torch.Tensor, batch_size: int, model: nn.Module):
    """A fresh DynamicCache holding the prefix for `batch_size` rows.

    Caches are mutated in place by every forward and by generate: never reuse one.
    """
    from transformers import DynamicCache

    dtype = next(model.parameters()).dtype
    if kv.is_floating_point() and kv.dtype != dtype:  # a float32 prefix on a bf16 model
        kv = kv.to(dtype)
    layers = []
    for layer in kv:  # (2, H, P, D)
        k = layer[0].unsqueeze(0).expand(batch_size, -1, -1, -1)  # (B, H, P, D)
        v = layer[1].unsqueeze(0).expand(batch_size, -1, -1, -1)
        layers.append((k, v))
    return DynamicCache(layers, config=model.config)


def prefix_inputs(
    model: nn.Module, kv: torch.Tensor | None, attention_mask: torch.Tensor,
    prefix_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor | object]:
    """Keyword arguments that put `kv` in front of a batch: cache, extended mask, positions.

    The mask must cover prefix + input, (B, P + T): a mask of length T alone is padded with
    zeros at the end by transformers and silently hides the last input tokens. Positions start
    at P and skip left padding (generate's own rule).
    `prefix_mask`: which prefix slots the input may attend to, (P,) or (B, P), true to keep;
    None keeps all (training's prefix dropout, TrainConfig.prefix_dropout, hides some).
    """
    B = attention_mask.shape[0]
    if kv is None:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return {"attention_mask": attention_mask, "position_ids": position_ids}
    P = kv.shape[3]
    ones = torch.ones(B, P, dtype=attention_mask.dtype, device=attention_mask.device)
    full_mask = torch.cat([ones, attention_mask], dim=1)  # (B, P+T)
    position_ids = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, P:]  # (B, T)
    if prefix_mask is not None:
        # after the positions: a hidden slot still counts, so the input stays at P onward,
        # where the prefix's keys were trained and RoPE-rotated to be read from
        kept = prefix_mask.to(attention_mask.device, attention_mask.dtype).expand(B, P)
        full_mask = torch.cat([kept, attention_mask], dim=1)  # (B, P+T)
    return {
        cache_keyword(model): build_cache(kv, B, model),
        "attention_mask": full_mask,
        "position_ids": position_ids,
    }


def forward(
    model: nn.Module,
    kv: torch.Tensor | None,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int | torch.Tensor = 0,
    prefix_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of `input_ids` read after the prefix (or with no prefix when kv is None).

    `logits_to_keep`: 0 for all positions, or a (B, T) bool mask, which returns (n_true, V).
    `prefix_mask`: the prefix slots to attend to (prefix_inputs); None, all of them.
    """
    kwargs = prefix_inputs(model, kv, attention_mask, prefix_mask)
    out = model(input_ids=input_ids, logits_to_keep=logits_to_keep, use_cache=kv is not None,
                **kwargs)
    return out.logits


# --- initialization -------------------------------------------------------------------------


@torch.no_grad()
def text_key_values(model: nn.Module, tokenizer, text: str, length: int) -> torch.Tensor:
    """Key/values (L, 2, H_kv, P, D) the model caches when it reads `text`.

    The text's tokens are repeated to fill P positions (or cut to P). A prefix set to these is
    exactly the text placed before the input: RoPE keys are cached already rotated at 0..P-1.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the initialization text has no tokens")
    ids = (ids * (length // len(ids) + 1))[:length]
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    out = model(input_ids=input_ids, use_cache=True)
    cache = returned_cache(out)
    kv = torch.stack(
        [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]
    )  # (L, 2, H, P, D)
    return kv.float().cpu()


@torch.no_grad()
def extend_prefix(model: nn.Module, kv: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """The prefix (L, 2, H_kv, P, D) followed by what the model caches reading token `ids`
    after it: (L, 2, H_kv, P+S, D), float32 on kv's device; its first P slots are `kv`.

    A prompt that starts with `ids`, read after the extended prefix without them, gives what
    the whole prompt gives after `kv`: a template's head is read once per prefix, not once
    per text (positions continue at P+S, RoPE keys are cached rotated at P..P+S-1).
    """
    if not ids:
        return kv
    device = next(model.parameters()).device
    mask = torch.ones(1, len(ids), dtype=torch.long, device=device)
    out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True,
                logits_to_keep=1, **prefix_inputs(model, kv.to(device), mask))
    cache = returned_cache(out)
    ext = torch.stack(
        [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]
    )  # (L, 2, H, P+S, D)
    return ext.float().to(kv.device)


def average_prefixes(kvs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The element-wise mean of folded prefixes, each (L, 2, H_kv, P, D), in float32: weight
    averaging over a run's last evaluations (TrainConfig.average_last)."""
    if not kvs:
        raise ValueError("no prefixes to average")
    shapes = {tuple(kv.shape) for kv in kvs}
    if len(shapes) > 1:
        raise ValueError(f"prefixes to average must share one shape, got {sorted(shapes)}")
    return torch.stack([kv.float() for kv in kvs]).mean(0)  # (L, 2, H_kv, P, D)


def default_init_text(labels: list[str], task: str | None = None) -> str:
    """A short task description naming the labels: real words the model already reads well."""
    head = task.strip() if task and task.strip() else "Classify the text"
    return f"{head}. Answer with one of: {', '.join(labels)}."


def init_prefix(
    prefix: Prefix, model: nn.Module, tokenizer, text: str | None, seed: int = 0
) -> None:
    """Initialize a prefix per its config: from `text`, random at real scale, or zero."""
    cfg = prefix.config
    if cfg.init == "zero":
        prefix.set_key_values(torch.zeros_like(prefix.folded()))
        return
    reference = text_key_values(model, tokenizer, text or "The", cfg.prefix_length)
    if cfg.init == "text":
        prefix.set_key_values(reference)
        return
    generator = torch.Generator().manual_seed(seed)
    scale = reference.std(dim=(2, 3, 4), keepdim=True)  # (L, 2, 1, 1, 1): each layer's spread
    noise = torch.randn(reference.shape, generator=generator)
    prefix.set_key_values(noise * scale)


# --- files ----------------------------------------------------------------------------------


@dataclass
class PrefixFile:
    """A prefix read from disk: plain key/values plus what it was made for."""

    kv: torch.Tensor  # (L, 2, H_kv, P, D)
    metadata: dict[str, str] = field(default_factory=dict)


def save_prefix(path: str | Path, kv: torch.Tensor, model_name: str, **metadata: str) -> None:
    """Write plain key/values as safetensors with their shape and base model in the header."""
    L, _, H, P, D = kv.shape
    meta = {
        "format": FORMAT,
        "base_model": model_name,
        "num_layers": str(L),
        "num_kv_heads": str(H),
        "prefix_length": str(P),
        "head_dim": str(D),
        **{k: str(v) for k, v in metadata.items()},
    }
    atomic_save_tensors(path, {"key_values": kv.float()}, metadata=meta)


def load_prefix(path: str | Path, shape: PrefixShape | None = None) -> PrefixFile:
    """Read a prefix file and check it fits `shape`; refuse anything else with a reason."""
    path = Path(path)
    if not path.is_file():
        raise PrefixFileError(f"no prefix file at {path}")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise PrefixFileError(f"{path} is not a readable safetensors prefix: {e}") from e
    kv = tensors.get("key_values")
    if metadata.get("format") != FORMAT or kv is None:
        raise PrefixFileError(f"{path} is not a PrefixLab prefix (format {FORMAT!r} expected)")
    if kv.dim() != 5 or kv.shape[1] != 2:
        raise PrefixFileError(
            f"{path}: key_values has shape {tuple(kv.shape)}, expected (L, 2, H_kv, P, D)"
        )
    if not torch.isfinite(kv).all():
        raise PrefixFileError(f"{path} holds NaN or infinite values")
    if shape is not None:
        found = PrefixShape(kv.shape[0], kv.shape[2], kv.shape[4])
        if found != shape:
            diffs = [
                f"{name}: prefix has {getattr(found, name)}, model has {getattr(shape, name)}"
                for name in ("num_layers", "num_kv_heads", "head_dim")
                if getattr(found, name) != getattr(shape, name)
            ]
            made_for = metadata.get("base_model", "an unknown model")
            raise PrefixFileError(
                f"this prefix was made for {made_for} and does not fit the loaded model ("
                + "; ".join(diffs) + ")"
            )
    return PrefixFile(kv.float(), metadata)
