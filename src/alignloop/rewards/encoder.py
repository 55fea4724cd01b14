"""`PackedEncoder`: inference of a BERT-style sentence encoder (all-MiniLM-L6-v2) without padding.

The contract: `encode(ids)` takes a batch of token-id lists (each starting with [CLS] and ending
with [SEP], as the tokenizer gives them, no padding) and returns their mean-pooled, L2-normalised
embeddings as float32 [batch, width] - what `BertModel` + mean pooling over the attention mask +
normalisation gives, to within float rounding (fp32: ~2e-7 per element, measured).

Why not call `BertModel` itself: on a CPU, where the matmuls are the time, a padded batch spends
them on padding too (12% of the rows of 64-text batches sorted by length, 35-40% unsorted, on the
reward bench's texts). Here every op runs on the batch's real tokens only, packed into one
[tokens, width] matrix, texts ordered by token count. Attention has to see each text on its own:
texts of the same length sit next to each other, so each run of equal lengths is one dense
[texts, heads, length, length] attention (torch's fused CPU kernel, no mask, its inputs views of the
packed matrix). On a CPU with AMX, where bf16 matmuls are cheap and attention is a third of the
time, that measured 0.325 s against 0.383 s for one padded, masked [texts, longest] block per batch
(the reward bench's 512 texts, 6-19 distinct lengths per 64-text batch; the padded block also
needed a scatter into it and a gather out of it every layer). Where the native kernels build
(`alignloop.kernels`: an AVX-512 CPU with a C++ compiler), one call of `packed_attention` does every
text of the batch instead: 2.4 against 3.5 ms a layer for 64 texts of 8-64 tokens in bf16, and the
reward bench's encoding 0.370 against 0.396 s (fp32: level, its matmuls are the time). With AMX,
bf16 attention runs on its tiles: 1.0 against 2.1 ms a layer, and a whole reward-bench round
0.34 against 0.39 s under TCMalloc (0.40 against 0.44 s under glibc malloc). Without AMX but with
AVX512-BF16 (AMD EPYC, Zen 4) it runs on that extension's bf16 dot products: 1.29 against 1.88 ms
a call, a reward-bench round 0.98 against 1.05 s (medians of 10 alternating). bf16 layer norms
run on `layer_norm` too (0.13 against 0.24 ms a call). Besides that, per layer:
- query, key and value come from one matmul of the fused [3 x width, width] weight;
- where oneDNN is available, bias, GELU and the residual add ride on the matmul itself
  (`torch.ops.mkldnn._linear_pointwise`, the kernel torch.compile picks on CPU, with the weights
  reordered once into its blocked layout) instead of one more pass over memory each: 1.25x faster
  in fp32, 1.06x in bf16, measured; elsewhere the same maths runs as separate ops.

`dtype` is the weights' and activations' dtype (float32 or bfloat16, as in `BertModel` loaded in
that dtype); the pooled sums and the returned embeddings are float32 either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from alignloop.kernels import native


def _fused_linear_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedEncoder:
    """A `BertModel`'s weights, copied, and the forward pass over packed batches (see the module)."""

    def __init__(self, bert: torch.nn.Module, dtype: torch.dtype = torch.float32, fused: bool | None = None):
        """Copy `bert`'s weights (a transformers `BertModel`, any dtype) into `dtype`; `fused`: use
        oneDNN's matmul with bias/GELU/residual post-ops (default: wherever it is available)."""
        config = bert.config
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise ValueError("PackedEncoder supports absolute position embeddings only")
        weights = {k: v.detach().to(dtype).contiguous() for k, v in bert.state_dict().items()}
        self.dtype = dtype
        self.width = config.hidden_size
        self.heads = config.num_attention_heads
        self.head_width = self.width // self.heads
        self.eps = config.layer_norm_eps
        self.fused = _fused_linear_available() if fused is None else fused
        self.use_native = True  # the hand-written attention and layer norm where they build (see the module)
        self.word = weights["embeddings.word_embeddings.weight"]
        # Every text is one segment (token type 0): its embedding folds into the position table.
        self.position = (weights["embeddings.position_embeddings.weight"]
                         + weights["embeddings.token_type_embeddings.weight"][0])
        self.embedding_norm = (weights["embeddings.LayerNorm.weight"], weights["embeddings.LayerNorm.bias"])
        self.layers = [self._layer(weights, f"encoder.layer.{i}.") for i in range(config.num_hidden_layers)]
        if self.fused:  # once into oneDNN's blocked layout, not at every call: 2-5% faster, measured
            for layer in self.layers:
                for name in ("qkv_weight", "out_weight", "up_weight", "down_weight"):
                    layer[name] = torch.ops.mkldnn._reorder_linear_weight(layer[name], None)

    @staticmethod
    def _layer(w: dict[str, torch.Tensor], p: str) -> dict[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        qkv = ("query", "key", "value")
        return {"qkv_weight": torch.cat([w[f"{p}attention.self.{n}.weight"] for n in qkv]),
                "qkv_bias": torch.cat([w[f"{p}attention.self.{n}.bias"] for n in qkv]),
                "out_weight": w[f"{p}attention.output.dense.weight"], "out_bias": w[f"{p}attention.output.dense.bias"],
                "norm1": (w[f"{p}attention.output.LayerNorm.weight"], w[f"{p}attention.output.LayerNorm.bias"]),
                "up_weight": w[f"{p}intermediate.dense.weight"], "up_bias": w[f"{p}intermediate.dense.bias"],
                "down_weight": w[f"{p}output.dense.weight"], "down_bias": w[f"{p}output.dense.bias"],
                "norm2": (w[f"{p}output.LayerNorm.weight"], w[f"{p}output.LayerNorm.bias"])}

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *, gelu: bool = False,
                residual: torch.Tensor | None = None) -> torch.Tensor:
        """x @ weight.T + bias, then GELU (exact, erf) or + residual."""
        if self.fused:
            if residual is not None:
                return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [],
                                                     "none" if gelu else "")
        y = F.linear(x, weight, bias)
        if gelu:
            return F.gelu(y)
        return y if residual is None else y.add_(residual)

    def _norm(self, x: torch.Tensor, weight_bias: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return F.layer_norm(x, (self.width,), *weight_bias, self.eps)

    def _norm_fn(self):
        """The layer norm `encode` runs: bf16 on the native kernel where it builds (0.13 against
        0.24 ms a call at a batch's ~2,300 tokens, 2 threads); fp32 on torch's, whose results
        match BertModel's bit for bit."""
        kernel = native.layer_norm() if self.use_native and self.dtype == torch.bfloat16 else None
        if kernel is None or self.word.device.type != "cpu":
            return self._norm
        return lambda x, weight_bias: kernel(x, *weight_bias, self.eps)

    @torch.inference_mode()
    def encode(self, ids: list[list[int]]) -> torch.Tensor:
        """Mean-pooled, L2-normalised float32 embeddings [len(ids), width] of the token-id lists."""
        if len(ids) == 0:
            return torch.zeros(0, self.width)
        if min(len(t) for t in ids) == 0:
            raise ValueError("every text needs at least one token")
        longest = max(len(t) for t in ids)
        if longest > len(self.position):
            raise ValueError(f"a text of {longest} tokens is longer than the model's {len(self.position)} positions")
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        lengths = torch.tensor([len(ids[i]) for i in order])
        # Runs of equal length: (first token row, texts, length); each a contiguous block of rows.
        runs, row = [], 0
        for length, count in zip(*torch.unique_consecutive(lengths, return_counts=True)):
            length, count = int(length), int(count)
            runs.append((row, count, length))
            row += count * length
        position = torch.cat([torch.arange(length).repeat(count) for _, count, length in runs])
        tokens = torch.tensor([t for i in order for t in ids[i]])
        norm = self._norm_fn()
        x = norm(self.word[tokens] + self.position[position], self.embedding_norm)
        kernel = (native.packed_attention() if self.use_native and x.device.type == "cpu" and self.head_width % 16 == 0
                  else None)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        for layer in self.layers:
            qkv = self._linear(x, layer["qkv_weight"], layer["qkv_bias"])
            if kernel is not None:  # every text in one call (see the module)
                mixed = kernel(qkv.contiguous(), offsets, self.heads, self.head_width**-0.5)
            else:
                mixed = torch.cat([self._attention(qkv[row:row + count * length], count, length)
                                   for row, count, length in runs])
            x = norm(self._linear(mixed, layer["out_weight"], layer["out_bias"], residual=x), layer["norm1"])
            up = self._linear(x, layer["up_weight"], layer["up_bias"], gelu=True)
            x = norm(self._linear(up, layer["down_weight"], layer["down_bias"], residual=x), layer["norm2"])

        text = torch.repeat_interleave(torch.arange(len(ids)), lengths)
        sums = torch.zeros(len(ids), self.width).index_add_(0, text, x.float())
        pooled = F.normalize(sums / lengths[:, None], dim=-1)
        return torch.empty_like(pooled).index_copy_(0, torch.tensor(order), pooled)

    def _attention(self, qkv: torch.Tensor, count: int, length: int) -> torch.Tensor:
        """Self-attention of `count` texts of `length` tokens each, their fused q|k|v rows packed
        one text after another: [count * length, 3 * width] -> [count * length, width]."""
        q, k, v = qkv.view(count, length, 3, self.heads, self.head_width).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(count * length, self.width)
