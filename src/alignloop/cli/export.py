"""`alignloop export fp8 MODEL`, `alignloop export unfp8 FOLDER`: checkpoints in the fine-grained FP8 layout."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(help="Export checkpoints: FP8 (e4m3, 128x128 blocks) for transformers, vLLM and SGLang.",
                  no_args_is_help=True)


@app.command("fp8")
def fp8(model: str = typer.Argument(help="a zoo name or a checkpoint folder"),
        out: Path = typer.Option(..., "--out", help="the folder to write"),
        pow2: bool = typer.Option(False, "--pow2", help="power-of-two block scales (DeepSeek-V3.1's ue8m0)"),
        block: int = typer.Option(0, "--block", help="square block size; 0: 128, or the largest power of "
                                  "two dividing every weight dimension (transformers refuses partial blocks)")) -> None:
    """Write MODEL with every projection weight in e4m3 and its block scales (weight_scale_inv, 128x128),
    config.json's quantization_config as transformers' FineGrainedFP8Config reads it. Embeddings, head,
    norms and the MoE router stay bf16 (the router bias fp32). Prints the bytes against bf16."""
    from alignloop.fp8.checkpoint import export_fp8
    from alignloop.models import load_model
    from alignloop.ui import say

    net, tokenizer = load_model(model)
    say(export_fp8(net, tokenizer, out, pow2=pow2, block=block or None).line())


@app.command("unfp8")
def unfp8(folder: Path = typer.Argument(help="an FP8 checkpoint folder"),
          out: Path = typer.Option(..., "--out", help="the folder to write"),
          dtype: str = typer.Option("bfloat16", "--dtype", help="bfloat16 or float32")) -> None:
    """An FP8 checkpoint back to a plain one (weights dequantised), loadable by name anywhere."""
    import torch

    from alignloop.fp8.checkpoint import import_fp8
    from alignloop.ui import say

    if dtype not in ("bfloat16", "float32"):
        raise typer.BadParameter("use bfloat16 or float32", param_hint="--dtype")
    say(f"dequantised -> {import_fp8(folder, out, getattr(torch, dtype))}")
