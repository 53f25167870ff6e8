"""PEFT interop: our (L, 2, H_kv, P, D) prefix against PEFT's PREFIX_TUNING adapters.

"Our" logits come from `prefixlab.engine.prefix.forward`, the injection every run uses; PEFT's
own forward is the independent reference it must agree with.
Models are built from configs in-process; conftest.py sets HF_HUB_OFFLINE=1.
"""

import json
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from safetensors.torch import save_file

from prefixlab.engine.peft_interop import PeftFormatError, export_peft, import_peft
from prefixlab.engine.prefix import forward

P = 3  # prefix length
CONFIGS = {
    "gpt2": lambda: transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=128,
        bos_token_id=0, eos_token_id=0,
    ),
    "llama-gqa": lambda: transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=100, max_position_embeddings=128,
    ),
}


def tolerate_peft_deprecations(test):
    """PEFT 0.21.2 on transformers 5.24 still passes `past_key_values` and reads
    `is_gradient_checkpointing`: FutureWarnings the project's pytest settings make errors."""
    for message in ("`past_key_values` is deprecated", "`is_gradient_checkpointing` is deprecated"):
        test = pytest.mark.filterwarnings(f"ignore:{message}:FutureWarning")(test)
    return test


def tiny_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()


def kv_shape(config) -> tuple[int, int, int, int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return (config.num_hidden_layers, 2, kv_heads, P, config.hidden_size // heads)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    input_ids = torch.randint(0, 100, (2, 5))
    return input_ids, torch.ones_like(input_ids)


@torch.no_grad()
def logits_after_prefix(model, kv, input_ids, attention_mask) -> torch.Tensor:
    """Our logits: PrefixLab's own injection, the code every run uses."""
    return forward(model, kv, input_ids, attention_mask)


@torch.no_grad()
def peft_logits(peft_model, input_ids, attention_mask) -> torch.Tensor:
    # mask of the input's length only: PEFT prepends the prefix's ones itself
    return peft_model(input_ids=input_ids, attention_mask=attention_mask).logits


def assert_logits_close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
@tolerate_peft_deprecations
def test_exported_adapter_loads_in_peft_with_same_logits(name, tmp_path):
    model = tiny_model(name)
    torch.manual_seed(2)
    kv = torch.randn(kv_shape(model.config))
    export_peft(kv, model.config, tmp_path / "adapter", f"tiny-{name}")

    input_ids, mask = batch()
    ours = logits_after_prefix(model, kv, input_ids, mask)
    plain = model(input_ids=input_ids, attention_mask=mask).logits
    peft_model = PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    assert peft_model.active_peft_config.peft_type == "PREFIX_TUNING"
    assert_logits_close(peft_logits(peft_model, input_ids, mask), ours)
    assert (ours - plain).abs().max() > 1e-2  # the prefix does change the logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_import_round_trips_export_exactly(name, tmp_path):
    config = CONFIGS[name]()
    torch.manual_seed(3)
    kv = torch.randn(kv_shape(config))
    export_peft(kv, config, tmp_path / "adapter", f"tiny-{name}")
    assert torch.equal(import_peft(tmp_path / "adapter", config), kv)
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["num_attention_heads"] == kv.shape[2]  # KV heads, not query heads
    assert written["token_dim"] == kv.shape[2] * kv.shape[4]


@pytest.mark.parametrize("prefix_projection", [False, True])
@pytest.mark.parametrize("name", list(CONFIGS))
@tolerate_peft_deprecations
def test_import_of_peft_saved_adapter_matches_peft(name, prefix_projection, tmp_path):
    model = tiny_model(name)
    peft_config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=prefix_projection,
        encoder_hidden_size=16,
    )
    torch.manual_seed(4)
    peft_model = get_peft_model(model, peft_config).eval()  # projection MLP runs live here
    peft_model.save_pretrained(tmp_path / "adapter", safe_serialization=True)

    kv = import_peft(tmp_path / "adapter", model.config)
    assert kv.shape == kv_shape(model.config)
    input_ids, mask = batch()
    assert_logits_close(
        logits_after_prefix(model, kv, input_ids, mask), peft_logits(peft_model, input_ids, mask)
    )


@tolerate_peft_deprecations
def test_import_folds_projection_mlp_from_raw_encoder_weights(tmp_path):
    model = tiny_model("llama-gqa")
    peft_config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True,
        encoder_hidden_size=16,
    )
    torch.manual_seed(5)
    peft_model = get_peft_model(model, peft_config).eval()
    # a training checkpoint: embedding + MLP weights instead of PEFT's folded prompt_embeddings
    folder = tmp_path / "checkpoint"
    peft_config.save_pretrained(folder)
    encoder = peft_model.prompt_encoder["default"].state_dict()
    assert set(encoder) == {"embedding.weight", "transform.0.weight", "transform.0.bias",
                            "transform.2.weight", "transform.2.bias"}
    save_file({f"prompt_encoder.{k}": v.contiguous() for k, v in encoder.items()},
              str(folder / "adapter_model.safetensors"))

    kv = import_peft(folder, model.config)
    input_ids, mask = batch()
    assert_logits_close(
        logits_after_prefix(model, kv, input_ids, mask), peft_logits(peft_model, input_ids, mask)
    )


def test_import_rejects_layer_count_mismatch(tmp_path):
    config = CONFIGS["gpt2"]()
    export_peft(torch.randn(kv_shape(config)), config, tmp_path / "adapter", "tiny-gpt2")
    deeper = CONFIGS["gpt2"]()
    deeper.n_layer = 3
    with pytest.raises(PeftFormatError, match=r"num_layers: expected 3, got 2"):
        import_peft(tmp_path / "adapter", deeper)


def test_import_names_query_heads_of_pre_gqa_adapter(tmp_path):
    config = CONFIGS["llama-gqa"]()
    export_peft(torch.randn(kv_shape(config)), config, tmp_path / "adapter", "tiny-llama")
    path = tmp_path / "adapter" / "adapter_config.json"
    old = json.loads(path.read_text())
    old.update(num_attention_heads=4, token_dim=32)  # what PEFT wrote before GQA support
    path.write_text(json.dumps(old))
    with pytest.raises(PeftFormatError, match=r"num_attention_heads: expected 2, got 4.*query"):
        import_peft(tmp_path / "adapter", config)


def test_import_refuses_pickle_weights(tmp_path, monkeypatch):
    config = CONFIGS["gpt2"]()
    export_peft(torch.randn(kv_shape(config)), config, tmp_path / "adapter", "tiny-gpt2")
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    (tmp_path / "adapter" / "adapter_model.bin").write_bytes(b"not to be unpickled")

    def no_torch_load(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    with pytest.raises(PeftFormatError, match=r"pickle.*safe_serialization=True"):
        import_peft(tmp_path / "adapter", config)


def test_import_rejects_other_peft_types(tmp_path):
    config = CONFIGS["gpt2"]()
    export_peft(torch.randn(kv_shape(config)), config, tmp_path / "adapter", "tiny-gpt2")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "peft_type": "LORA"}))
    with pytest.raises(PeftFormatError, match=r"peft_type is 'LORA', expected 'PREFIX_TUNING'"):
        import_peft(tmp_path / "adapter", config)


def test_export_rejects_query_head_count_for_gqa_model(tmp_path):
    config = CONFIGS["llama-gqa"]()
    wrong = torch.randn(2, 2, 4, P, 8)  # 4 query heads instead of 2 KV heads
    with pytest.raises(ValueError, match=r"num_key_value_heads \(dim 2\): model has 2, kv has 4"):
        export_peft(wrong, config, tmp_path / "adapter", "tiny-llama")
    assert not (tmp_path / "adapter").exists()


def test_export_refuses_non_empty_folder_unless_overwrite(tmp_path):
    config = CONFIGS["gpt2"]()
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    kv = torch.randn(kv_shape(config))
    with pytest.raises(FileExistsError, match=r"not empty.*overwrite=True"):
        export_peft(kv, config, out, "tiny-gpt2")
    assert (out / "notes.txt").read_text() == "keep me"

    export_peft(kv, config, out, "tiny-gpt2", overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors"
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no temp folders left behind
    assert torch.equal(import_peft(out, config), kv)


def test_the_default_model_exports_under_its_hub_id_and_says_where_weights_came_from(tmp_path):
    from prefixlab.engine.models import DEFAULT_MODEL, model_provenance, portable_model_id

    config = CONFIGS["llama-gqa"]()
    kv = torch.randn(kv_shape(config))
    export_peft(kv, config, tmp_path / "adapter", portable_model_id(DEFAULT_MODEL),
                notes=model_provenance(DEFAULT_MODEL))
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    readme = (tmp_path / "adapter" / "README.md").read_text()
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in readme and "Q4_1 GGUF" in readme
    assert portable_model_id("/some/folder") == "/some/folder"
    assert model_provenance("/some/folder") is None


def test_export_into_existing_empty_folder(tmp_path):
    config = CONFIGS["gpt2"]()
    (tmp_path / "adapter").mkdir()
    kv = torch.randn(kv_shape(config))
    export_peft(kv, config, tmp_path / "adapter", "tiny-gpt2")
    assert torch.equal(import_peft(Path(tmp_path / "adapter"), config), kv)
