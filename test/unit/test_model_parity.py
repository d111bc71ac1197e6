"""The model runner against transformers on the real default model (fp32, CPU).

Prefill logits, decode logits and extend-on-a-cached-prefix logits must match transformers' logits for the
same tokens within 1e-3 relative error; page sizes 1 and 16; mixed prefill lengths in one batch.
"""

from __future__ import annotations


import pytest
import torch

from sglx.srt.configs.model_config import ModelConfig
from sglx.srt.model_executor.forward_batch import ForwardMode, ModelWorkerBatch
from sglx.srt.model_executor.model_runner import ModelRunner
from sglx.srt.server_args import ServerArgs
from sglx.test.hf_reference import load_default_model

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Quelle est la couleur du ciel? Le ciel est",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,",
]


@pytest.fixture(scope="module")
def hf():
    return load_default_model()


def make_runner(page_size: int) -> ModelRunner:
    sa = ServerArgs(device="cpu", max_total_tokens=2048, page_size=page_size, max_running_requests=8)
    return ModelRunner(ModelConfig.from_path(sa.model_path, device="cpu"), sa)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class Runner:
    """Drives a ModelRunner by hand: one row and fresh slots per request."""

    def __init__(self, runner: ModelRunner) -> None:
        self.r = runner
        self.rows = {}

    def extend(self, seqs, prefix_lens):
        r = self.r
        seq_lens = [len(s) for s in seqs]
        input_ids, locs_all = [], []
        for i, s in enumerate(seqs):
            row = self.rows.setdefault(i, r.req_to_token_pool.alloc())
            pre = prefix_lens[i]
            last = int(r.req_to_token_pool.req_to_token[row, pre - 1]) if pre else -1
            loc = r.token_to_kv_pool_allocator.alloc_extend([pre], [len(s)], [last], len(s) - pre)
            r.req_to_token_pool.write(row, pre, loc)
            input_ids += s[pre:]
            locs_all.append(loc)
        return self._run(ForwardMode.EXTEND, input_ids, seq_lens, prefix_lens, torch.cat(locs_all))

    def decode(self, next_ids, seq_lens):
        r = self.r
        locs = []
        for i, n in enumerate(seq_lens):
            row = self.rows[i]
            last = int(r.req_to_token_pool.req_to_token[row, n - 2])
            loc = r.token_to_kv_pool_allocator.alloc_decode([n], [last])
            r.req_to_token_pool.write(row, n - 1, loc)
            locs.append(loc)
        return self._run(ForwardMode.DECODE, next_ids, seq_lens, [n - 1 for n in seq_lens], torch.cat(locs))

    def _run(self, mode, input_ids, seq_lens, prefix_lens, loc):
        b = ModelWorkerBatch(mode, input_ids, [self.rows[i] for i in range(len(seq_lens))], seq_lens, prefix_lens, loc)
        return self.r.forward(b).next_token_logits


@pytest.mark.parametrize("page_size", [1, 16])
def test_prefill_and_decode_logits_match_transformers(hf, page_size):
    tok, model = hf
    seqs = [tok.encode(p) for p in PROMPTS]
    drv = Runner(make_runner(page_size))
    logits = drv.extend(seqs, [0] * len(seqs))
    with torch.no_grad():
        ref = [model(torch.tensor([s])).logits[0, -1] for s in seqs]
    for i in range(len(seqs)):
        assert rel_err(logits[i], ref[i]) < 1e-3, (i, rel_err(logits[i], ref[i]))
    # Two greedy decode steps for the whole batch.
    for _ in range(2):
        next_ids = logits.argmax(-1).tolist()
        seqs = [s + [t] for s, t in zip(seqs, next_ids)]
        logits = drv.decode(next_ids, [len(s) for s in seqs])
        with torch.no_grad():
            ref = [model(torch.tensor([s])).logits[0, -1] for s in seqs]
        for i in range(len(seqs)):
            assert rel_err(logits[i], ref[i]) < 1e-3


@pytest.mark.parametrize("page_size", [1, 16])
def test_extend_on_cached_prefix_matches_full_prefill(hf, page_size):
    tok, model = hf
    s = tok.encode(PROMPTS[3] + " " + PROMPTS[1])
    drv = Runner(make_runner(page_size))
    split = 16
    drv.extend([s[:split]], [0])
    logits = drv.extend([s], [split])  # the second part attends to the first part's cached KV
    with torch.no_grad():
        ref = model(torch.tensor([s])).logits[0, -1]
    assert rel_err(logits[0], ref) < 1e-3
