"""Other ways to adapt the same frozen model, for comparing prefix tuning against them: prompt
tuning, LoRA and IA3 (through PEFT), full fine-tuning, and what each trains and stores.

Every gradient method here is a `Trainable`: an nn.Module whose parameters are what the
method trains and whose `key_values()` is what `train()` puts in front of each batch. So one
loop (train.py), one encoder (template, label words) and one scoring path (predict.py) serve
them all; only what is trainable differs.

- prompt tuning: P trainable input embeddings. For a causal model they are read before any
  text and see only each other, so their keys/values at every layer are a function of them
  alone: `key_values()` reads them through the frozen model (differentiably) and the text
  attends to them as it does to a prefix, positions continuing at P. That is PEFT's
  PROMPT_TUNING forward; the adapter is stored in PEFT's format.
- LoRA, IA3: PEFT injects its layers into a copy of the model; `key_values()` is None.
- full fine-tuning: every weight of a copy of the model.

Per-method settings live in one table, `METHODS`; per-family target modules come from PEFT's
own table, and a family it lacks is refused with the families it has.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from prefixlab.engine.cpu import onednn_inference
from prefixlab.engine.families import returned_cache
from prefixlab.engine.models import LoadedModel
from prefixlab.errors import ConfigError


@dataclass(frozen=True)
class Method:
    """One way to adapt the model, as a comparison trains it."""

    name: str
    title: str
    kind: str  # prefix | prompt | peft | full | probe | tfidf
    learning_rate: float | None = None
    """None: the run's own (the prefix's); otherwise the method's usual step size, since
    full weights take far smaller steps than a prefix or a prompt."""
    settings: dict = field(default_factory=dict)
    """The method's defaults, named in the comparison's output."""
    labels_only: bool = False
    """Needs labels (a classifier on features): cannot run on a generation task."""


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("prefix", "prefix tuning", "prefix",
           settings={"what": "key/value prefix at every layer (PrefixLab's run)"}),
    Method("prompt", "prompt tuning", "prompt", 3e-2,
           {"what": "virtual input tokens (PEFT PROMPT_TUNING)",
            "num_virtual_tokens": "the prefix length",
            "init": "the prefix's init text, as token embeddings"}),
    Method("lora", "LoRA", "peft", 1e-3,
           {"what": "PEFT LoRA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
            "target_modules": "PEFT's default for the family (attention projections)"}),
    Method("ia3", "IA3", "peft", 3e-3,
           {"what": "PEFT IA3", "target_modules": "PEFT's default for the family",
            "feedforward_modules": "PEFT's default for the family"}),
    Method("full", "full fine-tuning", "full", 2e-5,
           {"what": "every weight, torch AdamW", "stored": "the whole model"}),
    Method("probe", "linear probe", "probe", labels_only=True,
           settings={"what": "logistic regression (scikit-learn) on the frozen model's "
                             "last-token hidden state after the template",
                     "C": "chosen on validation from 0.01, 0.1, 1, 10"}),
    Method("tfidf", "TF-IDF", "tfidf", labels_only=True,
           settings={"what": "word 1-2 gram TF-IDF + balanced logistic regression"}),
)}
DEFAULT_METHODS = ("prefix", "prompt", "lora", "ia3", "full", "probe", "tfidf")


def default_methods(generation: bool) -> list[str]:
    """What a comparison trains when no method is named: all of them, less those that need
    labels on a generation run (named ones are refused there instead: method_problems)."""
    return [m for m in DEFAULT_METHODS if not (generation and METHODS[m].labels_only)]


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """Method names from "prefix,lora" (or a list), in order, without repeats; unknown
    names are refused in one message naming the known ones."""
    names = [n.strip().lower() for n in (text.split(",") if isinstance(text, str) else text)]
    names = list(dict.fromkeys(n for n in names if n))
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method{'s' * (len(unknown) > 1)} {', '.join(unknown)}; "
                          f"the methods are {', '.join(METHODS)}")
    if not names:
        raise ConfigError(f"no method named; the methods are {', '.join(METHODS)}")
    return names


def task_problems(names: Sequence[str], generation: bool) -> list[str]:
    """Why each named method cannot run on this task, known before any model loads."""
    return [f"{name} classifies and a generation run has no labels; leave it out (the default "
            "methods of a generation run do)"
            for name in names if generation and METHODS[name].labels_only]


def method_problems(names: Sequence[str], model_type: str, dtype: torch.dtype,
                    generation: bool) -> list[str]:
    """Why each named method cannot run on this model and task (empty: all can)."""
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING as IA3_TARGETS,
    )
    from peft.utils.constants import (
        TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as LORA_TARGETS,
    )

    problems = task_problems(names, generation)
    for name in names:
        targets = {"lora": LORA_TARGETS, "ia3": IA3_TARGETS}.get(name)
        if targets is not None and model_type not in targets:
            problems.append(f"{name}: PEFT has no default target modules for the model family "
                            f"{model_type!r} (it has {', '.join(sorted(targets))})")
        if name == "full" and dtype != torch.float32:
            problems.append(f"full fine-tuning needs the model in float32 (AdamW on {dtype} "
                            "weights loses the small updates); set precision to float32")
    return problems


class Trainable(nn.Module):
    """What a method trains: `parameters()` are its trainable weights (and only those),
    `key_values()` what goes in front of every row (None: nothing), `model` the model its
    rows are read by."""

    model: nn.Module

    def key_values(self) -> torch.Tensor | None:
        return None

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the trainable weights, to keep the best step's."""
        return {k: v.detach().cpu().clone() for k, v in self.named_parameters()
                if v.requires_grad}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_parameters())
        with torch.no_grad():
            for k, v in state.items():
                own[k].copy_(v)

    def stored_bytes(self) -> int:
        """Bytes a task stores for this method: its trained weights, float32."""
        return 4 * self.trainable_parameters()


class PromptEmbeddings(Trainable):
    """Prompt tuning: P input embeddings (P, E), read through the frozen `model`."""

    def __init__(self, model: nn.Module, embeddings: torch.Tensor) -> None:
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: its weights are not trained here
        self.embedding = nn.Parameter(embeddings.detach().float().clone())  # (P, E)

    def key_values(self) -> torch.Tensor:
        """The virtual tokens' keys/values (L, 2, H_kv, P, D), differentiable."""
        dtype = next(self.model.parameters()).dtype
        embeds = self.embedding.to(dtype).unsqueeze(0)  # (1, P, E)
        out = self.model(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        layers = returned_cache(out).layers
        return torch.stack([torch.stack([c.keys[0], c.values[0]]) for c in layers])


class ModelWeights(Trainable):
    """LoRA, IA3 or full fine-tuning: trainable weights inside `model` (a copy of the base)."""

    def __init__(self, model: nn.Module, peft_model: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model  # a submodule: parameters() are its weights that require grad
        self.__dict__["peft_model"] = peft_model


def _copy_model(loaded: LoadedModel) -> nn.Module:
    """A copy of the frozen model to train in, with plain nn.Linear layers (their oneDNN
    inference class would survive into a saved full model's code path for nothing)."""
    model = copy.deepcopy(loaded.model)
    onednn_inference(model, on=False)
    return model


def build_trainable(name: str, loaded: LoadedModel, *, prompt_ids: Sequence[int] = (),
                    prompt_length: int = 10, seed: int = 0) -> Trainable:
    """The method's trainable part on (a copy of) `loaded`'s model; the base stays as it was.

    `prompt_ids`: the init text's tokens for prompt tuning, repeated or cut to
    `prompt_length` (random embeddings when empty).
    """
    torch.manual_seed(seed)
    if name == "prompt":
        table = loaded.model.get_input_embeddings().weight  # (V, E)
        if prompt_ids:
            ids = (list(prompt_ids) * (prompt_length // len(prompt_ids) + 1))[:prompt_length]
            start = table[torch.tensor(ids, device=table.device)]
        else:
            start = table[torch.randint(0, table.shape[0], (prompt_length,))]
        return PromptEmbeddings(loaded.model, start)
    if name == "full":
        model = _copy_model(loaded)
        model.requires_grad_(True)
        return ModelWeights(model)
    if name in ("lora", "ia3"):
        from peft import IA3Config, LoraConfig, get_peft_model

        model = _copy_model(loaded)
        config = (LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0)
                  if name == "lora" else IA3Config(task_type="CAUSAL_LM"))
        peft_model = get_peft_model(model, config)  # injects into `model`, freezes the rest
        return ModelWeights(model, peft_model)
    raise ConfigError(f"{name} is not a gradient method; those are prompt, lora, ia3, full")


def peft_settings(trainable: Trainable) -> dict:
    """The PEFT config a LoRA/IA3 method ran with, as resolved for this model."""
    peft_model = trainable.__dict__.get("peft_model")
    if peft_model is None:
        return {}
    config = peft_model.peft_config[peft_model.active_adapter].to_dict()
    keep = ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules",
            "feedforward_modules")
    def plain(v):
        return sorted(v) if isinstance(v, set) else getattr(v, "value", v)  # sets, enums

    return {k: plain(v) for k, v in config.items() if k in keep and v is not None}


def save_adapter(trainable: Trainable, name: str, loaded: LoadedModel, folder: Path) -> int:
    """Write the method's trained weights to `folder` in PEFT's adapter format (full
    fine-tuning: the whole model); returns the bytes written."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(trainable, PromptEmbeddings):
        from peft import PromptTuningConfig, get_peft_model

        shell = copy.deepcopy(loaded.model)  # get_peft_model wraps (and freezes) its model
        P = trainable.embedding.shape[0]
        peft_model = get_peft_model(shell, PromptTuningConfig(task_type="CAUSAL_LM",
                                                              num_virtual_tokens=P))
        with torch.no_grad():
            peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight.copy_(
                trainable.embedding)
        peft_model.save_pretrained(str(folder), safe_serialization=True)
    elif trainable.__dict__.get("peft_model") is not None:
        trainable.__dict__["peft_model"].save_pretrained(str(folder), safe_serialization=True)
    else:
        trainable.model.save_pretrained(str(folder), safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(folder))
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
