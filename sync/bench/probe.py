"""What watching vLLM's post-load processing costs at engine start: the rlsync plugin snapshots every
module before and after ``process_weights_after_loading`` (``sync.ends.vllm_processing.snapshot``:
shapes, strides and a position-aware checksum of every tensor). This times one snapshot of a model of
``--gb`` GB of weights (transformer-shaped linears, bf16, on CUDA when there is one) side by side with
one plain read of the same weights (``tensor.sum()`` each) and one copy (``clone``), so the cost is a
ratio to passes over the weights measured in the same run. Medians of ``--repeats``, with the spread.

Usage: rlsync bench probe -- [--gb 8] [--hidden 4096] [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from sync.bench.timing import timed
from sync.ends.vllm_processing import snapshot


def model_of(gb: float, hidden: int, device: torch.device) -> torch.nn.Module:
    """Decoder-like layers (qkv, o, gate_up, down) until ``gb`` GB of bf16 weights."""
    shapes = [(3 * hidden, hidden), (hidden, hidden), (8 * hidden, hidden), (hidden, 4 * hidden)]
    per_layer = sum(a * b for a, b in shapes) * 2
    layers = max(1, int(gb * 2**30 // per_layer))
    model = torch.nn.Module()
    for i in range(layers):
        layer = torch.nn.Module()
        for j, shape in enumerate(shapes):
            proj = torch.nn.Module()
            proj.register_parameter("weight", torch.nn.Parameter(
                torch.randn(shape, device=device, dtype=torch.bfloat16), requires_grad=False))
            layer.add_module(f"proj{j}", proj)
        model.add_module(f"layer{i}", layer)
    return model


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="rlsync bench probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.0)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model_of(args.gb, args.hidden, device)
    params = [t for t in model.parameters()]
    nbytes = sum(t.numel() * t.element_size() for t in params)
    runs = {
        "read (sum of each tensor)": lambda: [t.sum() for t in params],
        "copy (clone of each tensor)": lambda: [t.clone() for t in params],
        "snapshot (rlsync probe)": lambda: snapshot(model),
    }
    timed(runs["snapshot (rlsync probe)"], 1, device)  # warm-up: kernels, allocator
    results = {name: timed(fn, args.repeats, device) for name, fn in runs.items()}
    read = statistics.median(results["read (sum of each tensor)"])
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "weights_gb": nbytes / 2**30, "tensors": len(params), "repeats": args.repeats, "runs": {}}
    print(f"{report['device']}: {nbytes / 2**30:.2f} GB in {len(params)} tensors, {args.repeats} repeats")
    for name, times in results.items():
        med = statistics.median(times)
        report["runs"][name] = {"median_s": med, "min_s": min(times), "max_s": max(times), "x_read": med / read,
                                "gb_per_s": nbytes / 2**30 / med}
        print(f"  {name:30s} median {med * 1e3:9.1f} ms  (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f})"
              f"  {nbytes / 2**30 / med:8.1f} GB/s  {med / read:6.2f}x a read")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
