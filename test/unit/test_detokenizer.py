"""The detokenizer: incremental decoding equals decoding the whole sequence at once, and one request whose decoding
fails ends aborted while the batch's other requests, and the process, go on (a non-boolean skip_special_tokens
once reached the tokenizer and killed the detokenizer, and with it the server)."""

import functools

import pytest

from sglx.srt.hf_transformers_utils import get_tokenizer
from sglx.srt.managers.detokenizer_manager import DETOKENIZER_ABORT, DetokenizerManager, IncrementalDetokenizer
from sglx.srt.managers.io_struct import BatchTokenIDOut
from sglx.srt.sampling.sampling_params import SamplingParams, SamplingParamsError
from sglx.srt.server_args import default_model_path


@functools.lru_cache(maxsize=1)
def tokenizer():
    return get_tokenizer(default_model_path())


def _batch(rids, ids, finished, skip):
    n = len(rids)
    return BatchTokenIDOut(rids=rids, finished_reasons=finished, new_output_ids=ids, prompt_tokens=[1] * n,
                           completion_tokens=[len(i) for i in ids], cached_tokens=[0] * n, skip_special_tokens=skip,
                           spaces_between_special_tokens=[True] * n, no_stop_trim=[False] * n, stop_strs=[[]] * n)


def _manager():
    dm = object.__new__(DetokenizerManager)  # no sockets: handle() is called directly
    dm.detok = IncrementalDetokenizer(tokenizer())
    return dm


def test_incremental_text_equals_the_whole_decode():
    tok = tokenizer()
    ids = tok.encode("Héllo wörld — naïve café, 東京 🙂 done.")
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.step("r", [t], None) for t in ids[:-1]) + detok.step("r", ids[-1:], {"type": "length"})
    assert text == tok.decode(ids) and "r" not in detok.states


def test_one_failing_request_is_aborted_and_the_batch_goes_on():
    tok, dm = tokenizer(), _manager()
    good, bad = tok.encode("The cat sat"), tok.encode("on the mat")
    out = dm.handle(_batch(["good", "bad"], [good, bad], [None, None], [True, "no"]))  # "no": the old crash
    assert out.new_texts[0] == tok.decode(good) and out.finished_reasons[0] is None
    assert out.new_texts[1] == "" and out.finished_reasons[1]["type"] == "abort"
    assert "detokenization failed" in out.finished_reasons[1]["message"]
    assert out.finished_reasons[1][DETOKENIZER_ABORT]  # the tokenizer manager aborts it in the scheduler
    assert "bad" not in dm.detok.states and "good" in dm.detok.states
    more = tok.encode(" down.")
    out = dm.handle(_batch(["good"], [more], [{"type": "length"}], [True]))
    assert out.new_texts == [tok.decode(good + more)[len(tok.decode(good)):]] and not dm.detok.states


@pytest.mark.parametrize("name", ["ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
                                  "no_stop_trim"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_boolean_sampling_flags_must_be_booleans(name, value):
    with pytest.raises(SamplingParamsError, match=name):
        SamplingParams.from_dict({name: value}).verify()
    SamplingParams.from_dict({name: True}).verify()


def test_only_what_may_begin_a_stop_string_is_held_back():
    """Streamed with stop strings, each step sends all of its text except an end that could still begin one: a
    200-character stop string that never starts holds nothing back (it once held back the whole output)."""
    tok = tokenizer()
    ids = tok.encode(" The cat sat on the mat and then it went to sleep")
    words = [tok.decode(ids[:k]) for k in range(1, len(ids) + 1)]
    detok = IncrementalDetokenizer(tok)
    sent = "".join(detok.step("long", [t], None, stop_strs=["Z" * 200]) for t in ids)
    assert sent == words[-1]
    detok = IncrementalDetokenizer(tok)
    for k, t in enumerate(ids):
        delta = detok.step("tail", [t], None, stop_strs=["matt", "e wen"])
        text = words[k]
        held = max((n for s in ("matt", "e wen") for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        assert detok.states["tail"].sent == text[: len(text) - held], (k, delta)
