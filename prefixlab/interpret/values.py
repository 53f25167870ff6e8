"""The value readout: the tokens each prefix position's value promotes through the LM head."""


from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from prefixlab.engine.families import family_of
from prefixlab.engine.models import LoadedModel, get_module
from prefixlab.interpret.frame import _check_kv

# --- value readout ----------------------------------------------------------------------------


@dataclass
class ValueReadout:
    """Per layer and position: the tokens a prefix value promotes through out_proj and LM head."""

    token_ids: np.ndarray  # (L, P, k)
    logits: np.ndarray  # (L, P, k), best first
    labels: dict[int, str] = field(default_factory=dict)


@torch.no_grad()
def value_logits(loaded: LoadedModel, kv: torch.Tensor) -> torch.Tensor:
    """Logits (L, P, V) of each prefix value written to the residual stream and unembedded.

    Query head h reads KV head h // (H / H_kv) (GQA, as the model repeats them); if every head
    attended only to position p, the attention output is those values concatenated over query
    heads, then the layer's out_proj (bias included). The result goes through the final norm
    and the LM head as if it were the whole residual stream (logit lens).
    """
    _check_kv(loaded, kv)
    model = loaded.model
    family = family_of(model.config)
    blocks = get_module(model, family.layers)
    heads = model.config.num_attention_heads
    L, _, H_kv, P, D = kv.shape
    group = heads // H_kv
    written = []
    for layer, block in enumerate(blocks):
        values = kv[layer, 1].to(loaded.device, torch.float32)  # (H_kv, P, D)
        per_head = values.repeat_interleave(group, dim=0)  # (H, P, D)
        merged = per_head.permute(1, 0, 2).reshape(P, heads * D)  # (P, H*D)
        out_proj = getattr(getattr(block, family.attention), family.out_proj)
        written.append(out_proj(merged))  # (P, hidden)
    normed = get_module(model, family.final_norm)(torch.stack(written))  # (L, P, hidden)
    return model.get_output_embeddings()(normed).float().cpu()  # (L, P, V)


def value_readout(loaded: LoadedModel, kv: torch.Tensor, top_k: int = 10) -> ValueReadout:
    """The top_k tokens each prefix value promotes (see value_logits)."""
    logits = value_logits(loaded, kv)
    top = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
    ids = top.indices.numpy()
    labels = {int(i): loaded.tokenizer.decode([int(i)]) for i in np.unique(ids)}
    return ValueReadout(ids, top.values.numpy(), labels)
