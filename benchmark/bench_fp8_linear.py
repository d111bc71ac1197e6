"""FP8 W8A8 linear layers alone against bf16, on a model's own linear shapes (not a test).

    python benchmark/bench_fp8_linear.py --tokens 4096 16384 --out fp8_linear.jsonl

For each linear of one decoder layer of --model-path's config (q/k/v, o, gate/up, down): the median GPU time
(CUDA events around CUDA-graph replays, so host launch cost does not hide small kernels) of the bf16 GEMM, the
per-token FP8 quantization of the input, and per FP8 GEMM that runs here (`torch._scaled_mm` with row-wise
scales; sgl_kernel's CUTLASS `fp8_scaled_mm` where it imports) the GEMM and the whole Fp8Linear; TFLOP/s; the
host time per call on a 16-token input (back to back: the launch cost); and the relative error of the FP8
output against bf16's (random normal inputs and weights), so a faster but wrong configuration shows. Then the
layers that feed them (RMSNorm with the residual add, SiLU-and-mul): alone, followed by the standalone
quantization, and with the quantization fused in.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List

import torch
import torch.nn.functional as F

from sglx.srt.configs.model_config import ModelConfig
from sglx.srt.layers.quantization.fp8 import Fp8Linear

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _gpu_modules():
    """Imported only to run: importing a Triton kernel module fixes for the process whether it is interpreted,
    and the CPU tests that import this script must not decide that."""
    from bench_decode_attention import time_call  # CUDA-graph replays timed with CUDA events

    from sglx.srt.layers.quantization import fp8_kernels

    return time_call, fp8_kernels


def layer_shapes(cfg: ModelConfig) -> Dict[str, tuple]:
    """name -> (in_features, out_features) of one decoder layer's fused linears."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    inter = cfg.hf_text_config.intermediate_size
    return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * inter), "down_proj": (inter, h)}


def available_gemms(dev: torch.device) -> List[str]:
    from sglx.srt.layers.quantization import fp8

    return [g for g in ("torch", "sgl_kernel") if g == "torch" or fp8._sgl_kernel_fp8_gemm_available(dev)]


def fp8_linear_with(lin: torch.nn.Linear, gemm: str) -> Fp8Linear:
    from sglx.srt.layers.quantization.fp8 import FP8_GEMM_ENV

    saved = os.environ.get(FP8_GEMM_ENV)
    os.environ[FP8_GEMM_ENV] = gemm
    try:
        return Fp8Linear.from_linear(lin)
    finally:
        os.environ.pop(FP8_GEMM_ENV) if saved is None else os.environ.__setitem__(FP8_GEMM_ENV, saved)


def host_us(fn, calls: int = 200) -> float:
    """Microseconds of host time per call, back to back on a tiny input (the GPU's part is a few µs, so the
    launches set the pace)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def run(args: argparse.Namespace) -> List[Dict[str, Any]]:
    gpu_time, fp8_kernels = _gpu_modules()
    dev = torch.device("cuda")
    cfg = ModelConfig.from_path(args.model_path)
    gemms = available_gemms(dev)
    records = []
    for m in args.tokens:
        for name, (k, n) in layer_shapes(cfg).items():
            torch.manual_seed(0)
            lin = torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16)
            torch.nn.init.normal_(lin.weight, std=k ** -0.5)
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            tiny = x[:16]
            qx, sx = fp8_kernels.per_token_quant_fp8(x)
            ref = F.linear(x, lin.weight).float()
            rec = {"tokens": m, "linear": name, "in": k, "out": n,
                   "bf16_us": gpu_time(lambda: F.linear(x, lin.weight), args.iters) * 1e6,
                   "bf16_host_us": host_us(lambda: F.linear(tiny, lin.weight)),
                   "quant_us": gpu_time(lambda: fp8_kernels.per_token_quant_fp8(x), args.iters) * 1e6}
            rec["bf16_tflops"] = 2 * m * k * n / rec["bf16_us"] / 1e6
            line = (f"M={m:>6} {name:>13} {k:>5}x{n:<5} bf16 {rec['bf16_us']:7.1f} us ({rec['bf16_tflops']:4.0f} TF/s, "
                    f"host {rec['bf16_host_us']:4.1f}) | quant {rec['quant_us']:5.1f}")
            for gemm in gemms:
                fp8 = fp8_linear_with(lin, gemm)
                g_us = gpu_time(lambda: fp8._gemm(fp8, qx, sx, torch.bfloat16), args.iters) * 1e6
                rec.update({f"{gemm}_gemm_us": g_us, f"{gemm}_gemm_tflops": 2 * m * k * n / g_us / 1e6,
                            f"{gemm}_linear_us": gpu_time(lambda: fp8(x), args.iters) * 1e6,
                            f"{gemm}_host_us": host_us(lambda: fp8(tiny)),
                            f"{gemm}_rel_err": ((fp8(x).float() - ref).norm() / ref.norm()).item()})
                line += (f" | {gemm}: gemm {g_us:6.1f} us ({rec[f'{gemm}_gemm_tflops']:4.0f} TF/s), linear "
                         f"{rec[f'{gemm}_linear_us']:6.1f} us, host {rec[f'{gemm}_host_us']:4.1f}, "
                         f"err {rec[f'{gemm}_rel_err']:.4f}")
            records.append(rec)
            print(line, flush=True)
        records += producers(m, cfg, dev, args.iters)
    return records


def producers(m: int, cfg: ModelConfig, dev: torch.device, iters: int) -> List[Dict[str, Any]]:
    """The layers that feed the linears, alone and with the input quantization fused in (what a decoder layer
    runs under --quantization fp8), and alone followed by the standalone quantization kernel."""
    from sglx.srt.layers.triton_ops import fused_elementwise as fe

    gpu_time, fp8_kernels = _gpu_modules()
    h, inter = cfg.hidden_size, cfg.hf_text_config.intermediate_size
    x, r = (torch.randn(m, h, device=dev, dtype=torch.bfloat16) for _ in range(2))
    w = torch.ones(h, device=dev, dtype=torch.bfloat16)
    g = torch.randn(m, 2 * inter, device=dev, dtype=torch.bfloat16)
    cases = {
        "rmsnorm+residual": (lambda: fe.rmsnorm(x, w, 1e-6, r), lambda: fe.rmsnorm(x, w, 1e-6, r, quant_fp8=True),
                             h),
        "silu_and_mul": (lambda: fe.silu_and_mul(g), lambda: fe.silu_and_mul(g, quant_fp8=True), inter),
    }
    out = []
    for name, (plain, fused, k) in cases.items():
        y = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        rec = {"tokens": m, "producer": name, "plain_us": gpu_time(plain, iters) * 1e6,
               "plain_then_quant_us": (gpu_time(plain, iters) + gpu_time(
                   lambda: fp8_kernels.per_token_quant_fp8(y), iters)) * 1e6,
               "fused_us": gpu_time(fused, iters) * 1e6}
        out.append(rec)
        print(f"M={m:>6} {name:>16}: alone {rec['plain_us']:7.1f} us, + quant kernel {rec['plain_then_quant_us']:7.1f}"
              f" us, fused {rec['fused_us']:7.1f} us", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=os.path.join(HERE, "configs", "qwen3-0.6b"))
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", default=None, help="append one JSON line per (tokens, linear)")
    args = p.parse_args()
    records = run(args)
    if args.out:
        with open(args.out, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
