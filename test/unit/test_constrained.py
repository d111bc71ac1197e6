"""Structured output: vocab masks against xgrammar's own kernel, masks against the tokenizer's strings, and
constrained requests through the scheduler (overlap and sync, chunked prefill, retraction, aborts), with every
output checked by python's re / json rather than by the grammar library that produced it."""

from __future__ import annotations

import json
import re
import zlib

import pytest
import torch

from sglx.srt.constrained.base_grammar_backend import (
    GrammarError,
    allocate_vocab_mask,
    apply_vocab_mask,
    create_grammar_backend,
)
from sglx.srt.layers.sampler import Sampler
from sglx.srt.managers.io_struct import AbortReq, TokenizedGenerateReqInput
from sglx.srt.sampling.sampling_batch_info import SamplingBatchInfo
from sglx.srt.sampling.sampling_params import SamplingParams, SamplingParamsError
from sglx.srt.server_args import default_model_path
from sglx.test.sampling_utils import req
from sglx.test.scheduler_utils import make_scheduler, run_until_idle

xgr = pytest.importorskip("xgrammar")

# Every field bounded: random weights would otherwise write digits of "n" until max_new_tokens.
PERSON = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                            "maximum": 99},
                                           "tag": {"enum": ["alpha", "beta"]}},
          "required": ["ok", "n", "tag"]}


@pytest.fixture(scope="module")
def tokenizer():
    from sglx.srt.hf_transformers_utils import get_tokenizer

    return get_tokenizer(default_model_path())


@pytest.fixture(scope="module")
def backend(tokenizer):
    return create_grammar_backend("xgrammar", tokenizer, 49152, [2])


def test_vocab_mask_matches_xgrammar_kernel():
    torch.manual_seed(0)
    for vocab in (32, 100, 49152):
        mask = torch.randint(-(1 << 31), 1 << 31, (3, (vocab + 31) // 32), dtype=torch.int64).to(torch.int32)
        logits = torch.randn(3, vocab)
        want = logits.clone()
        xgr.apply_token_bitmask_inplace(want, mask)
        assert torch.equal(apply_vocab_mask(logits, mask), want)
    full = allocate_vocab_mask(2, 70)
    assert full.shape == (2, 3) and torch.equal(apply_vocab_mask(torch.ones(2, 70), full), torch.ones(2, 70))


def _allowed(grammar, vocab=49152):
    mask = allocate_vocab_mask(1, vocab)
    grammar.fill_vocab_mask(mask, 0)
    return set(torch.nonzero(apply_vocab_mask(torch.zeros(1, vocab), mask)[0] == 0).flatten().tolist())


def test_regex_mask_is_exactly_the_tokens_the_regex_allows(tokenizer, backend):
    """`[0-9]+`: first the tokens that are one or more digits (never the stop token), then also the stop token
    once a digit was taken; the token strings come from the tokenizer, not from the grammar library."""
    g = backend.compile(("regex", "[0-9]+")).copy()
    digits = {i for i in range(len(tokenizer)) if re.fullmatch("[0-9]+", tokenizer.decode([i]))}
    assert digits and _allowed(g) == digits
    assert g.accept_token(min(digits)) and not g.is_terminated()
    assert _allowed(g) == digits | {2}
    assert not g.accept_token(tokenizer.encode("a")[0])  # refused, state unchanged
    assert g.accept_token(2) and g.is_terminated()


def test_bad_specs_raise_grammar_error(backend):
    for key in [("regex", "([a-"), ("json", '{"type": "strang"}'), ("ebnf", "root ::= ")]:
        with pytest.raises(GrammarError):
            backend.compile(key)


def test_sampling_params_constraint_checks():
    with pytest.raises(SamplingParamsError, match="only one"):
        SamplingParams(regex="a", ebnf='root ::= "a"').verify()
    with pytest.raises(SamplingParamsError, match="not valid JSON"):
        SamplingParams(json_schema="{nope").verify()
    for bad in ({"regex": 3}, {"regex": ""}, {"ebnf": ["x"]}):
        with pytest.raises(SamplingParamsError, match="non-empty string"):
            SamplingParams(**bad).verify()
    assert SamplingParams.from_dict({"json_schema": "{}"}).has_constraint


@pytest.mark.parametrize("all_greedy", [True, False])
def test_sampler_only_draws_allowed_tokens(backend, all_greedy):
    """Masked rows sample only allowed ids (greedy: the best allowed one), unmasked rows are untouched."""
    torch.manual_seed(1)
    reqs = [req(temperature=0.0 if all_greedy else 1.0) for _ in range(4)]
    reqs[1].grammar = backend.compile(("regex", "(yes|no)")).copy()
    reqs[3].grammar = backend.compile(("regex", "[0-9]+")).copy()
    info = SamplingBatchInfo.from_reqs(reqs, 49152, torch.device("cpu"))
    assert info.vocab_mask.shape == (2, 1536) and info.vocab_mask_rows.tolist() == [1, 3]
    logits = torch.randn(4, 49152)
    for _ in range(20):
        ids = Sampler()(logits, info).next_token_ids.tolist()
        for row in (1, 3):
            allowed = sorted(_allowed(reqs[row].grammar))
            assert ids[row] in allowed
            if all_greedy:
                assert ids[row] == allowed[int(torch.argmax(logits[row, allowed]))]
        if all_greedy:
            assert ids[0] == int(torch.argmax(logits[0])) and ids[2] == int(torch.argmax(logits[2]))


# ---------------------------------------------------------------- through the scheduler (tiny random Llama)


def _submit(s, rid, constraint, max_new=64, prompt_len=30, **kw):
    # (zlib, not hash(): str hashes change from process to process, and so would the outputs)
    sp = SamplingParams(max_new_tokens=max_new, temperature=1.0, sampling_seed=zlib.crc32(rid.encode()) % 1000,
                        **constraint, **kw)
    sp.verify()
    sp.normalize()
    s.process_input(TokenizedGenerateReqInput(rid, None, list(range(100, 100 + prompt_len)), sp))


def _check_person(text):
    obj = json.loads(text)
    assert set(obj) == {"ok", "n", "tag"}, obj
    assert isinstance(obj["ok"], bool) and isinstance(obj["n"], int) and obj["tag"] in ("alpha", "beta")
    assert 0 <= obj["n"] <= 99


CONSTRAINTS = {
    "json": ({"json_schema": json.dumps(PERSON)}, _check_person),
    "regex": ({"regex": r"[0-9]{3}-(yes|no)"}, lambda t: re.fullmatch(r"[0-9]{3}-(yes|no)", t) or pytest.fail(t)),
    "ebnf": ({"ebnf": 'root ::= "x" ("y" | "z")+ "!"'}, lambda t: re.fullmatch(r"x[yz]+!", t) or pytest.fail(t)),
}


@pytest.mark.parametrize("overlap", [True, False])
def test_constrained_requests_complete_valid_beside_free_ones(tmp_path, overlap):
    """Random weights would never close a JSON object by themselves: every constrained request still ends on
    its grammar's stop token with a valid output, ignore_eos or not, in the same batches as free requests."""
    s = make_scheduler(tmp_path, max_total_tokens=4096, chunked_prefill_size=64,
                       constrained_json_disable_any_whitespace=True, disable_overlap_schedule=not overlap)
    for i in range(12):
        kind = list(CONSTRAINTS)[i % 3]
        # Long prompts are chunked (64): their rows sample and discard while the grammar must not move.
        _submit(s, f"{kind}{i}", CONSTRAINTS[kind][0], prompt_len=150 if i % 4 == 0 else 30, ignore_eos=i % 2 == 0)
        _submit(s, f"free{i}", {}, max_new=20)
    split = []  # overlapped steps whose sampling waited for the previous step's tokens
    real_launch = s.launch_batch
    s.launch_batch = lambda batch, *a, **kw: split.append(kw.get("before_sampling")) or real_launch(batch, *a, **kw)
    outputs = {}
    finished = run_until_idle(s, outputs=outputs)
    assert len(finished) == 24 and s.internal_state()["kv_leak_free"]
    assert (sum(f is not None for f in split) > 10) == overlap
    for rid, (fr, n) in finished.items():
        if rid.startswith("free"):
            assert fr["type"] == "length" and n == 20
            continue
        assert fr == {"type": "stop", "matched": 2}, (rid, fr)
        assert outputs[rid][-1] == 2 and 2 not in outputs[rid][:-1]
        CONSTRAINTS[rid.rstrip("0123456789")][1](s.tokenizer.decode(outputs[rid][:-1]))


def test_retracted_constrained_request_resumes_its_grammar(tmp_path):
    """A tiny pool forces retraction mid-output: the resumed request continues its grammar where it was."""
    # ~80 output tokens each; admission reserves 0.7 x 100 + 10 per request, so six start in a 500-token pool
    # and must outgrow it.
    s = make_scheduler(tmp_path, max_total_tokens=500, max_running_requests=12,
                       constrained_json_disable_any_whitespace=True)
    schema = json.dumps({"type": "array", "items": {"enum": ["alpha", "beta", "gamma"]}, "minItems": 16,
                         "maxItems": 16})
    for i in range(12):
        _submit(s, f"a{i}", {"json_schema": schema}, max_new=100, prompt_len=10)
    outputs = {}
    finished = run_until_idle(s, outputs=outputs)
    assert len(finished) == 12 and s.internal_state()["num_retracted_reqs"] > 0
    for rid, (fr, _) in finished.items():
        assert fr["type"] == "stop", (rid, fr, s.tokenizer.decode(outputs[rid]))
        items = json.loads(s.tokenizer.decode(outputs[rid][:-1]))
        assert len(items) == 16 and set(items) <= {"alpha", "beta", "gamma"}


def test_bad_constraint_and_abort_in_the_grammar_queue(tmp_path):
    s = make_scheduler(tmp_path, max_total_tokens=4096)
    _submit(s, "bad", {"regex": "([a-"})
    _submit(s, "gone", {"regex": "[a-z]{5}"})
    s.process_input(AbortReq(rids=["gone"]))  # aborted before its grammar was taken from the queue
    _submit(s, "short", {"regex": "[a-z]+"}, max_new=3)
    _submit(s, "empty", {"ebnf": "root ::= root"})  # compiles, but allows no first token
    outputs = {}
    finished = run_until_idle(s, outputs=outputs)
    assert finished["bad"][0]["type"] == "abort" and finished["bad"][0]["status_code"] == 400
    assert "Unclosed" in finished["bad"][0]["message"]
    assert finished["gone"][0] == {"type": "abort", "message": "aborted by the client", "status_code": 400}
    assert finished["empty"][0]["status_code"] == 400 and "matches no output" in finished["empty"][0]["message"]
    assert finished["short"][0]["type"] == "length"  # max_new_tokens ends it before the grammar does
    assert re.fullmatch("[a-z]+", s.tokenizer.decode(outputs["short"]))
    assert s.internal_state()["num_grammar_queue_reqs"] == 0 and s.is_idle()


def test_grammar_backend_none_refuses_constraints(tmp_path):
    s = make_scheduler(tmp_path, max_total_tokens=4096, grammar_backend="none")
    _submit(s, "x", {"regex": "a"})
    finished = run_until_idle(s)
    assert finished["x"][0]["status_code"] == 400 and "--grammar-backend none" in finished["x"][0]["message"]


def test_one_compile_per_distinct_spec(tmp_path, monkeypatch):
    s = make_scheduler(tmp_path, max_total_tokens=4096)
    calls = []
    real = s.grammar_manager._compile
    monkeypatch.setattr(s.grammar_manager, "_compile", lambda key: calls.append(key) or real(key))
    for i in range(6):
        _submit(s, str(i), {"regex": "[0-9]{2}" if i % 2 else "[a-z]{2}"}, max_new=8)
    finished = run_until_idle(s)
    assert len(finished) == 6 and sorted(calls) == [("regex", "[0-9]{2}"), ("regex", "[a-z]{2}")]


def test_a_grammar_left_with_no_allowed_token_aborts(tmp_path):
    """min_new_tokens forbids the stop token that the finished grammar `a` requires: every logit is -inf, so
    the argmax is not the model's choice; the request ends aborted, saying why, and its KV goes back."""
    s = make_scheduler(tmp_path, max_total_tokens=4096)
    sp = SamplingParams(max_new_tokens=8, min_new_tokens=3, temperature=0.0, regex="a")
    sp.verify()
    sp.normalize()
    s.process_input(TokenizedGenerateReqInput("r", None, list(range(100, 110)), sp))
    outputs = {}
    finished = run_until_idle(s, outputs=outputs)
    assert finished["r"][0]["type"] == "abort" and "no continuation" in finished["r"][0]["message"]
    assert s.tokenizer.decode(outputs["r"][:1]) == "a" and len(outputs["r"]) == 2
    assert s.internal_state()["kv_leak_free"]


# ---------------------------------------------------------------- constraint after the reasoning
def test_reasoner_grammar_gates_its_grammar(tokenizer, backend):
    """The masks come from the tokenizer's strings, not from the wrapper: before the start tag the regex's
    tokens and the start tag, inside the reasoning every token, after the end tag the regex's tokens again."""
    from sglx.srt.constrained.reasoner_grammar import ReasonerGrammarObject

    digits = {i for i in range(len(tokenizer)) if re.fullmatch("[0-9]+", tokenizer.decode([i]))}
    letter = tokenizer.encode("a")[0]
    # a start id in the sign bit of its mask word, where an int32 write could overflow
    start = next(i for i in range(31, 49152, 32) if i not in digits)
    end = next(i for i in range(200, 49152) if i not in digits and i != start)
    inner = backend.compile(("regex", "[0-9]+"))
    g = ReasonerGrammarObject(inner.copy(), end, start)
    assert _allowed(g) == digits | {start}
    assert not g.accept_token(letter) and _allowed(g) == digits | {start}  # refused: still at the start
    assert g.accept_token(start) and _allowed(g) == set(range(49152))
    assert g.accept_token(letter) and g.accept_token(start) and not g.is_terminated()  # anything, thinking
    assert g.accept_token(end) and _allowed(g) == digits and not g.is_terminated()
    assert not g.accept_token(letter)
    assert g.accept_token(min(digits)) and g.accept_token(2) and g.is_terminated()
    # A model that answers at once is constrained from its first token; a copy starts over.
    g2 = g.copy()
    assert g2.accept_token(min(digits)) and _allowed(g2) == digits | {2}
    assert g2.accept_token(2) and g2.is_terminated() and g.copy().state == "start"
    # Without a start tag (DeepSeek-R1: the prompt opened the reasoning) the output starts inside it.
    g3 = ReasonerGrammarObject(inner.copy(), end)
    assert _allowed(g3) == set(range(49152)) and g3.accept_token(letter) and g3.accept_token(end)
    assert _allowed(g3) == digits


def _run_alone(s, rid, prompt, seed, **kw):
    sp = SamplingParams(max_new_tokens=40, temperature=1.0, sampling_seed=seed, ignore_eos=True, **kw)
    sp.verify()
    sp.normalize()
    s.process_input(TokenizedGenerateReqInput(rid, None, prompt, sp))
    outputs = {}
    finished = run_until_idle(s, outputs=outputs)
    return finished[rid][0], outputs[rid]


def check_constraint_after_reasoning(s, regex, decode, stop=2):
    """The reference is the same seeded request without any constraint: up to and including the end tag the
    constrained-after-reasoning output is token for token that free output (the reasoning is not touched),
    and what follows matches `regex` (python's re over `decode`). Without the flag the regex holds at once.
    Also run on CUDA (test/gpu/test_constrained_gpu.py)."""
    prompt, seed = list(range(300, 330)), 7
    _, free = _run_alone(s, "free", prompt, seed)
    k = next(i for i in range(8, len(free)) if free[i] not in free[:i] and free[i] != stop)
    start, end = free[0], free[k]  # the model "opens" its reasoning with its first token, closes it at k
    split = []  # overlapped steps whose sampling waited for the previous step's tokens
    real_launch = s.launch_batch
    s.launch_batch = lambda batch, *a, **kw: split.append(kw.get("before_sampling") is not None) or \
        real_launch(batch, *a, **kw)
    for tags, rid in [((start, end), "opened"), ((None, end), "open-from-the-prompt")]:
        s.grammar_manager.reasoning_tags = tags
        split.clear()
        fr, out = _run_alone(s, rid, prompt, seed, regex=regex, constrain_after_reasoning=True)
        assert out[: k + 1] == free[: k + 1], rid
        assert fr == {"type": "stop", "matched": stop} and out[-1] == stop, (rid, fr)
        assert re.fullmatch(regex, decode(out[k + 1:-1])), decode(out[k + 1:-1])
        # While it thinks no step waits (the mask after the end tag is picked on the device, resolve_gates);
        # once its answer is constrained, every step does.
        assert sum(split) <= len(out) - k, (rid, sum(split), len(out), k)
        if s.enable_overlap:
            assert sum(split) >= len(out) - k - 3 and not any(split[:k - 2]), (rid, split)
    s.launch_batch = real_launch
    # A model that does not open its reasoning is held to the constraint from its first token.
    s.grammar_manager.reasoning_tags = (start, end)
    fr, out = _run_alone(s, "no-thinking", prompt, seed, regex=regex, constrain_after_reasoning=True,
                         logit_bias={str(start): -100.0})
    assert fr["type"] == "stop" and re.fullmatch(regex, decode(out[:-1]))
    fr, out = _run_alone(s, "flag-off", prompt, seed, regex=regex)
    assert fr["type"] == "stop" and re.fullmatch(regex, decode(out[:-1]))
    assert s.internal_state()["kv_leak_free"]


def test_the_prompt_end_decides_where_a_reasoning_constraint_starts(backend):
    """A prompt that ends by opening the reasoning (a template's `<think>`, then a newline) starts the gate
    inside it, even for a format whose model opens it itself; one that ends by closing it gets the plain
    grammar (constrained from the first token); otherwise the format's own start."""
    from sglx.srt.constrained.reasoner_grammar import ReasonerGrammarObject
    from sglx.srt.managers.grammar_manager import GrammarManager

    inner = backend.compile(("regex", "[0-9]+"))
    start, end, nl = 7, 8, 198

    def grammar(prompt, tags=(start, end), flag=True):
        gm = GrammarManager(lambda: backend, reasoning_tags=tags)
        return gm._request_grammar(req(prompt, regex="[0-9]+", constrain_after_reasoning=flag), inner)

    opened, default, closed = grammar([5, start, nl]), grammar([5, 6, nl]), grammar([5, start, end, nl, nl])
    assert isinstance(opened, ReasonerGrammarObject) and opened.state == "reasoning"
    assert opened.start_token_id is None  # the start tag is no longer special: it was already written
    assert isinstance(default, ReasonerGrammarObject) and default.state == "start"
    assert not isinstance(closed, ReasonerGrammarObject)
    assert grammar([5, nl], tags=(None, end)).state == "reasoning"  # DeepSeek-R1: opened by every prompt
    assert not isinstance(grammar([5, end, nl], tags=(None, end)), ReasonerGrammarObject)  # V3.1 thinking off
    assert not isinstance(grammar([5, start, nl], flag=False), ReasonerGrammarObject)


def test_gated_mask_rows_switch_on_the_token_in_flight(backend):
    """A thinking row built with a token in flight: its mask allows everything, and resolve_gates turns it
    into the grammar's first mask exactly where the device's last token is the end tag."""
    from sglx.srt.constrained.reasoner_grammar import ReasonerGrammarObject

    inner = backend.compile(("regex", "[0-9]+"))
    reqs = [req(temperature=1.0) for _ in range(3)]
    for i, r in enumerate(reqs):
        r.grammar = ReasonerGrammarObject(inner.copy(), end_token_id=40 + i)
        r.grammar.state = "reasoning"
        r.req_pool_idx = 5 + i
    reqs[2].grammar.state = "answer"  # (a real batch with it would be built without a token in flight)
    info = SamplingBatchInfo.from_reqs(reqs[:2], 49152, torch.device("cpu"), inflight_tokens=1)
    assert info.gate_mask_rows.tolist() == [0, 1] and info.gate_pool_rows.tolist() == [5, 6]
    assert bool((info.vocab_mask == -1).all())
    first = allocate_vocab_mask(1, 49152)
    inner.copy().fill_vocab_mask(first, 0)
    last = torch.zeros(10, dtype=torch.int64)
    last[5], last[6] = 40, 99  # row 0's token in flight closed its reasoning, row 1's did not
    info.resolve_gates(last)
    assert torch.equal(info.vocab_mask[0], first[0]) and bool((info.vocab_mask[1] == -1).all())
    assert SamplingBatchInfo.from_reqs(reqs[:2], 49152, torch.device("cpu")).gate_mask_rows is None
    with pytest.raises(ValueError, match="grammars need every output id"):
        SamplingBatchInfo.from_reqs(reqs, 49152, torch.device("cpu"), inflight_tokens=1)


@pytest.mark.parametrize("overlap", [True, False])
def test_constraint_after_the_reasoning_through_the_scheduler(tmp_path, overlap):
    s = make_scheduler(tmp_path, max_total_tokens=4096, disable_overlap_schedule=not overlap)
    check_constraint_after_reasoning(s, r"[0-9]{3}-(yes|no)", s.tokenizer.decode)
