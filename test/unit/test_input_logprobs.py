"""Prompt logprobs (return_logprob with logprob_start_len) through an in-process scheduler on the real default
model (fp32, CPU), against transformers' log_softmax of the same prompt.

Position j >= 1 of the prompt is scored by the logits at j - 1; position 0 has no context (None). They must
come out the same whatever the schedule does to the prompt: a cached prefix (the match stops before the first
position still to be scored), chunked prefill (scores across chunk boundaries), a batch shared with requests
that ask for nothing, the overlap schedule, max_new_tokens 0.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import pytest
import torch

from sglx.srt.managers.io_struct import TokenizedGenerateReqInput
from sglx.srt.managers.scheduler import Scheduler
from sglx.srt.sampling.sampling_params import SamplingParams
from sglx.srt.server_args import ServerArgs
from sglx.test.scheduler_utils import Sink
from sglx.test.hf_reference import load_default_model

TEXT = ("The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
        "How vexingly quick daft zebras jump! def f(x):\n    return x * 2\n")
ATOL = 2e-3  # logits agree with transformers within 1e-3 relative (test_model_parity)


@pytest.fixture(scope="module")
def hf():
    return load_default_model()


@pytest.fixture(scope="module")
def prompt(hf) -> List[int]:
    return hf[0].encode(TEXT)


@pytest.fixture(scope="module")
def reference(hf, prompt) -> torch.Tensor:
    """[len(prompt) - 1, vocab]: row q is log_softmax of the logits at q (it scores prompt token q + 1)."""
    with torch.no_grad():
        logits = hf[1](torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits[:-1], dim=-1)


def make(**kw) -> Scheduler:
    kw.setdefault("max_total_tokens", 4096)
    s = Scheduler(ServerArgs(device="cpu", **kw), None)
    s.send_to_detokenizer = s.send_to_tokenizer = Sink()
    return s


def submit(s: Scheduler, rid: str, ids: List[int], start: int, top: int = 0, max_new: int = 2,
           return_logprob: bool = True) -> None:
    sp = SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True)
    sp.verify()
    sp.normalize()
    s.process_input(TokenizedGenerateReqInput(rid, None, list(ids), sp, return_logprob=return_logprob,
                                              logprob_start_len=start, top_logprobs_num=top))


def run(s: Scheduler) -> Dict[str, Tuple[list, list, int]]:
    """Step until idle; per request its streamed input logprobs, input top lists and cached tokens."""
    got: Dict[str, Tuple[list, list, int]] = {}
    for _ in range(1000):
        if s.is_idle():
            return got
        assert s.step()
        for m in s.send_to_detokenizer.msgs:
            for i, rid in enumerate(m.rids):
                lps, tops, _ = got.setdefault(rid, ([], [], 0))
                if m.input_token_logprobs[i] is not None:
                    lps.extend(m.input_token_logprobs[i])
                if m.input_top_logprobs[i] is not None:
                    tops.extend(m.input_top_logprobs[i])
                got[rid] = (lps, tops, m.cached_tokens[i])
        s.send_to_detokenizer.msgs.clear()
    raise AssertionError("did not finish")


def check(entries: list, prompt: List[int], reference: torch.Tensor, start: int) -> None:
    assert [t for _, t in entries] == prompt[start:]
    for j, (lp, _) in zip(range(start, len(prompt)), entries):
        if j == 0:
            assert lp is None
        else:
            assert abs(lp - float(reference[j - 1, prompt[j]])) < ATOL, (j, lp, float(reference[j - 1, prompt[j]]))


@pytest.mark.parametrize("page_size,chunk,overlap", [(1, -1, True), (16, 16, True), (4, 24, False)])
def test_prompt_logprobs_match_transformers(prompt, reference, page_size, chunk, overlap):
    s = make(page_size=page_size, chunked_prefill_size=chunk, disable_overlap_schedule=not overlap)
    # Warm the prefix cache with the whole prompt: the scored requests must still compute what they score.
    submit(s, "warm", prompt, -1, return_logprob=False)
    run(s)
    submit(s, "all", prompt, 0, top=3)
    submit(s, "mid", prompt, 37)
    submit(s, "plain", prompt, -1, return_logprob=True)  # output logprobs only
    submit(s, "none", prompt[:20], 5, return_logprob=False)  # a start without return_logprob: nothing
    got = run(s)
    check(got["all"][0], prompt, reference, 0)
    check(got["mid"][0], prompt, reference, 37)
    assert got["plain"][0] == [] and got["none"][0] == []
    # The cached prefix stops before the first position still to be scored (page aligned).
    assert got["all"][2] == 0
    assert got["mid"][2] == 36 // page_size * page_size
    assert got["plain"][2] == (len(prompt) - 1) // page_size * page_size
    tops = got["all"][1]
    assert len(tops) == len(prompt) and tops[0] is None
    for j in range(1, len(prompt)):
        want_val, want_idx = reference[j - 1].topk(3)
        assert [t for _, t in tops[j]][:1] == want_idx.tolist()[:1]
        assert max(abs(v - float(w)) for (v, _), w in zip(tops[j], want_val)) < ATOL
    assert s.internal_state()["kv_leak_free"]


def test_scoring_only_and_the_last_position(prompt, reference):
    """max_new_tokens 0 scores the prompt and generates nothing; a start at the last prompt position scores
    just that token; the prompt's last logits still sample the first output token."""
    s = make(page_size=1)
    submit(s, "score", prompt, 1, max_new=0)
    submit(s, "last", prompt, len(prompt) - 1)
    got = run(s)
    check(got["score"][0], prompt, reference, 1)
    check(got["last"][0], prompt, reference, len(prompt) - 1)
    assert len(got["last"][0]) == 1
    assert s.internal_state()["kv_leak_free"]


def test_large_prompt_is_scored_in_chunks_of_rows(monkeypatch, prompt, reference):
    """The logits of the scored rows are computed a few rows at a time (bounded memory), with the same values."""
    from sglx.srt.layers import logits_processor

    monkeypatch.setattr(logits_processor, "INPUT_LOGPROB_CHUNK_ELEMENTS", 7 * 49152)  # 7 rows per chunk
    s = make(page_size=1)
    submit(s, "all", prompt, 0, top=2)
    check(run(s)["all"][0], prompt, reference, 0)
