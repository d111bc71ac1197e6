"""Build flashinfer's JIT kernels that sglx's tests and benchmarks use, in parallel processes, before they run.

Each kernel family builds once per machine (10-70 s each on 16 cores, mostly single-file nvcc work), so
building them side by side saves minutes of a short GPU lease. Not a test: `python test/gpu/warm_flashinfer.py`.
"""

from __future__ import annotations

import subprocess
import sys
import time

JOBS = [(kernel, op, hd) for kernel in ("fa2", "fa3") for op in ("prefill", "decode") for hd in (64, 128)
        if not (kernel == "fa3" and op == "decode")]  # decode kernels are FA2-family for both backends
JOBS.append(("sampling", "all", 0))  # one JIT module holds every sampling kernel (--sampling-backend flashinfer)

CHILD = """
import sys, torch
from sglx.srt.layers.attention import flash_attn as fa
kernel, op, hd = sys.argv[1], sys.argv[2], int(sys.argv[3])
dev = torch.device("cuda")
if kernel == "sampling":
    import flashinfer.sampling
    flashinfer.sampling.sampling_from_probs(torch.softmax(torch.randn(2, 64, device=dev), -1))
    torch.cuda.synchronize()
    sys.exit(0)
q = torch.randn(8, 4, hd, device=dev, dtype=torch.bfloat16)
if op == "prefill":
    cu = torch.tensor([0, 8], dtype=torch.int32)
    fa.flash_attn_varlen_func(q, q[:, :2], q[:, :2], cu, cu, causal=True, kernel=kernel)
else:
    cache = torch.randn(4, 16, 4, hd, device=dev, dtype=torch.bfloat16)
    d = fa.PagedDecode(dev, use_tensor_cores=False)
    d.plan(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([1], dtype=torch.int32, device=dev),
           torch.tensor([5], dtype=torch.int32), 4, 4, hd, 16, softmax_scale=hd ** -0.5, dtype=torch.bfloat16,
           kv_dtype=torch.bfloat16)
    d.run(q[:1], cache, cache, torch.empty_like(q[:1]))
torch.cuda.synchronize()
"""


def main(argv=None) -> int:
    """Arguments (optional): only the jobs named KERNEL:OP:HEAD_DIM, e.g. fa3:prefill:128 sampling:all:0."""
    wanted = set(sys.argv[1:] if argv is None else argv)
    jobs = [job for job in JOBS if not wanted or ":".join(map(str, job)) in wanted]
    if wanted and len(jobs) != len(wanted):
        print(f"unknown jobs; choose from {[':'.join(map(str, j)) for j in JOBS]}", file=sys.stderr)
        return 2
    t0 = time.time()
    procs = [(job, subprocess.Popen([sys.executable, "-c", CHILD, *map(str, job)])) for job in jobs]
    failed = 0
    for job, p in procs:
        rc = p.wait()
        print(f"flashinfer warm-up {job}: {'ok' if rc == 0 else f'FAILED ({rc})'} at {time.time() - t0:.0f} s",
              flush=True)
        failed += rc != 0
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
