"""The FP8 block quantizer (``sync.fp8.QuantizeProgram``) on its own: ``--gb`` GB of bfloat16 expert and
attention weights at DeepSeek-V3's shapes (2048 x 7168 and 7168 x 2048 matrices, some stacked, one
edge-cut 576 x 7168 down projection per layer), all quantized by one launch per source dtype. Each
kernel variant (``rows`` of a block held per pass, warps per block) is timed side by side with a flat copy
of the same source bytes and with torch's per-tensor quantizer (``quantize_blocks``), in the same run,
and checked bit for bit against that quantizer. Medians of ``--repeats``, with the spread.

Usage: rlsync bench quantize -- [--gb 4] [--repeats 7] [--variants 32x8 16x4 128x8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from planners.quant import scale_shape
from sync.bench.timing import timed
from sync.fp8 import QuantizeProgram, quantize_blocks

SHAPES = [(2048, 7168), (7168, 2048), (4, 2048, 7168), (576, 7168)]


def weights(gb: float, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One bfloat16 pool, and views into it back to back, cycling through SHAPES until ``gb`` GB."""
    sizes, total = [], 0
    while total < gb * 1e9 or not sizes:
        shape = SHAPES[len(sizes) % len(SHAPES)]
        sizes.append(shape)
        total += int(np.prod(shape)) * 2
    pool = torch.randn(total // 2, device=device, dtype=torch.bfloat16)
    out, at = [], 0
    for shape in sizes:
        n = int(np.prod(shape))
        out.append(pool[at: at + n].view(shape))
        at += n
    return pool, out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="rlsync bench quantize", description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=4.0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--variants", nargs="+", default=["32x8", "16x4", "16x2", "8x2", "8x4", "32x4", "16x8"],
                   help="ROWSxWARPS of the Triton kernel (CUDA only)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pool, sources = weights(args.gb, device)
    jobs = [(x.view(-1), torch.empty(x.numel(), dtype=torch.float8_e4m3fn, device=device),
             torch.empty(int(np.prod(scale_shape(x.shape))), device=device)) for x in sources]
    shapes = [tuple(x.shape) for x in sources]
    nbytes = sum(x.numel() * 2 for x in sources)
    want = [(torch.empty_like(v), torch.empty_like(s)) for _, v, s in jobs]

    def reference():
        for (src, _, _), (v, s), shape in zip(jobs, want, shapes):
            quantize_blocks(src.view(shape), v.view(shape), s.view(scale_shape(shape)))

    flat = torch.empty_like(pool)
    rows = [dict(variant="flat copy", seconds=timed(lambda: flat.copy_(pool), args.repeats, device))]
    rows.append(dict(variant="torch per tensor", seconds=timed(reference, max(2, args.repeats // 3), device)))
    variants = [(f"triton {v}", *map(int, v.split("x"))) for v in args.variants] if device.type == "cuda" else [("numba", 0, 0)]
    for name, rows_per_pass, warps in variants:
        program = QuantizeProgram(jobs, shapes)
        if device.type == "cuda":
            program.triton_tuning = dict(rows=rows_per_pass, num_warps=warps)
        seconds = timed(program, args.repeats, device)
        exact = all(torch.equal(v.view(torch.uint8), wv.view(torch.uint8)) and torch.equal(s, ws)
                    for (_, v, s), (wv, ws) in zip(jobs, want))
        rows.append(dict(variant=name if program.kernels != "torch" else "torch (no kernel here)", seconds=seconds, exact=exact))
    flat_s = statistics.median(rows[0]["seconds"])
    table = Table(title=f"block-FP8 quantizer, {nbytes / 1e9:.2f} GB bfloat16, {len(sources)} tensors, {device}")
    for col in ("variant", "median ms", "spread ms", "GB/s read", "x flat copy", "exact"):
        table.add_column(col)
    for r in rows:
        med = statistics.median(r["seconds"])
        r.update(median_s=med, gbps=nbytes / med / 1e9, over_flat=med / flat_s)
        table.add_row(r["variant"], f"{med * 1e3:.2f}", f"{min(r['seconds']) * 1e3:.2f}-{max(r['seconds']) * 1e3:.2f}",
                      f"{r['gbps']:.0f}", f"{r['over_flat']:.2f}", str(r.get("exact", "")))
    Console().print(table)
    out = dict(device=str(torch.cuda.get_device_name() if device.type == "cuda" else "cpu"), gb=nbytes / 1e9, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out

