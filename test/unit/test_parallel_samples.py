"""SGLang's sampling_params.n on the native API: GenerateReqInput.with_parallel_samples copies each prompt n times
(prompt i's samples one after another), with n = 1, rid `rid-j` and seed + j per copy; n is bounded before
anything is copied (2**70 once took a live server's memory)."""

from __future__ import annotations

import pytest

from sglx.srt.managers.io_struct import AbortReq, GenerateReqInput
from sglx.srt.sampling.sampling_params import MAX_PARALLEL_SAMPLES, SamplingParams, SamplingParamsError


def expand(**kw) -> GenerateReqInput:
    g = GenerateReqInput(**kw)
    g.validate()
    return g.with_parallel_samples()


def test_single_prompt_becomes_a_batch_of_n():
    g = expand(text="hi", sampling_params={"n": 3, "seed": 5, "max_new_tokens": 2}, rid="abc", return_logprob=True)
    assert not g.is_single() and g.batch_size() == 3
    assert g.text == ["hi"] * 3 and g.rid == ["abc-0", "abc-1", "abc-2"] and g.return_logprob == [True] * 3
    assert g.sampling_params == [{"n": 1, "seed": s, "max_new_tokens": 2} for s in (5, 6, 7)]
    g.validate()
    assert [SamplingParams.from_dict(g[i].sampling_params).sampling_seed for i in range(3)] == [5, 6, 7]


def test_batch_with_per_prompt_n_keeps_each_prompt_s_samples_together():
    g = expand(input_ids=[[1, 2], [3], [4, 5, 6]], sampling_params=[{"n": 2}, {}, {"n": 3, "sampling_seed": 0}],
               top_logprobs_num=[1, 2, 3])
    assert g.input_ids == [[1, 2]] * 2 + [[3]] + [[4, 5, 6]] * 3
    assert g.top_logprobs_num == [1, 1, 2, 3, 3, 3] and g.rid is None
    assert [sp.get("sampling_seed") for sp in g.sampling_params] == [None, None, None, 0, 1, 2]
    assert all(sp["n"] == 1 for sp in g.sampling_params if "n" in sp)


def test_a_prompt_without_n_keeps_its_rid_in_a_batch_with_n():
    g = expand(text=["a", "b"], sampling_params=[{"n": 2}, {"max_new_tokens": 1}], rid=["x", "y"])
    assert g.rid == ["x-0", "x-1", "y"] and g.sampling_params[2] == {"max_new_tokens": 1}


def test_n_of_one_leaves_the_request_alone():
    g = GenerateReqInput(text=["a", "b"], sampling_params={"n": 1})
    assert g.with_parallel_samples() is g


@pytest.mark.parametrize("n", [0, -1, MAX_PARALLEL_SAMPLES + 1, 2**70, "2", True, 2.0, None])
def test_bad_n_is_refused_before_copying(n):
    with pytest.raises(SamplingParamsError, match="n must be"):
        GenerateReqInput(text="hi", sampling_params={"n": n}).with_parallel_samples()
    if not isinstance(n, int) or isinstance(n, bool):
        return
    sp = SamplingParams.from_dict({"n": n})
    with pytest.raises(SamplingParamsError, match="n must be"):
        sp.verify()


def test_abort_matches_exact_rids_only():
    """The scheduler's side: exact rids (the tokenizer manager resolves samples and groups,
    test_client_disconnect.py), or everything."""
    a = AbortReq(rids=["nreq", "nreq-0"])
    assert [a.matches(r) for r in ("nreq", "nreq-0", "nreq-1", "nreq0", "other", "")] == [True, True, False, False,
                                                                                          False, False]
    assert AbortReq(abort_all=True).matches("anything") and not AbortReq().matches("")


def test_parallel_sample_groups():
    obj = GenerateReqInput(text=["a", "b", "c"], rid=["x", "y", "z"], sampling_params=[{"n": 2}, {}, {"n": 3}])
    assert obj.parallel_sample_groups() == ["x", "x", None, "z", "z", "z"]
    assert obj.with_parallel_samples().rid == ["x-0", "x-1", "y", "z-0", "z-1", "z-2"]
    assert GenerateReqInput(text="a", sampling_params={"n": 2}).parallel_sample_groups() == [None, None]
