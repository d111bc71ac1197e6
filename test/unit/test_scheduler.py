"""The scheduler under memory pressure, in-process, on a tiny random-weight Llama (fast).

200 mixed requests (shared prefixes, long prompts, chunked prefill) against a 1536-token pool: every request
finishes with exactly its max_new_tokens, requests get retracted and resumed, and once idle every KV slot is
free or held by the prefix cache.
"""

from __future__ import annotations

import json
import random

import pytest

from sglx.srt.managers.io_struct import AbortReq, TokenizedGenerateReqInput
from sglx.srt.managers.scheduler import Scheduler
from sglx.srt.sampling.sampling_params import SamplingParams
from sglx.srt.server_args import ServerArgs, default_model_path

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 49152,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
}


class Sink:
    def __init__(self) -> None:
        self.msgs = []

    def send_pyobj(self, o) -> None:
        self.msgs.append(o)


def make_scheduler(tmp_path, **kw) -> Scheduler:
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    sa = ServerArgs(model_path=str(tmp_path), tokenizer_path=default_model_path(), load_format="dummy",
                    device="cpu", **kw)
    s = Scheduler(sa, None)
    s.send_to_detokenizer = s.send_to_tokenizer = Sink()
    return s


def submit(s: Scheduler, rid: str, ids, max_new: int) -> None:
    sp = SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True)
    sp.verify()
    sp.normalize()
    s.process_input(TokenizedGenerateReqInput(rid, None, ids, sp))


def run_until_idle(s: Scheduler, max_steps: int = 20000):
    finished = {}
    for _ in range(max_steps):
        if s.is_idle():
            return finished
        batch = s.get_next_batch_to_run()
        assert batch is not None, f"scheduler stuck: {s.internal_state()}"
        s.run_batch(batch)
        for m in s.send_to_detokenizer.msgs:
            for rid, fr, n in zip(m.rids, m.finished_reasons, m.completion_tokens):
                if fr is not None:
                    finished[rid] = (fr, n)
        s.send_to_detokenizer.msgs.clear()
    raise AssertionError("did not finish")


@pytest.mark.parametrize("page_size,radix,chunk", [(1, True, 256), (16, True, 256), (4, False, 128), (1, True, -1)])
def test_pressure_completes_everything_without_leaks(tmp_path, page_size, radix, chunk):
    s = make_scheduler(tmp_path, max_total_tokens=1536, page_size=page_size, chunked_prefill_size=chunk,
                       max_running_requests=24, schedule_policy="lpm", disable_radix_cache=not radix)
    rng = random.Random(page_size)
    shared = [rng.randrange(100, 40000) for _ in range(150)]
    want = {}
    for i in range(200):
        ids = (shared if i % 3 == 0 else []) + [rng.randrange(100, 40000) for _ in range(rng.choice([3, 20, 150, 500]))]
        want[str(i)] = rng.choice([1, 8, 32, 96])
        submit(s, str(i), ids, want[str(i)])
    finished = run_until_idle(s)
    assert {rid: n for rid, (_, n) in finished.items()} == want
    assert all(fr["type"] == "length" for fr, _ in finished.values())
    state = s.internal_state()
    assert state["num_retracted_reqs"] > 0
    assert state["kv_leak_free"] and state["protected_kv_tokens"] == 0
    assert state["available_kv_tokens"] + state["evictable_kv_tokens"] == state["max_total_num_tokens"]


def test_prefix_reuse_and_abort(tmp_path):
    s = make_scheduler(tmp_path, max_total_tokens=4096, page_size=16, chunked_prefill_size=64)
    prefix = list(range(1000, 1500))
    submit(s, "a", prefix + [7, 8, 9], 4)
    run_until_idle(s)
    submit(s, "b", prefix + [10, 11], 4)
    run_until_idle(s)
    submit(s, "c", prefix + [12], 2)
    batch = s.get_next_batch_to_run()
    assert batch.reqs[0].cached_tokens == 496  # the 500-token prefix, page aligned (16)
    s.run_batch(batch)
    run_until_idle(s)
    # Abort a long request mid-decode: it finishes as aborted and its KV is released.
    submit(s, "d", list(range(2000, 2100)), 1000)
    for _ in range(5):
        s.run_batch(s.get_next_batch_to_run())
    s.process_input(AbortReq(rid="d"))
    finished = run_until_idle(s)
    assert finished["d"][0]["type"] == "abort" and finished["d"][1] < 1000
    assert s.internal_state()["kv_leak_free"]


def test_prefill_batch_respects_max_prefill_tokens(tmp_path):
    """Many long prompts: a prefill batch stays within --max-prefill-tokens (a longer prompt runs alone)."""
    s = make_scheduler(tmp_path, max_prefill_tokens=256, max_total_tokens=8192)
    submit(s, "long", list(range(1, 601)), 2)  # longer than the budget: admitted alone, not chunked
    for i in range(5):
        submit(s, f"r{i}", list(range(1 + i, 201 + i)), 2)
    sizes = []
    while not s.is_idle():
        batch = s.get_next_batch_to_run()
        if batch.forward_mode.is_extend():
            sizes.append(sum(len(r.fill_ids) - len(r.prefix_indices) for r in batch.reqs))
        s.run_batch(batch)
        s.send_to_detokenizer.msgs.clear()
    assert sizes[0] == 600 and all(n <= 256 for n in sizes[1:]), sizes
