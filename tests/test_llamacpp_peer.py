"""The llama.cpp bench peer (bench/llamacpp_peer.py, bench/llamacpp_worker.py): why it is unavailable,
the bf16 GGUF it writes from the shipped Q4_1 file (metadata kept, weights rounded as torch rounds
them), and, where `make peers` built llama-cpp-python, a real batched run."""

import numpy as np
import pytest
import torch

from alignloop.bench import llamacpp_peer, llamacpp_worker
from alignloop.errors import AlignloopError

gguf = pytest.importorskip("gguf")


def test_available_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNLOOP_PEERS_VENV", str(tmp_path / "absent"))
    assert "run `make peers`" in llamacpp_peer.available()
    with pytest.raises(AlignloopError, match=r"llama.cpp peer: no .*absent"):
        llamacpp_peer.LlamaCppPeer("bfloat16", threads=1, n_seq=2, n_ctx=64)
    (tmp_path / "absent" / "bin").mkdir(parents=True)
    (tmp_path / "absent" / "bin" / "python").write_text("")
    assert "has no llama_cpp" in llamacpp_peer.available()


def test_a_dtype_llamacpp_cannot_run_is_one_line():
    with pytest.raises(AlignloopError, match="dtype 'int3' is not one of"):
        llamacpp_peer.gguf_file("int3")


def test_the_conversion_keeps_metadata_and_rounds_matrices_like_torch(tmp_path):
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((64, 32)).astype(np.float32)
    norm = rng.standard_normal(32).astype(np.float32)
    src = tmp_path / "q.gguf"
    writer = gguf.GGUFWriter(str(src), "llama")
    writer.add_string("tokenizer.chat_template", "{{ messages }}")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "hi", "there"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.5, -2.0])
    writer.add_uint32("llama.block_count", 3)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    quantized = gguf.quants.quantize(matrix, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_up.weight", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_norm.weight", norm)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    out = tmp_path / "bf16.gguf"
    llamacpp_worker.convert_to(str(src), str(out), "bfloat16")
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    assert {k for k in a.fields if not k.startswith("GGUF.")} == {k for k in b.fields if not k.startswith("GGUF.")}
    assert b.fields["llama.block_count"].parts[-1].tolist() == [3]
    tokens = b.fields["tokenizer.ggml.tokens"]
    assert [bytes(tokens.parts[i]).decode() for i in tokens.data] == ["<s>", "hi", "there"]
    tensors = {t.name: t for t in b.tensors}
    up = tensors["blk.0.ffn_up.weight"]
    assert up.tensor_type == gguf.GGMLQuantizationType.BF16
    dequantized = torch.from_numpy(gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType.Q8_0).copy())
    expected = dequantized.reshape(64, 32).to(torch.bfloat16)
    got = torch.from_numpy(np.array(up.data).view(np.int16).copy()).view(torch.bfloat16).reshape(64, 32)
    assert torch.equal(got, expected)
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay fp32
    assert not (tmp_path / "bf16.gguf.tmp").exists()


@pytest.mark.skipif(llamacpp_peer.available() is not None, reason="no llama-cpp-python in the peers venv")
def test_a_real_batched_run_stops_at_eos_or_max_tokens():
    from alignloop.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    chats = [[{"role": "user", "content": text}] for text in ("Say hi.", "Name a colour.", "Count to three.")]
    ids = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
           for c in chats]
    with llamacpp_peer.LlamaCppPeer("bfloat16", threads=1, n_seq=3, n_ctx=3 * (max(len(p) for p in ids) + 8)) as peer:
        out = peer.run(ids, max_tokens=8, seeds=[1, 2, 3], temperature=1.0, top_p=0.95)
        assert 3 <= out["useful"] == out["computed"] <= 24 and out["seconds"] > 0
        fixed = peer.run(ids, max_tokens=8, seeds=[1, 2, 3], temperature=1.0, top_p=0.95, ignore_eos=True)
        assert fixed["useful"] == 24 and fixed["eos_rate"] == 0
        assert "BF16" in peer.facts()["system_info"] or peer.facts()["system_info"]
