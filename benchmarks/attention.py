"""What proportional attention costs in one attention call (forward and backward), per kernel.

Three ways to run a causal SDPA call over a cut sequence: plain (no proportional attention, the
floor), the log(size) key bias as a materialised [B, 1, L, L] float mask (what eager attention
gets), and the key bias in one more head dimension (`sts.attention`: no mask, so SDPA may take
its flash kernel). Every tenth key stands for four pooled tokens.

    python benchmarks/attention.py [--batch 16] [--heads 32] [--length 1024] [--head-dim 128]

Prints the times and writes benchmarks/results/attention-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import torch
from torch.nn.functional import scaled_dot_product_attention

from sts.attention import key_bias, with_key_bias
from sts.cut import proportional_mask


def sdpa(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers' calling convention around torch's SDPA; output [B, L, H, D]."""
    causal = attention_mask is None
    out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, is_causal=causal, scale=scaling)
    return out.transpose(1, 2), None


def timed(run, repeats: int, device) -> float:
    """Median seconds of forward + backward of `run` (an attention call: output, weights)."""
    times = []
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        run()[0].sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = (args.batch, args.heads, args.length, args.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    sizes = torch.ones(args.batch, args.length, device=device)
    sizes[:, ::10] = 4
    padding = torch.ones(args.batch, args.length, device=device)
    mask = proportional_mask(padding, sizes, dtype)
    bias = key_bias(sizes)
    scaling = args.head_dim**-0.5
    biased = with_key_bias(sdpa)
    runs = {
        "plain causal (no proportional attention)": lambda: sdpa(None, q, k, v, None, scaling),
        "key bias as a 4D float mask": lambda: sdpa(None, q, k, v, mask, scaling),
        "key bias in one more head dimension": lambda: biased(None, q, k, v, None, scaling=scaling, sts_key_bias=bias),
    }
    seconds = {name: timed(run, args.repeats, device) for name, run in runs.items()}
    plain = seconds["plain causal (no proportional attention)"]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"attention forward+backward, {shape} [B, H, L, D], {str(dtype)[6:]}, {device_name}")
    for name, value in seconds.items():
        print(f"  {name:<45}{value * 1000:9.2f} ms  {value / plain:5.2f}x plain")
    record = {
        "device": device_name,
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/attention.py "
        + " ".join(f"--{name.replace('_', '-')} {value}" for name, value in vars(args).items()),
        "shape_bhld": list(shape),
        "dtype": str(dtype)[6:],
        "median_seconds": seconds,
    }
    path = Path(args.out) / f"attention-{device_name.replace(' ', '_').replace(',', '')}-{record['date']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"recorded {path}")


if __name__ == "__main__":
    main()
