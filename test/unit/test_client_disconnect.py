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
    tm.embedding_lowercase, tm.tokenizer = False, None
    tm.rid_to_state, tm.send_to_scheduler = {}, Sent()
    tm._ensure_loop = lambda: None  # no detokenizer socket: the test dispatches outputs itself
    return tm


def _aborted(tm) -> list:
    return [m.rid for m in tm.send_to_scheduler.msgs if isinstance(m, AbortReq)]


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
    assert not tm.rid_to_state
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
    assert _aborted(tm) == [rid] and not tm.rid_to_state


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
    assert rids[1] in aborted and not states


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
