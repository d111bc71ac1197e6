"""Triton decode attention alone: launch configurations and split counts against the card's copy bandwidth.

    python benchmark/bench_decode_attention.py --out decode_attn.json

Llama-3.1-8B's attention shape (32 q heads, 8 KV heads, head dim 128, bf16 KV), each request's KV in
contiguous slots of one pool, `--ctx` tokens per request. For every batch size, BLOCK_N x num_warps x
num_stages x split factor (programs per SM that choose_num_kv_splits aims for; 4 is what it uses): the median
of CUDA-event-timed CUDA-graph replays of one call (both stages), the KV bytes read per second, and the largest deviation from the
default configuration's output (every configuration must compute the same attention). Not a test.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from typing import Any, Dict, List

import torch

from sglx.bench_one_batch import copy_bandwidth
from sglx.srt.layers.attention.triton_ops import decode_attention as da


def time_call(fn, iters: int) -> float:
    """Median seconds per call, `fn` captured in a CUDA graph and timed as replays, as decode runs in the
    engine: Triton's host-side launch cost (tens of µs) would otherwise hide small kernels."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        g.replay()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events) / 1e3


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    dev = torch.device("cuda")
    num_sms = torch.cuda.get_device_properties(dev).multi_processor_count
    heads, kv_heads, d = 32, 8, 128
    bw = copy_bandwidth(dev, 1 << 30)
    records = []
    for bs in args.batch_sizes:
        n = bs * args.ctx
        k = torch.randn(n + 1, kv_heads, d, device=dev, dtype=torch.bfloat16)
        v = torch.randn(n + 1, kv_heads, d, device=dev, dtype=torch.bfloat16)
        q = torch.randn(bs, heads, d, device=dev, dtype=torch.bfloat16)
        indptr = torch.arange(0, n + 1, args.ctx, dtype=torch.int32, device=dev)
        indices = torch.arange(1, n + 1, dtype=torch.int32, device=dev)
        kv_bytes = 2 * n * kv_heads * d * 2
        ref = None
        for block_n, warps, stages, factor in itertools.product(args.block_n, args.warps, args.stages, args.factors):
            splits = da.choose_num_kv_splits(bs, kv_heads, args.ctx, num_sms, programs_per_sm=factor)
            part_o, part_lse = da.decode_scratch(bs, heads, splits, d, dev)
            o = torch.empty_like(q)
            cfg = da.DecodeLaunchConfig(block_n, warps, stages)
            fn = lambda: da.decode_attention_fwd(q, k, v, o, indptr, indices, part_o, part_lse, d ** -0.5,  # noqa: E731
                                                 config=cfg)
            try:
                t = time_call(fn, args.iters)
            except Exception as e:  # an impossible configuration (shared memory): recorded, not fatal
                records.append({"bs": bs, "block_n": block_n, "warps": warps, "stages": stages, "factor": factor,
                                "error": f"{type(e).__name__}: {str(e)[:120]}"})
                continue
            if ref is None:
                ref = o.float().clone()
            rec = {"bs": bs, "ctx": args.ctx, "block_n": block_n, "warps": warps, "stages": stages, "factor": factor,
                   "splits": splits, "us": t * 1e6, "kv_gbps": kv_bytes / t / 1e9, "share_of_copy_bw": kv_bytes / t / bw,
                   "max_dev": float((o.float() - ref).abs().max())}
            records.append(rec)
            print(f"bs={bs:4} BLOCK_N={block_n:3} warps={warps} stages={stages} factor={factor} splits={splits:2}: "
                  f"{rec['us']:8.1f} us  {rec['share_of_copy_bw']:.1%} of copy bw  max dev {rec['max_dev']:.2e}",
                  flush=True)
        k = v = None  # noqa: F841
        torch.cuda.empty_cache()
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s ({torch.cuda.get_device_name(dev)})")
    for bs in args.batch_sizes:
        ok = [r for r in records if r["bs"] == bs and "error" not in r]
        best = min(ok, key=lambda r: r["us"])
        cfg = da.default_decode_config(d, interpret=False)
        default = next((r for r in ok if (r["block_n"], r["warps"], r["stages"], r["factor"])
                        == (cfg.block_n, cfg.num_warps, cfg.num_stages, 4)), best)
        print(f"bs={bs}: default {default['us']:.1f} us ({default['share_of_copy_bw']:.1%}), best {best['us']:.1f} us "
              f"({best['share_of_copy_bw']:.1%}) with BLOCK_N={best['block_n']} warps={best['warps']} "
              f"stages={best['stages']} factor={best['factor']}")
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--ctx", type=int, default=640)
    p.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--stages", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--factors", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    records = run(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
