"""The downloads room: a run's prefix as a zip (the tensor, its settings, report and log, and
a README naming the base model it needs), or as a PEFT adapter."""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from prefixlab.engine.models import LoadedModel, model_provenance, portable_model_id
from prefixlab.engine.peft_interop import export_peft
from prefixlab.engine.prefix import load_prefix
from prefixlab.runs.registry import RunStore

PREFIX_ZIP_FILES = ("prefix.safetensors", "config.json", "report.json", "metrics.jsonl")


def prefix_readme(info: dict) -> str:
    """What each file of a downloaded prefix is, and which base model it needs."""
    model = info["run"]["model"]
    text = (f"# PrefixLab prefix: {info.get('name', '')}\n\n"
            f"Base model: `{portable_model_id(model)}`.\n\n"
            "- `prefix.safetensors`: the prefix itself, one tensor `key_values` of shape "
            "(layers, 2, kv_heads, prefix_length, head_dim), float32: the keys and values "
            "read before every input.\n"
            "- `config.json`: the run's settings, labels, prompt template and data summary.\n"
            "- `report.json`: held-out metrics beside the baselines.\n"
            "- `metrics.jsonl`: the training log, one JSON object per line.\n")
    if notes := model_provenance(model):
        text += f"\n## Base weights\n\n{notes}\n"
    return text


class DownloadRoom:
    """Set up by Workbench.__init__: `store`, `exports_dir`; `model` from the models room."""

    store: RunStore
    exports_dir: Path
    model: Callable[..., LoadedModel]

    def download(self, run_id: str, kind: str) -> Path:
        """A zip of the run's prefix + config ("prefix") or its PEFT adapter ("peft")."""
        folder = self.store.folder(run_id)
        info = folder.read_config()
        self.exports_dir.mkdir(parents=True, exist_ok=True)
        target = self.exports_dir / f"{run_id}-{kind}.zip"
        # A folder of this call's own: two users downloading the same run at once must not
        # delete each other's files; the finished zip replaces the target atomically.
        work = Path(tempfile.mkdtemp(prefix=f".{run_id}-{kind}-", dir=self.exports_dir))
        staging, tmp = work / kind, work / "download.zip"
        try:
            if kind == "peft":
                loaded = self.model(info["run"]["model"])
                kv = load_prefix(folder.prefix_path, loaded.shape).kv
                export_peft(kv, loaded.model.config, staging, portable_model_id(loaded.name),
                            notes=model_provenance(loaded.name))
            elif kind == "prefix":
                # One tensor file: the folded key/values that scoring and export read (the
                # run folder's prefix_params.safetensors only matters for resuming it).
                staging.mkdir()
                for name in PREFIX_ZIP_FILES:
                    if (folder.path / name).is_file():
                        shutil.copy2(folder.path / name, staging / name)
                (staging / "README.md").write_text(prefix_readme(info))
            else:
                raise ValueError(f"unknown download kind {kind!r}")
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                for f in sorted(staging.rglob("*")):
                    if f.is_file():
                        z.write(f, f.relative_to(staging))
            tmp.replace(target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return target
