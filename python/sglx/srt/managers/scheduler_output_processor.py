"""The scheduler's second half: what happens to a step's results (SGLang's output-processor mixin).

Tokens (and the logprobs asked for) are appended to their requests, finished requests hand their KV to the
prefix cache, and the news goes out: token ids to the detokenizer, pooled vectors straight to the tokenizer
manager. The mixin reads the Scheduler's state (tree_cache, chunked_req, running_reqs, tokenizer, sockets).
"""

from __future__ import annotations

import time
from typing import List

import torch

from sglx.srt.managers.io_struct import BatchEmbeddingOut, BatchTokenIDOut
from sglx.srt.managers.schedule_batch import Req, ScheduleBatch, finish_abort, finish_length
from sglx.srt.model_executor.batch_result import BatchResult, HostSamplerOutput


class SchedulerOutputProcessorMixin:
    def process_batch_result(self, batch: ScheduleBatch, result: BatchResult) -> None:
        with self.profiler.annotate("sglx::wait_result"):
            out = result.host()  # waits for this batch's step (only)
        with self.profiler.annotate("sglx::process_result"):
            if self.is_embedding:
                self.process_embedding_result(batch, out)
            elif batch.forward_mode.is_extend():
                self.process_prefill_result(batch, out)
            else:
                self.process_decode_result(batch, out)

    def _append_token(self, i: int, req: Req, out: HostSamplerOutput) -> None:
        tok = out.next_token_ids[i]
        req.output_ids.append(tok)  # (kept even when refused below: an overlapped step may hold its KV slot)
        if req.grammar is not None and not req.grammar.accept_token(tok):
            # Only a grammar with no allowed token left gets here (its mask allowed nothing, so argmax chose).
            req.to_abort = f"the grammar allows no continuation of the output (token {tok})"
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        if req.return_logprob and out.next_token_logprobs is not None:
            req.output_token_logprobs.append((out.next_token_logprobs[i], tok))
            if req.top_logprobs_num > 0 and out.top_logprobs_val is not None:
                req.output_top_logprobs.append(list(zip(out.top_logprobs_val[i], out.top_logprobs_idx[i])))

    @staticmethod
    def _append_input_logprobs(batch: ScheduleBatch, out: HostSamplerOutput) -> None:
        """Each request's share of the prompt logprobs this extend computed (in the order it planned them)."""
        if not batch.input_logprob_indices or out.input_token_logprobs is None:
            return
        start = 0
        for req, count in zip(batch.reqs, batch.input_logprob_counts):
            end = start + count
            req.input_token_logprobs.extend(zip(out.input_token_logprobs[start:end],
                                                batch.input_logprob_targets[start:end]))
            if req.top_logprobs_num > 0 and out.input_top_logprobs_val is not None:
                k = req.top_logprobs_num
                req.input_top_logprobs.extend(
                    list(zip(val[:k], idx[:k]))
                    for val, idx in zip(out.input_top_logprobs_val[start:end], out.input_top_logprobs_idx[start:end])
                )
            start = end

    def process_prefill_result(self, batch: ScheduleBatch, out: HostSamplerOutput) -> None:
        self._append_input_logprobs(batch, out)
        for i, req in enumerate(batch.reqs):
            if req is self.chunked_req:
                # Only part of the prompt ran: cache it (so the next chunk continues from it), sample nothing.
                self.tree_cache.cache_unfinished_req(req, req.fill_ids)
                if req.to_abort is not None:
                    self.chunked_req = None
                    req.is_chunked = False
                    req.check_finished(self.tokenizer)
                    self.finish_req(req)
                continue
            req.is_chunked = False
            if req.sampling_params.max_new_tokens == 0:
                req.finished_reason = {"type": "length", "length": 0}
            else:
                self._append_token(i, req, out)
                req.check_finished(self.tokenizer)
            if req.finished():
                self.finish_req(req)
            else:
                # Insert the prompt now so that concurrent requests with the same prefix share it.
                self.tree_cache.cache_unfinished_req(req, req.fill_ids)
                self.running_reqs.append(req)
        self.stream_output(batch.reqs)

    def process_decode_result(self, batch: ScheduleBatch, out: HostSamplerOutput) -> None:
        live = []
        for i, req in enumerate(batch.reqs):
            if req.finished():  # finished on the previous step's token; this step ran ahead for it (overlap)
                continue
            self._append_token(i, req, out)
            req.check_finished(self.tokenizer)
            if req.finished():
                self.finish_req(req)
            live.append(req)
        self.running_reqs = [r for r in self.running_reqs if not r.finished()]
        self.stream_output(live)

    def process_embedding_result(self, batch: ScheduleBatch, embeddings: torch.Tensor) -> None:
        """Prefill, pool, finish: every request but a still-chunked one is done after this step."""
        for i, req in enumerate(batch.reqs):
            if req is self.chunked_req:  # last-token pooling of a long input: its last chunk comes later
                self.tree_cache.cache_unfinished_req(req, req.fill_ids)
                if req.to_abort is not None:
                    self.chunked_req = None
                    req.is_chunked = False
                    req.finished_reason = finish_abort(req.to_abort)
                    self.finish_req(req)
                continue
            req.is_chunked = False
            if req.to_abort is not None:
                req.finished_reason = finish_abort(req.to_abort)
            else:
                req.embedding = embeddings[i].tolist()
                req.finished_reason = finish_length(0)
            self.finish_req(req)
        self.stream_output(batch.reqs)

    def finish_req(self, req: Req) -> None:
        self.tree_cache.cache_finished_req(req, req.kv_token_ids())
        if req.finished_reason is not None and req.finished_reason.get("type") == "abort":
            self.num_aborted += 1

    # ------------------------------------------------------------------ output
    def stream_output(self, reqs: List[Req]) -> None:
        if self.is_embedding:
            self.stream_embedding_output(reqs)
            return
        out = BatchTokenIDOut([], [], [], [], [], [], [], [], [], [])
        for r in reqs:
            if r is self.chunked_req and not r.finished():
                continue
            if not r.finished() and not r.stream:
                continue
            new_ids = r.output_ids[r.send_offset :]
            if not new_ids and not r.finished():
                continue
            sp = r.sampling_params
            out.rids.append(r.rid)
            out.finished_reasons.append(r.finished_reason)
            out.new_output_ids.append(new_ids)
            out.prompt_tokens.append(len(r.origin_input_ids))
            out.completion_tokens.append(len(r.output_ids))
            out.cached_tokens.append(r.cached_tokens)
            out.first_token_times.append(r.first_token_time)
            out.skip_special_tokens.append(sp.skip_special_tokens)
            out.spaces_between_special_tokens.append(sp.spaces_between_special_tokens)
            out.no_stop_trim.append(sp.no_stop_trim)
            out.stop_strs.append(sp.stop_strs)
            if r.return_logprob:
                out.output_token_logprobs.append(r.output_token_logprobs[r.send_offset :])
                out.output_top_logprobs.append(
                    r.output_top_logprobs[r.send_offset :] if r.top_logprobs_num > 0 else None
                )
            else:
                out.output_token_logprobs.append(None)
                out.output_top_logprobs.append(None)
            if r.logprob_start_len >= 0:  # the prompt's logprobs not sent yet (all of them, on the first output)
                sent = r.input_logprobs_sent
                out.input_token_logprobs.append(r.input_token_logprobs[sent:])
                out.input_top_logprobs.append(r.input_top_logprobs[sent:] if r.top_logprobs_num > 0 else None)
                r.input_logprobs_sent = len(r.input_token_logprobs)
            else:
                out.input_token_logprobs.append(None)
                out.input_top_logprobs.append(None)
            r.send_offset = len(r.output_ids)
        if out.rids:
            self.send_to_detokenizer.send_pyobj(out)

    def stream_embedding_output(self, reqs: List[Req]) -> None:
        out = BatchEmbeddingOut([], [], [], [])
        for r in reqs:
            if not r.finished():
                continue
            out.rids.append(r.rid)
            out.embeddings.append(r.embedding if r.embedding is not None else [])
            out.prompt_tokens.append(len(r.origin_input_ids))
            out.finished_reasons.append(r.finished_reason)
        if out.rids:
            self.send_to_tokenizer.send_pyobj(out)
