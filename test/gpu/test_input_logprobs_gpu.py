"""Prompt logprobs on CUDA (the CPU test against transformers is test/unit/test_input_logprobs.py).

A prompt scored through the scheduler (chunked prefill, a warm prefix cache, the overlap schedule, each
default-sized backend) must give, at every position q, the log_softmax of the logits that a prefill of exactly
prompt[:q + 1] gives at its last position: those come from the runner directly, one request per prefix, without
the scheduler or the scored-rows path.
"""

from __future__ import annotations

from typing import List

import pytest
import torch

from benchmark.engine_utils import synthetic_tokenizer

from sglx.srt.managers.io_struct import TokenizedGenerateReqInput
from sglx.srt.sampling.sampling_params import SamplingParams
from sglx.test.runner_utils import PlacedRequests
from sglx.test.scheduler_utils import TINY_LLAMA, make_scheduler

LLAMA = {**TINY_LLAMA, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 64, "torch_dtype": "float32"}


def prefix_reference(s, prompt: List[int], group: int = 8) -> torch.Tensor:
    """[len(prompt) - 1]: for each q, log_softmax(last logits of a prefill of prompt[:q + 1]) at prompt[q + 1]."""
    out = []
    for g in range(0, len(prompt) - 1, group):
        seqs = [prompt[: q + 1] for q in range(g, min(g + group, len(prompt) - 1))]
        logits = last_logits(s.runner, seqs)
        targets = torch.tensor([prompt[len(x)] for x in seqs], device=logits.device)
        out.append(torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None]).squeeze(1).cpu())
    return torch.cat(out)


def last_logits(runner, seqs: List[List[int]]) -> torch.Tensor:
    """One extend of `seqs`, each a fresh request (own row and slots, released afterwards)."""
    placed = PlacedRequests(runner, [len(x) for x in seqs], vocab_size=0, room=0, prompts=seqs)
    try:
        return placed.prefill()
    finally:
        placed.release()


@pytest.mark.parametrize("backend", [None, "triton", "flashinfer"])
def test_prompt_logprobs_on_cuda(tmp_path, backend):
    s = make_scheduler(tmp_path, LLAMA, device="cuda", attention_backend=backend, page_size=16,
                       chunked_prefill_size=32, tokenizer_path=synthetic_tokenizer(LLAMA["vocab_size"]),
                       max_total_tokens=8192, max_running_requests=16, mem_fraction_static=0.5)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(100, 40000, (70,), generator=gen).tolist()
    sp = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)
    sp.verify()
    sp.normalize()
    s.process_input(TokenizedGenerateReqInput("warm", None, prompt, sp))
    s.process_input(TokenizedGenerateReqInput("scored", None, prompt, sp, return_logprob=True,
                                              logprob_start_len=0, top_logprobs_num=2))
    got = []
    while not s.is_idle():
        assert s.step()
        for m in s.send_to_detokenizer.msgs:
            for i, rid in enumerate(m.rids):
                if rid == "scored" and m.input_token_logprobs[i]:
                    got.extend(m.input_token_logprobs[i])
        s.send_to_detokenizer.msgs.clear()
    assert [t for _, t in got] == prompt and got[0][0] is None
    ref = prefix_reference(s, prompt)
    err = (torch.tensor([lp for lp, _ in got[1:]]) - ref).abs().max().item()
    assert err < 1e-3, err
    assert s.internal_state()["kv_leak_free"]
