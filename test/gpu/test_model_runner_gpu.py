"""The model runner on CUDA with each fast backend, on a small Llama-shaped model with dummy weights (bf16):
  * no device-to-device memcpy in a prefill or a decode forward, and one per layer when the test-only switch
    RadixAttention.force_output_copy brings the old copy back (so the counter can fail);
  * a CUDA-graph replayed decode step gives the eager step's logits, padded batch sizes included;
  * embeddings (Qwen3-0.6B shape): the skip-KV path equals the cache path, and never touches its pool.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sglx.srt.configs.model_config import ModelConfig
from sglx.srt.layers.radix_attention import RadixAttention
from sglx.srt.mem_cache.memory_pool import NoOpKVPool
from sglx.srt.model_executor.forward_batch import ForwardMode, ModelWorkerBatch
from sglx.srt.model_executor.model_runner import ModelRunner
from sglx.srt.server_args import ServerArgs
from sglx.test.runner_utils import PlacedRequests

BACKENDS = ["triton", "flashinfer", "fa3"]
LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 1024, "intermediate_size": 2816,
    "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64, "num_hidden_layers": 4,
    "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16",
    "rope_theta": 500000.0,
}
QWEN3_06B = "benchmark/configs/qwen3-0.6b"


def make_runner(path, **kw) -> ModelRunner:
    kw.setdefault("max_total_tokens", 65536)
    sa = ServerArgs(model_path=str(path), tokenizer_path=str(path), load_format="dummy", device="cuda",
                    mem_fraction_static=0.5, **kw)
    return ModelRunner(ModelConfig.from_path(str(path), dtype=kw.get("dtype", "auto"),
                                             is_embedding=sa.is_embedding, device="cuda"), sa)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    (d / "config.json").write_text(json.dumps(LLAMA))
    return d


def count_dtod(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if "Memcpy DtoD" in e.name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [1, 16])
def test_no_attention_dtod_copy(llama_dir, backend, page_size):
    runner = make_runner(llama_dir, attention_backend=backend, page_size=page_size, disable_cuda_graph=True)
    layers = LLAMA["num_hidden_layers"]
    counts = {}
    for forced in (False, True):
        RadixAttention.force_output_copy = forced
        try:
            reqs = PlacedRequests(runner, [300, 17, 129], LLAMA["vocab_size"], room=8)
            prefill = reqs.prefill_batch()
            runner.forward(prefill)  # warm-up (kernel compiles, plans); then the measured pair
            reqs.prefill()
            decode = reqs.decode_batch([0, 1, 2])
            counts[forced] = (count_dtod(lambda: runner.forward(prefill)), count_dtod(lambda: runner.forward(decode)))
        finally:
            RadixAttention.force_output_copy = False
    print(f"[{backend} page {page_size}] DtoD memcpy per (prefill, decode) forward: out= {counts[False]}, "
          f"forced copy {counts[True]}")
    assert counts[False] == (0, 0)
    assert counts[True] == (layers, layers)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_replay_matches_eager(llama_dir, backend):
    runner = make_runner(llama_dir, attention_backend=backend, page_size=16, cuda_graph_max_bs=16)
    graphs = runner.cuda_graph_runner
    assert graphs is not None and graphs.batch_sizes == [1, 2, 4, 8, 16]
    reqs = PlacedRequests(runner, [5, 300, 77, 1000, 12, 64, 9, 513, 33, 2], LLAMA["vocab_size"], room=40)
    reqs.prefill()
    for step, which in enumerate(([0], [1, 2, 3], list(range(10)), [4, 5, 6, 7, 8], list(range(10)))):
        batch = reqs.decode_batch(which)
        runner.cuda_graph_runner = None  # eager for the reference
        want = runner.forward(batch).next_token_logits.clone()
        runner.cuda_graph_runner = graphs
        got = runner.forward(batch).next_token_logits
        torch.testing.assert_close(got, want, atol=5e-2, rtol=2e-2)
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        assert agree == 1.0, f"step {step}: greedy tokens differ between graph and eager"
        for i, t in zip(which, got.argmax(-1).tolist()):
            reqs.last_tokens[i] = t


def embed_once(runner: ModelRunner, seqs) -> torch.Tensor:
    """One embedding forward of `seqs` (token id lists) in fresh rows and KV slots: [len(seqs), hidden] fp32."""
    lens = [len(s) for s in seqs]
    rows, locs = [], []
    for n in lens:
        rows.append(runner.req_to_token_pool.alloc())
        loc = runner.token_to_kv_pool_allocator.alloc(n)
        runner.req_to_token_pool.write(rows[-1], 0, loc)
        locs.append(loc)
    b = ModelWorkerBatch(ForwardMode.EXTEND, [t for s in seqs for t in s], rows, lens, [0] * len(lens),
                         torch.cat(locs), is_embedding=True)
    return runner.forward_batch_embedding(b).float()


@pytest.mark.parametrize("backend", ["fa3", "flashinfer", "triton"])
def test_embedding_skip_kv_matches_cache_path_and_never_touches_pool(backend, monkeypatch):
    kw = dict(is_embedding=True, disable_radix_cache=True, attention_backend=backend, max_total_tokens=32768)
    skip = make_runner(QWEN3_06B, **kw)
    assert skip.skip_kv_cache and isinstance(skip.token_to_kv_pool, NoOpKVPool)
    assert skip.token_to_kv_pool.mem_usage_bytes() == 0
    calls = []
    monkeypatch.setattr(skip.token_to_kv_pool, "set_kv_buffer", lambda *a, **k: calls.append("set"))
    monkeypatch.setattr(skip.token_to_kv_pool, "get_kv_buffer", lambda *a, **k: calls.append("get"))
    lens = [500, 1200, 37, 3000, 7000]
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 151669, (n,), generator=gen).tolist() for n in lens]

    embed = lambda runner: embed_once(runner, seqs)
    got = embed(skip)
    assert calls == [], f"the skip-KV path touched the KV pool: {calls}"
    del skip
    torch.cuda.empty_cache()
    cache = make_runner(QWEN3_06B, disable_embedding_skip_kv_cache=True, **kw)
    assert not cache.skip_kv_cache and cache.token_to_kv_pool.mem_usage_bytes() > 0
    k0 = cache.token_to_kv_pool.get_kv_buffer(0)[0].clone()
    want = embed(cache)
    assert not torch.equal(k0, cache.token_to_kv_pool.get_kv_buffer(0)[0]), "the cache path wrote nothing"
    cos = F.cosine_similarity(got, want, dim=-1)
    print(f"[{backend}] skip vs cache cosine: {cos.tolist()}")
    assert cos.min().item() >= 0.999


def test_skip_kv_slot_budget_is_not_bounded_by_pool_memory():
    """--max-total-tokens stands on the skip-KV path (its pool reserves nothing), while a real pool is capped
    at what the card holds: 4M tokens of Qwen3-0.6B KV would be ~460 GB."""
    kw = dict(is_embedding=True, disable_radix_cache=True, attention_backend="triton", max_total_tokens=4_000_000)
    skip = make_runner(QWEN3_06B, **kw)
    assert skip.skip_kv_cache and skip.max_total_num_tokens == 4_000_000
    assert skip.token_to_kv_pool.mem_usage_bytes() == 0
    del skip
    torch.cuda.empty_cache()
    cache = make_runner(QWEN3_06B, disable_embedding_skip_kv_cache=True, **kw)
    assert cache.max_total_num_tokens < 1_000_000
