"""The compute dtype of the frozen model: chosen at run time from what the processor multiplies.

"auto" is bfloat16 where the device multiplies it natively (a CUDA GPU with bf16; a CPU with
AMX or AVX512-BF16) and float32 elsewhere: a CPU without those instructions runs bf16 matmuls
far slower than float32. Only the frozen model is held in the compute dtype; the prefix's
parameters, the optimizer's moments and the loss stay float32 (master weights), and label
log-probabilities are taken from float32 logits.

The CPU probe is `cpu_isa`, a module attribute so that tests can replace it.

On a CPU, "auto" stays float32 even where bfloat16 is native until bfloat16's quality on the
shared sets is measured on such a CPU (`CPU_AUTO_BF16`; docs/quality.md says what is
missing): the machines this was built on have neither AMX nor AVX512-BF16. Asking for
bfloat16 explicitly works on any CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from prefixlab.errors import ConfigError

PrecisionName = Literal["auto", "float32", "bfloat16", "float16"]
PRECISIONS: tuple[str, ...] = get_args(PrecisionName)
DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}
PRECISION_HELP = ("the frozen model's compute dtype: auto (bfloat16 on a GPU that has it, "
                  "else float32; on a CPU with AMX or AVX512-BF16 too until its quality there "
                  "is measured), float32, bfloat16, or float16 (CUDA only). The prefix, the "
                  "optimizer and the loss stay float32.")


CPU_AUTO_BF16 = False


def cpu_isa() -> str:
    """The CPU's native bfloat16 instructions: "AMX", "AVX512-BF16" or "none"."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if probe is not None and probe():
        return "AMX"
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is not None and probe():
        return "AVX512-BF16"
    return "none"


def check_precision(name: str) -> list[str]:
    """The problems of a precision setting (empty when it is one of PRECISIONS)."""
    if name in PRECISIONS:
        return []
    return [f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}"]


@dataclass(frozen=True)
class Precision:
    """A resolved precision: what runs, what was asked, and why."""

    name: str  # float32, bfloat16 or float16
    requested: str
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    def as_dict(self) -> dict[str, str]:
        return {"used": self.name, "requested": self.requested, "reason": self.reason}


def resolve_precision(requested: str | None, device: torch.device | str) -> Precision:
    """The precision `requested` runs in on `device` ("auto" or None decides here).

    A precision the device cannot run is refused with what it can: float16 off CUDA (CPU
    float16 matmuls are emulated), bfloat16 on a GPU without it.
    """
    requested = requested or "auto"
    if problems := check_precision(requested):
        raise ConfigError(problems)
    device = torch.device(device)
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        where = f"{torch.cuda.get_device_name(device)} " if torch.cuda.is_available() else ""
        native = f"the GPU {where}multiplies bfloat16 natively"
        if requested == "auto":
            return (Precision("bfloat16", requested, native) if bf16 else
                    Precision("float32", requested, "the GPU has no bfloat16"))
        if requested == "bfloat16" and not bf16:
            raise ConfigError("precision bfloat16: this GPU does not support it; "
                              "use float16 or float32")
        return Precision(requested, requested, "as asked")
    if requested == "float16":
        raise ConfigError(f"precision float16 runs on CUDA only, not on {device.type}; "
                          "use bfloat16 or float32")
    if device.type != "cpu":
        if requested == "auto":
            return Precision("float32", requested, f"{device.type}: float32 by default")
        return Precision(requested, requested, "as asked")
    isa = cpu_isa()
    if requested == "auto":
        if isa == "none":
            return Precision("float32", requested,
                             "the CPU has neither AMX nor AVX512-BF16: bfloat16 would be slower")
        if not CPU_AUTO_BF16:
            return Precision("float32", requested,
                             f"the CPU multiplies bfloat16 natively ({isa}), but bfloat16's "
                             "quality is not yet measured on such a CPU: ask for it with "
                             "precision bfloat16")
        return Precision("bfloat16", requested, f"the CPU multiplies bfloat16 natively ({isa})")
    how = "native" if isa != "none" else "emulated: no AMX or AVX512-BF16"
    return Precision(requested, requested,
                     "as asked" if requested == "float32" else f"as asked ({how})")
