"""llama.cpp as a bench peer: run by the peers environment's python (`make peers`), never imported by alignloop.

It loads a GGUF once through llama-cpp-python's C API and answers one JSON object per line, the
protocol of `vllm_worker.py`:

    argv[1]  {"model": gguf, "threads": 2, "n_seq": 64, "n_ctx": 16384, "n_batch": 4096}
    out      {"ready": true, "facts": {...}}
    in       {"cmd": "run", "prompt_ids": [[...], ...], "max_tokens": 128, "seeds": [...],
              "temperature": 1.0, "top_p": 0.95, "ignore_eos": false}
    out      {"useful": n, "computed": n, "seconds": s, "eos_rate": r}
    in       {"cmd": "quit"}

Batched the way llama.cpp's own `examples/batched` and its server's parallel slots run: every
sequence has its own `seq_id` and its own part of the KV cache (`kv_unified` off: n_ctx split
evenly; measured on this workload, 64 sequences x 128 new tokens, bf16, 2 threads: 271 tok/s split
vs 61 unified with EOS ignored, 159 vs 150 with EOS, since a unified cache makes every token attend
over all 64 sequences' cache under a mask), all prompts go through one `llama_decode`
(split into micro-batches of `n_ubatch` by llama.cpp), then one decode per step carries one token
of every live sequence; a sequence leaves the batch at its first end-of-generation token. Each
sequence samples with its own chain (top-p, temperature, seeded distribution), as llama.cpp's
samplers are per sequence. The high-level `Llama` class decodes one sequence at a time, which
would understate llama.cpp by the batch size.

`seconds` is measured around the decode loop alone (prompt ids arrive tokenized).
"""

from __future__ import annotations

import json
import os
import sys
import time


def convert_to(src: str, out: str, dtype: str) -> None:
    """Rewrite a (quantized) GGUF with its matrices in `dtype` and every other tensor as it is.

    alignloop's SmolLM2 checkpoint is the Q4_1 file de-quantized to fp32; de-quantizing the same
    file here and storing bf16 gives llama.cpp the weights our engine runs in bf16. Metadata
    (architecture, tokenizer, chat template) is copied unchanged.
    """
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
    from gguf.quants import dequantize

    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"]
    writer = GGUFWriter(out + ".tmp", str(bytes(arch.parts[arch.data[0]]), "utf-8"))
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        if kind == GGUFValueType.ARRAY:
            sub = field.types[1]
            values = [field.parts[i] for i in field.data]
            values = [str(bytes(v), "utf-8") for v in values] if sub == GGUFValueType.STRING else \
                [v.tolist()[0] for v in values]
            writer.add_array(name, values)
        elif kind == GGUFValueType.STRING:
            writer.add_string(name, str(bytes(field.parts[field.data[0]]), "utf-8"))
        else:
            writer.add_key_value(name, field.parts[field.data[0]].tolist()[0], kind)
    target = {"bfloat16": GGMLQuantizationType.BF16, "float32": GGMLQuantizationType.F32}[dtype]
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape))
        values = values.reshape(shape)
        if values.ndim == 2 and target == GGMLQuantizationType.BF16:
            # Round to nearest even, as torch's bf16 cast does.
            bits = values.view(np.uint32)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            writer.add_tensor(t.name, bits, raw_shape=shape, raw_dtype=GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(t.name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(out + ".tmp", out)


class Generator:
    def __init__(self, config: dict):
        import llama_cpp as lc

        self.lc, self.config = lc, config
        lc.llama_backend_init()
        mparams = lc.llama_model_default_params()
        self.model = lc.llama_model_load_from_file(config["model"].encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {config['model']}")
        self.vocab = lc.llama_model_get_vocab(self.model)
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = config["n_ctx"]
        cparams.n_batch = config["n_batch"]
        cparams.n_seq_max = config["n_seq"]
        cparams.n_threads = cparams.n_threads_batch = config["threads"]
        cparams.kv_unified = config.get("kv_unified", False)
        cparams.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.batch = lc.llama_batch_init(config["n_batch"], 0, 1)

    def _add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        b, i = self.batch, self.batch.n_tokens
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq
        b.n_tokens = i + 1
        return i

    def _decode(self) -> None:
        if (rc := self.lc.llama_decode(self.ctx, self.batch)) != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def run(self, cmd: dict) -> dict:
        lc = self.lc
        prompts, max_tokens, ignore_eos = cmd["prompt_ids"], cmd["max_tokens"], cmd.get("ignore_eos", False)
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        samplers = []
        for seed in cmd["seeds"]:
            chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_top_p(cmd["top_p"], 1))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_temp(cmd["temperature"]))
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_dist(seed))
            samplers.append(chain)
        began = time.perf_counter()
        # Prefill: every prompt in one call, logits only at each prompt's last token.
        self.batch.n_tokens = 0
        row = {}
        for s, ids in enumerate(prompts):
            for p, t in enumerate(ids):
                i = self._add(t, p, s, p == len(ids) - 1)
            row[s] = i
        self._decode()
        pos = {s: len(ids) for s, ids in enumerate(prompts)}
        counts = [0] * len(prompts)
        stopped = 0
        while row:
            nxt = {}
            self.batch.n_tokens = 0
            for s, i in row.items():
                token = lc.llama_sampler_sample(samplers[s], self.ctx, i)
                counts[s] += 1
                if (not ignore_eos and lc.llama_vocab_is_eog(self.vocab, token)):
                    stopped += 1
                    continue
                if counts[s] >= max_tokens:
                    continue
                nxt[s] = self._add(token, pos[s], s, True)
                pos[s] += 1
            row = nxt
            if row:
                self._decode()
        seconds = time.perf_counter() - began
        for chain in samplers:
            lc.llama_sampler_free(chain)
        total = sum(counts)
        return {"useful": total, "computed": total, "seconds": seconds, "eos_rate": stopped / max(len(prompts), 1)}

    def facts(self) -> dict:
        lc = self.lc
        system = lc.llama_print_system_info().decode(errors="replace").strip()
        return {"llama_cpp_python": lc.__version__, "system_info": system,
                "settings": {k: self.config[k] for k in ("threads", "n_seq", "n_ctx", "n_batch")},
                "kv_unified": self.config.get("kv_unified", False), "flash_attn": "auto (llama.cpp's default)"}


def main() -> None:
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # llama.cpp logs to stdout/stderr: keep the protocol's stdout clean
    config = json.loads(sys.argv[1])
    try:
        if config.get("convert_from") and not os.path.exists(config["model"]):
            convert_to(config["convert_from"], config["model"], config.get("dtype", "bfloat16"))
        gen = Generator(config)
        proto.write(json.dumps({"ready": True, "facts": gen.facts()}) + "\n")
    except Exception as exc:  # noqa: BLE001 - the other side reports it
        proto.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("cmd") == "quit":
            break
        try:
            reply = gen.run(cmd) if cmd.get("cmd") == "run" else {"error": f"unknown command {cmd.get('cmd')!r}"}
        except Exception as exc:  # noqa: BLE001
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        proto.write(json.dumps(reply) + "\n")


if __name__ == "__main__":
    main()
