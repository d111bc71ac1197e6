"""The detokenizer process: token ids in, text deltas out, incrementally and stop-string aware."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import zmq

from sglx.srt.hf_transformers_utils import get_tokenizer
from sglx.srt.managers.io_struct import BatchStrOut, BatchTokenIDOut
from sglx.srt.server_args import ServerArgs
from sglx.srt.utils import PortArgs, get_zmq_socket, partial_prefix_len

logger = logging.getLogger(__name__)

# Marks the finish reason of a request the detokenizer gave up on: the scheduler still runs it, so the tokenizer
# manager aborts it there (a scheduler-side abort needs no such message).
DETOKENIZER_ABORT = "detokenizer_abort"
# A token sequence cut mid-character decodes to U+FFFD; wait for the next token before emitting it.
REPLACEMENT_CHAR = "\ufffd"


@dataclass
class DecodeStatus:
    ids: List[int] = field(default_factory=list)
    text: str = ""  # text decoded so far from ids[:read_offset]
    surr_offset: int = 0
    read_offset: int = 0
    sent: str = ""  # text already sent to the tokenizer manager


class IncrementalDetokenizer:
    """Per-request incremental decoding: each step decodes only a short window of ids around the new ones,
    so the cost per token is constant (the same scheme vLLM and SGLang use)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.states: Dict[str, DecodeStatus] = {}

    def _decode(self, ids: List[int], skip: bool, spaces: bool) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip, spaces_between_special_tokens=spaces)

    def step(
        self,
        rid: str,
        new_ids: List[int],
        finished_reason: Optional[Dict[str, Any]],
        skip: bool = True,
        spaces: bool = True,
        no_stop_trim: bool = False,
        stop_strs: Optional[List[str]] = None,
    ) -> str:
        """Feed the new ids of `rid`; returns the text to send now."""
        st = self.states.setdefault(rid, DecodeStatus())
        matched = (finished_reason or {}).get("matched")
        if finished_reason and isinstance(matched, int) and not no_stop_trim and new_ids:
            new_ids = new_ids[:-1]  # a matched stop token is not part of the text
        st.ids.extend(new_ids)
        finished = finished_reason is not None
        surr = self._decode(st.ids[st.surr_offset : st.read_offset], skip, spaces)
        full = self._decode(st.ids[st.surr_offset :], skip, spaces)
        if len(full) > len(surr) and (finished or not full.endswith(REPLACEMENT_CHAR)):
            st.text += full[len(surr) :]
            st.surr_offset, st.read_offset = st.read_offset, len(st.ids)
        text = st.text
        if finished:
            if isinstance(matched, str) and not no_stop_trim:
                pos = text.find(matched)
                if pos >= 0:
                    text = text[:pos]
            self.states.pop(rid, None)
        elif stop_strs:
            # Hold back what could still turn into a stop string, so it is never streamed then retracted: only
            # an end of the text that begins one, not as many characters as the longest is long.
            hold = max(partial_prefix_len(text, s) for s in stop_strs)
            text = text[: max(len(text) - hold, len(st.sent))]
        delta = text[len(st.sent) :]
        st.sent = text
        return delta


class DetokenizerManager:
    def __init__(self, server_args: ServerArgs, port_args: PortArgs) -> None:
        ctx = zmq.Context(2)
        self.recv_from_scheduler = get_zmq_socket(ctx, zmq.PULL, port_args.detokenizer_ipc, bind=True)
        self.send_to_tokenizer = get_zmq_socket(ctx, zmq.PUSH, port_args.tokenizer_ipc, bind=False)
        self.detok = IncrementalDetokenizer(get_tokenizer(server_args.tokenizer_path))

    def handle(self, m: BatchTokenIDOut) -> BatchStrOut:
        """Decode every request of the batch. One that fails ends aborted with the error as its message (the
        tokenizer manager then aborts it in the scheduler); the others, and the process, go on."""
        texts, reasons = [], list(m.finished_reasons)
        for i, rid in enumerate(m.rids):
            try:
                texts.append(self.detok.step(rid, m.new_output_ids[i], reasons[i], m.skip_special_tokens[i],
                                             m.spaces_between_special_tokens[i], m.no_stop_trim[i], m.stop_strs[i]))
            except Exception as e:  # noqa: BLE001 - one request's bad state must not take the server down
                logger.exception("detokenizing request %s failed", rid)
                self.detok.states.pop(rid, None)
                texts.append("")
                reasons[i] = {"type": "abort", "message": f"detokenization failed: {e}", DETOKENIZER_ABORT: True}
        return BatchStrOut(
            rids=m.rids, finished_reasons=reasons, new_texts=texts, new_output_ids=m.new_output_ids,
            prompt_tokens=m.prompt_tokens, completion_tokens=m.completion_tokens, cached_tokens=m.cached_tokens,
            output_token_logprobs=m.output_token_logprobs, output_top_logprobs=m.output_top_logprobs,
            input_token_logprobs=m.input_token_logprobs, input_top_logprobs=m.input_top_logprobs,
            first_token_times=m.first_token_times,
        )

    def event_loop(self) -> None:
        while True:
            msg = self.recv_from_scheduler.recv_pyobj()
            if isinstance(msg, BatchTokenIDOut):
                self.send_to_tokenizer.send_pyobj(self.handle(msg))
            else:
                self.send_to_tokenizer.send_pyobj(msg)  # pass-through (e.g. embeddings)


def run_detokenizer_process(server_args: ServerArgs, port_args: PortArgs) -> None:
    from sglx.srt.utils import configure_logger, set_parent_death_signal

    set_parent_death_signal()
    configure_logger(server_args, prefix="detokenizer")
    try:
        DetokenizerManager(server_args, port_args).event_loop()
    except Exception:
        logger.exception("detokenizer crashed")
        raise SystemExit(1)
