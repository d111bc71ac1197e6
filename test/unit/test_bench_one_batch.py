"""sglx.bench_one_batch on CPU, on a tiny random-weight Llama (fast).

References are computed here by hand from the config's dimensions (parameter counts, KV bytes per token,
FLOPs, the HBM floor, KV slots in use), from the per-step latencies the tool itself records (the decode
metric must be their mean), and for the tool's batch bookkeeping from a different engine path: the logits
of a decode step must equal those of one prefill of the whole sequence.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

from sglx import bench_one_batch as bob
from sglx.srt.configs.model_config import ModelConfig
from sglx.srt.models.registry import get_model_class

H, INTER, HEADS, KV_HEADS, LAYERS, VOCAB = 64, 128, 4, 2, 2, 512
HEAD_DIM = H // HEADS
TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": INTER,
    "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "num_hidden_layers": LAYERS,
    "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
}
# By hand: q,k,v + o + gate,up + down + two norms per layer, then the final norm; lm_head = tied embedding.
PER_LAYER = H * (H + 2 * KV_HEADS * HEAD_DIM) + H * H + H * 2 * INTER + INTER * H + 2 * H
NON_EMBEDDING = LAYERS * PER_LAYER + H
LM_HEAD = VOCAB * H
KV_BYTES = LAYERS * KV_HEADS * HEAD_DIM * 2 * 4  # K and V, fp32 on CPU
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    (d / "config.json").write_text(json.dumps(TINY))
    return str(d)


def cli_args(model_dir: str, *extra: str):
    return ["--model-path", model_dir, "--device", "cpu", "--attention-backend", "torch_native",
            "--copy-bytes", "65536", "--matmul-size", "32", *extra]


@pytest.mark.parametrize("page_size", [1, 4])
def test_cli_writes_one_checked_json_line_per_case(tiny_dir, tmp_path, page_size):
    out = tmp_path / "res.jsonl"
    rc = bob.main(cli_args(tiny_dir, "--batch-size", "1", "3", "--input-len", "5", "--output-len", "4",
                           "--case", "2:7:1", "--page-size", str(page_size), "--result-file", str(out)))
    assert rc == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["batch_size"], r["input_len"], r["output_len"]) for r in recs] == [(1, 5, 4), (3, 5, 4), (2, 7, 1)]
    for r in recs:
        assert "error" not in r and r["attention_backend"] == "torch_native" and r["device"] == "cpu"
        assert (r["non_embedding_params"], r["lm_head_params"]) == (NON_EMBEDDING, LM_HEAD)
        assert r["total_params"] == NON_EMBEDDING + LM_HEAD  # tied: the embedding is the lm_head
        assert r["kv_bytes_per_token"] == KV_BYTES
        assert r["weight_bytes_per_step"] == (NON_EMBEDDING + LM_HEAD) * 4
        bs, il, ol = r["batch_size"], r["input_len"], r["output_len"]
        flops = bs * il * 2 * (NON_EMBEDDING + LM_HEAD) + bs * 2 * il * il * HEADS * HEAD_DIM * LAYERS
        assert r["prefill_model_flops"] == flops
        rate = flops / r["prefill_latency_s"]
        assert r["prefill_share_of_matmul_rate"] == pytest.approx(rate / r["matmul_flops_per_s"])
        assert r["prefill_throughput_tok_s"] == pytest.approx(bs * il / r["prefill_latency_s"])
        # KV slots actually taken from the allocator: prompt + every generated token but the last.
        kv_tokens = il + ol - 1
        assert r["kv_slots_in_use"] == bs * math.ceil(kv_tokens / page_size) * page_size
        assert r["decode_steps"] == ol - 1
        if ol == 1:
            assert "decode_latency_s" not in r and r["total_latency_s"] == r["prefill_latency_s"]
            continue
        steps = r["decode_step_latencies_s"]
        assert len(steps) == ol - 1 and all(s > 0 for s in steps)
        assert r["decode_latency_s"] == pytest.approx((r["total_latency_s"] - r["prefill_latency_s"]) / (ol - 1))
        assert r["decode_latency_s"] == pytest.approx(statistics.mean(steps))
        assert r["decode_median_latency_s"] == pytest.approx(statistics.median(steps))
        assert r["decode_median_throughput_tok_s"] == pytest.approx(bs / statistics.median(steps))
        floor = ((NON_EMBEDDING + LM_HEAD) * 4 + bs * (il + ol / 2) * KV_BYTES) / r["copy_bandwidth_bytes_per_s"]
        assert r["decode_hbm_floor_s"] == pytest.approx(floor)
        assert r["decode_median_over_floor"] == pytest.approx(statistics.median(steps) / floor)


def _wide_weights(model: torch.nn.Module) -> None:
    """Weights large enough that attention visibly moves the logits (the dummy range, 1e-3, barely does)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.copy_(torch.empty(p.shape).uniform_(-0.3, 0.3, generator=g))


@pytest.mark.parametrize("page_size", [1, 4])
def test_decode_steps_match_one_prefill_of_the_whole_sequence(tiny_dir, page_size):
    args = bob.build_parser().parse_args(cli_args(tiny_dir, "--page-size", str(page_size)))
    args.attention_backend = ["torch_native"]
    runner = bob.build_runner(args, [bob.Case(2, 5, 4)])
    _wide_weights(runner.model)
    drv = bob.BatchDriver(runner, bob.Case(2, 5, 4), seed=3)
    drv.reset_pools()
    drv.prefill()
    for _ in range(3):
        drv.decode()
    decoded = drv.last_logits.clone()
    # Reference: the prompt plus the first three generated tokens, prefilled at once from empty pools.
    ref = bob.BatchDriver(runner, bob.Case(2, 8, 1), seed=3)
    for r, d in zip(ref.reqs, drv.reqs):
        r.origin_input_ids = d.origin_input_ids + d.output_ids[:3]
    ref.reset_pools()
    ref.prefill()
    err = float((decoded - ref.last_logits).abs().max() / ref.last_logits.abs().max())
    assert err < 1e-4, err
    assert [r.output_ids[0] for r in ref.reqs] == [d.output_ids[3] for d in drv.reqs]
    assert decoded.std() > 1e-2  # the check above is not vacuous: logits differ across the vocabulary


def test_import_pulls_in_nothing_of_the_http_side():
    code = ("import sys, json, sglx.bench_one_batch; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    env = {**os.environ, "PYTHONPATH": os.path.join(REPO, "python")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert "torch" in loaded  # the probe saw the import
    assert not loaded & {"zmq", "fastapi", "uvicorn", "starlette", "aiohttp", "openai", "pydantic", "uvloop"}


@pytest.mark.parametrize("name, total, non_embedding", [
    ("llama-3.1-8b", 8_030_261_248, 6_979_588_096),  # Meta's 8.03B; minus embedding and lm_head
    ("qwen3-0.6b", 596_049_920, 440_467_456),  # Qwen's model card: 0.6B, 0.44B non-embedding
])
def test_benchmark_configs_build_the_published_sizes(name, total, non_embedding):
    cfg = ModelConfig.from_path(os.path.join(REPO, "benchmark", "configs", name), device="cuda")
    assert cfg.dtype == torch.bfloat16 and cfg.head_dim == 128 and cfg.num_key_value_heads == 8
    with torch.device("meta"):
        model = get_model_class(cfg.architecture)(cfg.hf_config)
    n_total = sum(p.numel() for p in model.parameters())
    head = 0 if cfg.hf_config.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    assert n_total == total
    assert n_total - cfg.vocab_size * cfg.hidden_size - head == non_embedding
