"""Structured output on CUDA: token masks copied to the device and applied before either sampling backend,
with CUDA graphs and the overlap schedule on (constrained batches step without overlap), outputs checked
with python's re. The GPU host has no default model, so the word-level tokenizer of the benchmarks stands
in: its tokens are "<id>", and the regexes below are written over those strings."""

from __future__ import annotations

import re

import pytest
import torch

from benchmark.engine_utils import synthetic_tokenizer

from sglx.srt.managers.io_struct import TokenizedGenerateReqInput
from sglx.srt.sampling.sampling_params import SamplingParams
from sglx.test.scheduler_utils import TINY_LLAMA, make_scheduler, run_until_idle

pytest.importorskip("xgrammar")

LLAMA = {**TINY_LLAMA, "hidden_size": 256, "intermediate_size": 512, "head_dim": 64, "torch_dtype": "float32",
         "eos_token_id": 2}
# One token from <10>..<19>, two to six from <20>..<29>, then <300>; the grammar ends there.
PATTERN = r"<1[0-9]>(<2[0-9]>){2,6}<300>"


def _make(tmp_path, device, sampling_backend, backend=None):
    return make_scheduler(tmp_path, LLAMA, device=device, attention_backend=backend,
                          sampling_backend=sampling_backend, tokenizer_path=synthetic_tokenizer(LLAMA["vocab_size"]),
                          max_total_tokens=8192, max_running_requests=16, cuda_graph_max_bs=16,
                          mem_fraction_static=0.5)


def run_constrained(s, n=8):
    for i in range(2 * n):
        constrained = i % 2 == 0
        sp = SamplingParams(max_new_tokens=30 if constrained else 12, temperature=1.0 if i % 4 else 0.0,
                            sampling_seed=i, ignore_eos=True, regex=PATTERN if constrained else None)
        sp.verify()
        sp.normalize()
        s.process_input(TokenizedGenerateReqInput(str(i), None, list(range(100 + i, 140 + i)), sp))
    outputs = {}
    finished = run_until_idle(s, outputs=outputs)
    assert len(finished) == 2 * n and s.internal_state()["kv_leak_free"]
    for rid, (fr, n_out) in finished.items():
        if int(rid) % 2:
            assert fr["type"] == "length" and n_out == 12
            continue
        assert fr == {"type": "stop", "matched": 2}, (rid, fr)
        text = "".join(f"<{t}>" for t in outputs[rid][:-1])
        assert re.fullmatch(PATTERN, text), (rid, text)
    return finished


@pytest.mark.parametrize("sampling_backend", ["pytorch", "flashinfer"])
@pytest.mark.parametrize("backend", [None, "triton"])
def test_constrained_generation_on_cuda(tmp_path, sampling_backend, backend):
    if sampling_backend == "flashinfer":
        pytest.importorskip("flashinfer")
    s = _make(tmp_path, "cuda", sampling_backend, backend)
    assert s.runner.cuda_graph_runner is not None and s.enable_overlap
    run_constrained(s)


def test_vocab_mask_reaches_the_device_intact(tmp_path):
    """The mask of a batch built on the host equals, bit for bit, the one the sampler reads on the GPU."""
    from sglx.srt.sampling.sampling_batch_info import SamplingBatchInfo
    from sglx.test.sampling_utils import req

    s = _make(tmp_path, "cuda", "pytorch")
    backend = s.grammar_manager._make_backend()
    reqs = [req(temperature=0.0) for _ in range(3)]
    reqs[2].grammar = backend.compile(("regex", PATTERN)).copy()
    info = SamplingBatchInfo.from_reqs(reqs, LLAMA["vocab_size"], torch.device("cuda"))
    host = SamplingBatchInfo.from_reqs(reqs, LLAMA["vocab_size"], torch.device("cpu"))
    assert info.vocab_mask.is_cuda and torch.equal(info.vocab_mask.cpu(), host.vocab_mask)
    assert info.vocab_mask_rows.tolist() == [2]


@pytest.mark.parametrize("sampling_backend", ["pytorch", "flashinfer"])
def test_constraint_after_the_reasoning_on_cuda(tmp_path, sampling_backend):
    """The CPU check (free reasoning token for token, then the regex) with CUDA graphs and either sampler."""
    from test.unit.test_constrained import check_constraint_after_reasoning

    if sampling_backend == "flashinfer":
        pytest.importorskip("flashinfer")
    s = _make(tmp_path, "cuda", sampling_backend)
    check_constraint_after_reasoning(s, PATTERN, lambda ids: "".join(f"<{t}>" for t in ids))
