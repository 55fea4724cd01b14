import pytest
import torch

from alignloop.errors import AlignloopError
from alignloop.models import KNOWN_MODELS, load_model, resolve_model


def test_tiny_is_deterministic_for_a_seed():
    a, _ = load_model("tiny", seed=3)
    b, _ = load_model("tiny-llama", seed=3)
    c, _ = load_model("tiny", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.mlp.up_proj.weight"], sc["model.layers.0.mlp.up_proj.weight"])


def test_tiny_presets_are_small_and_use_smollm2_tokenizer(tiny, tiny_qwen2):
    for model, tokenizer in (tiny, tiny_qwen2):
        params = sum(p.numel() for p in model.parameters())
        assert 1e6 < params < 10e6
        assert model.config.vocab_size == len(tokenizer) == 49152
        assert tokenizer.eos_token == "<|im_end|>"
    assert tiny[0].config.model_type == "llama"
    assert tiny_qwen2[0].config.model_type == "qwen2"


def test_smollm2_is_the_real_checkpoint(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert "<|im_start|>" in tokenizer.chat_template
    # A converted checkpoint is a plain folder that loads without the GGUF machinery.
    folder = resolve_model("smollm2-135m")
    assert (folder / "model.safetensors").exists() and (folder / "chat_template.jinja").exists()


def test_local_folder_round_trip(tmp_path, tiny):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model(str(tmp_path))
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_unknown_name_lists_what_exists():
    with pytest.raises(AlignloopError) as e:
        resolve_model("gpt-17")
    message = str(e.value)
    assert "unknown model 'gpt-17'" in message
    assert all(name in message for name in KNOWN_MODELS)
    assert "\n" not in message


def test_missing_folder_and_offline_hub_are_one_line_errors(tmp_path):
    with pytest.raises(AlignloopError, match="model folder not found"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(AlignloopError, match="no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(AlignloopError, match="cannot fetch 'no-such-org/no-such-model'") as e:
        resolve_model("no-such-org/no-such-model")
    assert "\n" not in str(e.value)
