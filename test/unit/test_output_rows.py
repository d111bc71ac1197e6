"""ForwardBatch.out_rows: the last layer runs everything after its attention on the rows that are read.

* Generation (tiny random Qwen3 against transformers, fp32 CPU): a prefill's next-token logits equal
  transformers' and the unpruned run's, and the last layer's MLP is fed one row per request while the other
  layers see every token (counted with hooks, not assumed); prompt logprobs and decode keep every row.
* Embeddings: all-MiniLM-L6-v2 with --pooling cls against transformers' [CLS] hidden state; SmolLM2's
  last-token pooling is checked against transformers in test_embedding_model.
* A model that ignores out_rows is refused by the pooler and the logits processor instead of being read wrongly.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import List

import pytest
import torch
import torch.nn.functional as F

from sglx.srt.configs.model_config import ModelConfig
from sglx.srt.layers.pooler import Pooler, PoolingConfig, PoolingType
from sglx.srt.model_executor.forward_batch import ForwardBatch, ForwardMode, ModelWorkerBatch
from sglx.srt.model_executor.model_runner import ALL_OUTPUT_ROWS_ENV, ModelRunner
from sglx.srt.server_args import ServerArgs
from sglx.test.runner_utils import PlacedRequests
from test.unit.test_embedding_model import SENTENCES, minilm_path
from test.unit.test_model_families import tiny_hf

PROMPT_LENS = [7, 30, 1, 12]


def count_rows(modules: List[torch.nn.Module]) -> List[List[int]]:
    """Per module, the row count of each input it is called with (hooks stay until the test ends)."""
    seen: List[List[int]] = [[] for _ in modules]
    for i, m in enumerate(modules):
        m.register_forward_hook(lambda mod, args, out, i=i: seen[i].append(args[0].shape[0]))
    return seen


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen3")
    hf = tiny_hf("qwen3").eval()
    hf.save_pretrained(str(path))
    sa = ServerArgs(model_path=str(path), tokenizer_path=str(path), device="cpu", max_total_tokens=2048)
    return hf, ModelRunner(ModelConfig.from_path(str(path), dtype="float32"), sa)


def test_prefill_feeds_the_last_mlp_one_row_per_request(qwen3, monkeypatch):
    hf, runner = qwen3
    seen = count_rows([layer.mlp.gate_up_proj for layer in runner.model.model.layers])
    reqs = PlacedRequests(runner, PROMPT_LENS, 96, room=4)
    try:
        got = reqs.prefill()
        assert seen == [[sum(PROMPT_LENS)], [len(PROMPT_LENS)]]
        for i, p in enumerate(reqs.prompts):
            with torch.no_grad():
                want = hf(torch.tensor([p])).logits[0, -1]
            torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-4)
        monkeypatch.setenv(ALL_OUTPUT_ROWS_ENV, "1")
        full = runner.forward(reqs.prefill_batch()).next_token_logits
        assert seen[1][-1] == sum(PROMPT_LENS)
        torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)
        monkeypatch.delenv(ALL_OUTPUT_ROWS_ENV)
        for s in seen:
            s.clear()
        runner.forward(reqs.decode_batch([0, 1, 2, 3]))
        assert seen == [[4], [4]]  # decode: every row is an output row anyway
    finally:
        reqs.release()


def test_prompt_logprobs_keep_every_row(qwen3):
    _, runner = qwen3
    seen = count_rows([runner.model.model.layers[-1].mlp.gate_up_proj])
    reqs = PlacedRequests(runner, [9, 5], 96, room=4)
    try:
        b = reqs.prefill_batch()
        b.input_logprob_indices, b.input_logprob_targets = [0, 1, 9], [3, 4, 5]
        out = runner.forward(b)
        assert seen == [[14]] and out.input_token_logprobs.shape == (3,)
        assert out.next_token_logits.shape[0] == 2
    finally:
        reqs.release()


def minilm_runner(pooling: str) -> ModelRunner:
    path = minilm_path()
    sa = ServerArgs(model_path=path, device="cpu", is_embedding=True, disable_radix_cache=True, pooling=pooling,
                    max_total_tokens=4096, max_running_requests=32)
    return ModelRunner(ModelConfig.from_path(path, is_embedding=True), sa)


def embed(runner: ModelRunner, seqs: List[List[int]]) -> torch.Tensor:
    ids = [t for s in seqs for t in s]
    b = ModelWorkerBatch(ForwardMode.EXTEND, ids, list(range(len(seqs))), [len(s) for s in seqs], [0] * len(seqs),
                         torch.zeros(len(ids), dtype=torch.int64), is_embedding=True)
    return runner.forward_batch_embedding(b)


def test_cls_pooled_encoder_against_transformers(monkeypatch):
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    seqs = [tok(s)["input_ids"] for s in SENTENCES[:8]]
    runner = minilm_runner("cls")
    layers = runner.model.encoder.layer
    seen = count_rows([layers[0].intermediate.dense, layers[-1].intermediate.dense])
    got = embed(runner, seqs)
    assert seen == [[sum(map(len, seqs))], [len(seqs)]]
    hf = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        want = torch.stack([hf(torch.tensor([s])).last_hidden_state[0, 0] for s in seqs])
    torch.testing.assert_close(got, F.normalize(want, dim=-1), rtol=1e-4, atol=1e-5)
    monkeypatch.setenv(ALL_OUTPUT_ROWS_ENV, "1")
    torch.testing.assert_close(embed(runner, seqs), got, rtol=1e-5, atol=1e-6)
    assert seen[1][-1] == sum(map(len, seqs))


def test_mean_pooling_keeps_every_row():
    runner = minilm_runner("mean")
    seen = count_rows([runner.model.encoder.layer[-1].intermediate.dense])
    embed(runner, [[101, 7592, 102], [101, 2088, 2003, 102]])
    assert seen == [[7]]


def fake_fb(**fields) -> SimpleNamespace:
    """A stand-in ForwardBatch with the real out_rows check."""
    fb = SimpleNamespace(**fields)
    fb.check_out_rows = lambda h: ForwardBatch.check_out_rows(fb, h)
    return fb


def test_logits_processor_refuses_a_model_that_ignored_out_rows():
    from sglx.srt.layers.logits_processor import LogitsProcessor

    fb = fake_fb(batch_size=2, out_rows=torch.tensor([2, 4]), forward_mode=ForwardMode.EXTEND)
    with pytest.raises(RuntimeError, match="out_rows"):
        LogitsProcessor(8)(torch.randn(5, 4), torch.randn(8, 4), fb)


def test_pooler_refuses_a_model_that_ignored_out_rows():
    fb = fake_fb(batch_size=2, extend_seq_lens=torch.tensor([3, 2]), extend_start_loc=torch.tensor([0, 3]),
                 out_rows=torch.tensor([2, 4]))
    with pytest.raises(RuntimeError, match="out_rows"):
        Pooler(PoolingConfig(PoolingType.LAST, normalize=True))(torch.randn(5, 4), fb)
    kept = torch.randn(2, 4)  # a model that honoured it: its rows are the pooled ones
    torch.testing.assert_close(Pooler(PoolingConfig(PoolingType.LAST, normalize=False))(kept, fb), kept)
