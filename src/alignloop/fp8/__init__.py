"""FP8 (e4m3, DeepSeek-V3's block-wise layout): quantisation, the blockwise GEMM, checkpoints in the
fine-grained FP8 layout transformers and vLLM load, and weight-only FP8 serving."""
