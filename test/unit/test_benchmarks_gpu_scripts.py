"""benchmark/bench_embedding.py and benchmark/bench_roofline.py end to end on CPU, at tiny sizes, so that their
GPU run is not their first. References: the tiny configs' parameter counts, KV bytes and FLOPs by hand, the
scripts' own recorded wall times (every derived number must follow from them), and for the largest-batch search
a threshold the test itself sets (a fake OOM above it)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "benchmark")
sys.path.insert(0, BENCH)

import bench_embedding as be  # noqa: E402

H, INTER, HEADS, KV_HEADS, HEAD_DIM, LAYERS, VOCAB = 64, 128, 4, 2, 16, 2, 512
BASE = {"hidden_size": H, "intermediate_size": INTER, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": LAYERS, "vocab_size": VOCAB, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True}
QWEN3 = {**BASE, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": HEAD_DIM,
         "rope_theta": 10000}
LLAMA = {**BASE, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
BF16 = 2
KV_BYTES = LAYERS * KV_HEADS * HEAD_DIM * 2 * BF16  # K and V of one token, all layers
# Llama by hand: q,k,v + o + gate,up + down + two norms per layer, the final norm; lm_head = tied embedding.
PER_LAYER = H * (H + 2 * KV_HEADS * HEAD_DIM) + H * H + H * 2 * INTER + INTER * H + 2 * H
MATMUL_PARAMS = LAYERS * PER_LAYER + H + VOCAB * H


def _config_dir(tmp_path_factory, name: str, cfg: dict) -> str:
    d = tmp_path_factory.mktemp(name)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory):
    return _config_dir(tmp_path_factory, "qwen3", QWEN3)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _config_dir(tmp_path_factory, "llama", LLAMA)


def _read(path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _no_engine_children() -> bool:
    return not [p for p in mp.active_children() if p.name.startswith("sglx::")]


# ------------------------------------------------------------------------------------------ bench_embedding
@pytest.mark.parametrize("threshold", [1, 300, 1000, 4095, 4096, 4097, 100_000, 777_777])
def test_search_largest_finds_the_threshold_within_tolerance(threshold):
    calls = []

    def fits(n: int) -> bool:
        calls.append(n)
        return n <= threshold

    res = be.search_largest(fits, 4096, 1_000_000, rel_tol=0.05, min_step=256)
    assert res.largest_ok <= threshold < res.first_fail
    assert res.first_fail - res.largest_ok <= max(256, 0.05 * res.largest_ok)
    assert len(calls) <= 30


def test_search_largest_stops_at_the_cap():
    calls = []
    res = be.search_largest(lambda n: calls.append(n) or True, 64, 300)
    assert (res.largest_ok, res.first_fail, calls) == (300, None, [64, 128, 256, 300])


def test_check_indices():
    assert be.check_indices(12, 6) == [0, 2, 4, 7, 9, 11]
    assert be.check_indices(3, 10) == [0, 1, 2]
    assert be.check_indices(5, 0) == []


def test_largest_batch_recovers_from_oom_and_frees_the_pools(qwen3_dir, monkeypatch):
    """A fake CUDA OOM above 1000 tokens: the search must land within 5% below it, and each try must start
    from empty pools (the failed one's rows and slots given back)."""
    from sglx.srt.model_executor.model_runner import ModelRunner

    real = ModelRunner.forward_batch_embedding
    seen = []

    def fake(self, batch):
        n = len(batch.input_ids)
        seen.append(self.token_to_kv_pool_allocator.available_size() == self.max_total_num_tokens - n)
        if n > 1000:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real(self, batch)

    monkeypatch.setattr(ModelRunner, "forward_batch_embedding", fake)
    args = be.build_parser().parse_args(["--model-path", qwen3_dir, "--largest-batch-request-len", "64",
                                         "--largest-batch-max-tokens", "5000", "--max-total-tokens", "8192"])
    args.tokenizer_path = None
    for mode, skip in (("skip", True), ("cache", False)):
        seen.clear()
        rec = be.largest_batch_mode(args, mode)
        assert rec["skip_kv_cache"] is skip and rec["bound"] == "oom"
        assert 0.95 * 1000 <= rec["largest_ok_tokens"] <= 1000 < rec["first_fail_tokens"]
        assert [t["ok"] for t in rec["trials"]] == [t["tokens"] <= 1000 for t in rec["trials"]]
        assert [t["tokens"] for t in rec["trials"]][:5] == [64, 128, 256, 512, 1024]
        assert all(t["requests"] == -(-t["tokens"] // 64) for t in rec["trials"])
        assert seen and all(seen)
        assert rec["kv_pool_bytes"] == (0 if skip else (rec["max_total_num_tokens"] + 1) * KV_BYTES)


def test_pack_batches_fills_like_the_prefill_adder():
    assert be.pack_batches([5, 6, 4, 20, 1, 1], 10) == [[5], [6, 4], [20], [1, 1]]
    assert be.pack_batches([], 10) == []


def test_forwards_mode_times_every_batch_and_counts_flops(qwen3_dir):
    args = be.build_parser().parse_args(["--model-path", qwen3_dir, "--max-total-tokens", "4096",
                                         "--max-prefill-tokens", "100"])
    args.tokenizer_path = None
    inputs = be.make_inputs(9, 20, 60, VOCAB, 0)
    lens = [len(x) for x in inputs]
    rec = be.forwards_mode(args, "skip", inputs)
    assert rec["batches"] == len(be.pack_batches(lens, 100)) > 1
    assert rec["items_per_s"] == pytest.approx(9 / rec["forward_s"])
    # by hand: q,k,v,o + gate,up,down per layer (the norms are vectors), causal attention over each input
    layer = H * (HEADS + 2 * KV_HEADS) * HEAD_DIM + HEADS * HEAD_DIM * H + 3 * H * INTER
    flops = 2 * sum(lens) * LAYERS * layer + 2 * sum(n * n for n in lens) * HEADS * HEAD_DIM * LAYERS
    assert rec["tflops"] == pytest.approx(flops / rec["forward_s"] / 1e12)


def test_forwards_mode_serves_the_fp8_model_when_asked(qwen3_dir):
    from sglx.srt.layers.quantization.fp8 import Fp8Linear

    args = be.build_parser().parse_args(["--model-path", qwen3_dir, "--max-total-tokens", "4096",
                                         "--quantization", "fp8"])
    args.tokenizer_path = None
    sa = be.mode_server_args(args, "skip")
    assert sa.quantization == "fp8"
    runner = be.build_mode_runner(args, "skip")
    assert sum(isinstance(m, Fp8Linear) for m in runner.model.modules()) == 4 * LAYERS
    del runner
    rec = be.forwards_mode(args, "skip", be.make_inputs(3, 20, 40, VOCAB, 0))
    assert rec["batches"] == 1 and rec["items_per_s"] > 0


def test_bench_fp8_linear_shapes_are_the_layer_s_fused_linears(qwen3_dir):
    import bench_fp8_linear as bl

    from sglx.srt.configs.model_config import ModelConfig

    shapes = bl.layer_shapes(ModelConfig.from_path(qwen3_dir))
    assert shapes == {"qkv_proj": (H, (HEADS + 2 * KV_HEADS) * HEAD_DIM), "o_proj": (HEADS * HEAD_DIM, H),
                      "gate_up_proj": (H, 2 * INTER), "down_proj": (INTER, H)}


def test_pool_read_mode_needs_a_flashinfer_family_prefill_backend(qwen3_dir):
    """The pool-read baseline flips the flashinfer/fa3 backends' switch; on CPU (torch_native) it must say it
    cannot, not silently time the cache path under its name."""
    args = be.build_parser().parse_args(["--model-path", qwen3_dir, "--max-total-tokens", "4096",
                                         "--forwards", "--forward-modes", "skip", "pool-read"])
    assert args.forward_modes == ["skip", "pool-read"]
    args.tokenizer_path = None
    with pytest.raises(ValueError, match="pool-read needs the flashinfer or fa3 prefill backend"):
        be.forwards_mode(args, be.POOL_READ, be.make_inputs(2, 5, 9, VOCAB, 0))


def test_copy_attention_output_flags_every_layer_and_keeps_the_result(qwen3_dir):
    """pre-seeds' per-layer output copy: every attention layer takes the copy path, and the embeddings are the
    same bits as with out= (the copy only moves them)."""
    from sglx.srt.layers.radix_attention import RadixAttention
    from sglx.srt.model_executor.forward_batch import ForwardMode, ModelWorkerBatch

    args = be.build_parser().parse_args(["--model-path", qwen3_dir, "--max-total-tokens", "4096"])
    args.tokenizer_path = None
    runner = be.build_mode_runner(args, "skip")
    lens, ids = [7, 12], torch.randint(0, VOCAB, (19,), generator=torch.Generator().manual_seed(0)).tolist()

    def embed():
        batch = ModelWorkerBatch(ForwardMode.EXTEND, ids, [0, 1], lens, [0, 0], torch.arange(1, 20), is_embedding=True)
        return runner.forward_batch_embedding(batch).clone()

    want = embed()
    be.copy_attention_output(runner)
    layers = [m for m in runner.model.modules() if isinstance(m, RadixAttention)]
    assert len(layers) == LAYERS and all(m.force_output_copy for m in layers)
    assert torch.equal(embed(), want)


def test_bench_embedding_end_to_end(qwen3_dir, tmp_path):
    out = tmp_path / "emb.jsonl"
    n, lo, hi = 10, 5, 60
    rc = be.main(["--model-path", qwen3_dir, "--num-inputs", str(n), "--min-len", str(lo), "--max-len", str(hi),
                  "--warmup-inputs", "2", "--check-items", "5", "--largest-batch-request-len", "64",
                  "--largest-batch-max-tokens", "200", "--max-total-tokens", "4096", "--schedule", "overlap", "sync",
                  "--result-file", str(out)])
    assert rc == 0
    recs = _read(out)
    assert [(r["part"], r["mode"], r.get("schedule")) for r in recs] == [
        ("encode", "skip", "overlap"), ("encode", "cache", "overlap"), ("encode", "skip", "sync"),
        ("encode", "cache", "sync"), ("largest_batch", "skip", None), ("largest_batch", "cache", None),
        ("agreement", "skip_vs_cache", None)]
    for r in recs[2:4]:  # without the overlap schedule: the same inputs, all encoded
        assert "error" not in r and r["num_inputs"] == n and r["input_tokens"] == recs[0]["input_tokens"]
        assert r["items_per_s"] > 0 and r["kv_leak_free"]
    recs = recs[:2] + recs[4:]
    enc = {r["mode"]: r for r in recs[:2]}
    for mode, r in enc.items():
        assert "error" not in r and "warning" not in r and r["dtype"] == "bfloat16"
        assert r["num_inputs"] == n and n * lo <= r["input_tokens"] <= n * hi
        assert r["items_per_s"] == pytest.approx(n / r["wall_s"])
        assert r["tokens_per_s"] == pytest.approx(r["input_tokens"] / r["wall_s"])
        assert r["max_total_num_tokens"] == 4096 and r["kv_leak_free"] and r["embedding_dim"] == H
    assert enc["skip"]["input_tokens"] == enc["cache"]["input_tokens"]
    assert enc["skip"]["skip_kv_cache"] is True and enc["skip"]["kv_pool_bytes"] == 0
    assert enc["cache"]["skip_kv_cache"] is False and enc["cache"]["kv_pool_bytes"] == 4097 * KV_BYTES
    for r in recs[2:4]:
        assert (r["largest_ok_tokens"], r["first_fail_tokens"], r["bound"]) == (200, None, "cap:option")
        assert [t["tokens"] for t in r["trials"]] == [64, 128, 200]
    agree = recs[4]
    assert agree["checked_items"] == 5 and agree["ok"] and agree["min_cosine"] >= 0.999
    assert _no_engine_children()


# ------------------------------------------------------------------------------------------ bench_output_rows
@pytest.mark.parametrize("embedding", [False, True])
def test_bench_output_rows_times_both_sides_and_restores_the_switch(qwen3_dir, tmp_path, embedding):
    import bench_output_rows as bo

    from sglx.srt.model_executor.model_runner import ALL_OUTPUT_ROWS_ENV

    out = tmp_path / "rows.jsonl"
    bo.main(["--model-path", qwen3_dir, "--device", "cpu", "--dtype", "float32", "--cases", "2:24", "1:40",
             "--repeats", "2", "--result-file", str(out)] + (["--is-embedding"] if embedding else []))
    recs = _read(out)
    assert [(r["batch_size"], r["input_len"], r["is_embedding"]) for r in recs] == [(2, 24, embedding), (1, 40, embedding)]
    for r in recs:
        assert r["a_ms"] > 0 and r["b_ms"] > 0 and r["max_abs_diff"] < 1e-5 and r["b_env"] == "SGLX_ALL_OUTPUT_ROWS=1"
        assert r["saving"] == pytest.approx(1 - r["a_ms"] / r["b_ms"])
    assert ALL_OUTPUT_ROWS_ENV not in os.environ


def test_bench_output_rows_any_switch(qwen3_dir, tmp_path, monkeypatch):
    """--b-env names side B's variable; the outputs agree (the fused-kernel switch does nothing on CPU), and
    the variable is unset again afterwards, also where it was set before."""
    import bench_output_rows as bo

    monkeypatch.setenv("SGLX_DISABLE_FUSED_KERNELS", "1")
    out = tmp_path / "switch.jsonl"
    bo.main(["--model-path", qwen3_dir, "--device", "cpu", "--dtype", "float32", "--cases", "1:16", "--repeats", "1",
             "--b-env", "SGLX_DISABLE_FUSED_KERNELS=1", "--result-file", str(out)])
    (rec,) = _read(out)
    assert rec["b_env"] == "SGLX_DISABLE_FUSED_KERNELS=1" and rec["max_abs_diff"] == 0.0
    assert "SGLX_DISABLE_FUSED_KERNELS" not in os.environ


# ------------------------------------------------------------------------------------------ bench_roofline
def test_bench_roofline_two_engines_in_turn(llama_dir, tmp_path):
    """The CLI as the lead runs it, both scheduler modes (each its own Engine, shut down before the next)."""
    out = tmp_path / "roof.jsonl"
    il, ol, pb, pl = 16, 9, 2, 32
    cmd = [sys.executable, os.path.join(BENCH, "bench_roofline.py"), "--model-path", llama_dir,
           "--attention-backend", "torch_native", "--schedule", "overlap", "sync", "--batch-sizes", "1", "3",
           "--input-len", str(il), "--output-len", str(ol), "--warmup-output-len", "3",
           "--prefill-batch", str(pb), "--prefill-input-len", str(pl), "--prefill-repeats", "2",
           "--copy-bytes", "65536", "--matmul-size", "64", "--max-total-tokens", "2048", "--call-timeout", "120",
           "--result-file", str(out)]
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "python")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "died with exit code" not in proc.stderr
    recs = _read(out)
    assert [(r["part"], r.get("batch_size")) for r in recs] == [("decode", 1), ("decode", 3), ("prefill", pb)] * 2
    assert [r["schedule"] for r in recs] == ["overlap"] * 3 + ["sync"] * 3
    for r in recs:
        assert "error" not in r and r["attention_backend"] == "torch_native" and r["device"] == "cpu"
        assert r["weight_bytes_per_step"] == MATMUL_PARAMS * BF16 and r["kv_bytes_per_token"] == KV_BYTES
    for r in (r for r in recs if r["part"] == "decode"):
        bs = r["batch_size"]
        assert r["t_1_s"] > 0 and r["t_out_s"] > r["t_1_s"]
        assert r["step_s"] == pytest.approx((r["t_out_s"] - r["t_1_s"]) / (ol - 1))
        floor = (MATMUL_PARAMS * BF16 + bs * (il + (ol - 1) // 2) * KV_BYTES) / r["copy_bandwidth_bytes_per_s"]
        assert r["floor_s"] == pytest.approx(floor) and r["ratio"] == pytest.approx(r["step_s"] / floor)
        assert r["goal_ratio"] == (1.15 if bs == 1 else None)
    for r in (r for r in recs if r["part"] == "prefill"):
        flops = pb * pl * 2 * MATMUL_PARAMS + pb * 2 * pl * pl * HEADS * HEAD_DIM * LAYERS
        assert r["model_flops"] == flops and len(r["wall_all_s"]) == 2
        assert r["share_of_matmul_rate"] == pytest.approx(flops / r["wall_s"] / r["matmul_flops_per_s"])
    assert "decode bs=1" in proc.stdout and "prefill 2x32" in proc.stdout


def test_bench_roofline_reports_a_dead_engine_instead_of_hanging(llama_dir, tmp_path, monkeypatch):
    """A scheduler that dies mid-run (here: killed) must give an error record, not a hang."""
    import bench_roofline as br

    real = br.decode_case

    def kill_then_run(eng, *a, **kw):
        os.kill(eng.engine.procs[0].pid, 9)
        return real(eng, *a, **kw)

    monkeypatch.setattr(br, "decode_case", kill_then_run)
    out = tmp_path / "roof.jsonl"
    rc = br.main(["--model-path", llama_dir, "--batch-sizes", "1", "--input-len", "8", "--output-len", "3",
                  "--skip-prefill", "--copy-bytes", "4096", "--matmul-size", "16", "--result-file", str(out)])
    assert rc == 1
    (rec,) = _read(out)
    assert rec["part"] == "decode" and "died" in rec["error"]  # the Engine or its guard reports the death
    # The default KV pool: 1.25 x the largest case's prompt + output + 2 tokens, here 1 x (8 + 3 + 2).
    assert rec["max_total_tokens_arg"] == rec["max_total_num_tokens"] == int(1.25 * 13)
    assert _no_engine_children()


# ------------------------------------------------------------------------------------------ bench_sampling
def test_bench_sampling_defaults_are_the_measurement_asked_for():
    import bench_sampling as bs

    args = bs.build_parser().parse_args([])
    assert args.batch_sizes == [1, 64, 256] and args.vocab == 128256 and args.device == "cuda"
    assert args.backends == ["pytorch", "flashinfer"] and args.out is None
    assert args.settings == ["greedy", "temperature=0.7", "top_k=50", "top_p=0.9", "top_k=50,top_p=0.9", "min_p=0.05"]
    assert bs.SETTINGS["top_k=50,top_p=0.9"] == {"top_k": 50, "top_p": 0.9}
    assert bs.percentile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5 and bs.percentile([1.0], 0.9) == 1.0


def test_bench_sampling_on_cpu_with_a_fake_flashinfer(tmp_path, monkeypatch, capsys):
    """Tiny sizes, CPU wall time; flashinfer faked so that the table's ratio and path columns are exercised."""
    import bench_sampling as bs

    from test.unit.test_sampling_backend import install_fake_flashinfer

    install_fake_flashinfer(monkeypatch)
    out = tmp_path / "sampling.json"
    rc = bs.main(["--device", "cpu", "--batch-sizes", "1", "3", "--vocab", "64", "--warmup", "1", "--iters", "3",
                  "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["errors"] == {} and report["vocab"] == 64 and report["device"] == "cpu"
    recs = report["results"]
    assert len(recs) == 2 * 6 * 2 and not [r for r in recs if "error" in r]
    assert all(r["median_us"] > 0 and r["p10_us"] <= r["median_us"] <= r["p90_us"] and r["iters"] == 3 for r in recs)
    paths = {r["setting"]: r["path"] for r in recs if r["backend"] == "flashinfer"}
    assert paths == {"greedy": "argmax", "temperature=0.7": "sampling_from_probs",
                     "top_k=50": "top_k_sampling_from_probs", "top_p=0.9": "top_p_sampling_from_probs",
                     "top_k=50,top_p=0.9": "top_k_top_p_sampling_from_probs", "min_p=0.05": "min_p_sampling_from_probs"}
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 + 1 + 12 and "top_k_top_p_sampling_from_probs" in printed


def test_bench_sampling_without_flashinfer_times_pytorch_and_says_why(tmp_path, monkeypatch, capsys):
    import bench_sampling as bs

    monkeypatch.setitem(sys.modules, "flashinfer", None)
    out = tmp_path / "sampling.json"
    assert bs.main(["--device", "cpu", "--batch-sizes", "2", "--vocab", "32", "--warmup", "0", "--iters", "2",
                    "--settings", "top_p=0.9", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["backend"] for r in report["results"]] == ["pytorch"]
    assert "flashinfer-python" in report["errors"]["flashinfer"]
    assert "flashinfer: not run" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ trace_gaps
def test_trace_gaps_charges_idle_gpu_time_to_the_scheduler_phases():
    import trace_gaps as tg

    def x(name, cat, ts, dur):
        return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur}

    events = [
        x("k1", "kernel", 0, 100), x("k2", "kernel", 50, 100),  # overlapping: busy 0..150
        x("m", "gpu_memcpy", 160, 40),  # a 10 us gap: under the threshold
        x("k3", "kernel", 300, 100),  # 100 us idle: 200..300
        x("k4", "kernel", 1000, 100),  # 600 us idle: 400..1000
        x("sglx::launch_batch", "user_annotation", 180, 50), x("sglx::launch_batch", "user_annotation", 950, 30),
        x("sglx::process_result", "user_annotation", 500, 300),
        x("aten::mm", "cpu_op", 0, 2000), {"ph": "i", "name": "marker", "ts": 5},
    ]
    s = tg.summarize(events, min_gap_us=20)
    assert s["window_ms"] == pytest.approx(1.1) and s["gpu_busy_ms"] == pytest.approx(0.39)
    assert s["gaps"] == 2 and s["gap_idle_ms"] == pytest.approx(0.7)
    assert s["idle_ms_by_phase"] == {"sglx::process_result": 0.3, "sglx::launch_batch": 0.06}
    assert [g["idle_us"] for g in s["largest_gaps"]] == [600, 100]
    assert s["largest_gaps"][1]["phases_us"] == {"sglx::launch_batch": 30.0}
    assert s["steps"] == 2 and s["ms_per_step"] == pytest.approx(0.77)
    assert "GPU busy 0.39 of 1.10 ms" in tg.format_summary(s)
    assert tg.summarize([x("a", "cpu_op", 0, 5)]) == {"gpu_events": 0}
    assert "gpu_first_ns" not in s
    s = tg.summarize(events, base_ns=10**18)  # Unix ns of the GPU's first and last activity
    assert (s["gpu_first_ns"], s["gpu_last_ns"]) == (10**18, 10**18 + 1_100_000)


def test_trace_gaps_reads_a_real_scheduler_trace(tmp_path):
    """The CPU scheduler's own trace, gzipped, through the command line (no GPU events on a CPU run)."""
    import trace_gaps as tg
    from sglx.srt.managers.io_struct import ProfileReq
    from sglx.test.scheduler_utils import make_scheduler, run_until_idle, submit

    s = make_scheduler(tmp_path)
    t0 = time.time_ns()
    s.process_input(ProfileReq("start", output_dir=str(tmp_path), activities=["CPU"]))
    assert s.send_to_tokenizer.msgs.pop().success
    submit(s, "a", [5, 6, 7], 3)
    run_until_idle(s)
    t1 = time.time_ns()
    s.process_input(ProfileReq("stop"))
    path = s.send_to_tokenizer.msgs[-1].trace_path
    events = tg.load_trace(path)
    assert any(e.get("name") == "sglx::launch_batch" for e in events)
    # base + ts * 1000 is Unix time: every phase lies between the wall times taken around the work
    base = tg.base_time_ns(path)
    phases = [e for e in events if e.get("ph") == "X" and e.get("name", "").startswith("sglx::")]
    assert phases and all(t0 <= base + e["ts"] * 1000 and base + (e["ts"] + e["dur"]) * 1000 <= t1 for e in phases)
    assert tg.summarize(events) == {"gpu_events": 0}
    assert tg.main([path]) == 0
