"""An in-process Scheduler on a tiny random-weight Llama, and workloads to drive it (unit and GPU tests)."""

from __future__ import annotations

import json
import random
from typing import Dict, List, Optional, Set, Tuple

from sglx.srt.managers.io_struct import TokenizedGenerateReqInput
from sglx.srt.managers.scheduler import Scheduler
from sglx.srt.sampling.sampling_params import SamplingParams
from sglx.srt.server_args import ServerArgs, default_model_path

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 49152,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
}


class Sink:
    def __init__(self) -> None:
        self.msgs = []

    def send_pyobj(self, o) -> None:
        self.msgs.append(o)


def make_scheduler(tmp_path, config: Optional[dict] = None, **kw) -> Scheduler:
    """A Scheduler without sockets (its outputs collect in a Sink); CPU unless `device` says otherwise."""
    (tmp_path / "config.json").write_text(json.dumps(config or TINY_LLAMA))
    kw.setdefault("device", "cpu")
    if "tokenizer_path" not in kw:
        kw["tokenizer_path"] = default_model_path()
    sa = ServerArgs(model_path=str(tmp_path), load_format="dummy", **kw)
    s = Scheduler(sa, None)
    s.send_to_detokenizer = s.send_to_tokenizer = Sink()
    return s


def submit(s: Scheduler, rid: str, ids, max_new: int) -> None:
    sp = SamplingParams(max_new_tokens=max_new, temperature=0, ignore_eos=True)
    sp.verify()
    sp.normalize()
    s.process_input(TokenizedGenerateReqInput(rid, None, ids, sp))


def run_until_idle(s: Scheduler, max_steps: int = 20000, outputs=None):
    """Step the scheduler (overlapped unless the scheduler was built with it off) until it is idle (then its
    `on_idle`, as the event loop); returns
    {rid: (finish reason, completion tokens)} and, if given, fills `outputs` with each request's streamed ids."""
    finished = {}
    for _ in range(max_steps):
        if s.is_idle():
            s.on_idle()  # as the event loop does
            return finished
        assert s.step() or s.grammar_manager.pending, f"scheduler stuck: {s.internal_state()}"
        for m in s.send_to_detokenizer.msgs:
            for rid, fr, n, ids in zip(m.rids, m.finished_reasons, m.completion_tokens, m.new_output_ids):
                assert rid not in finished, f"{rid} streamed after it finished"
                if outputs is not None:
                    outputs.setdefault(rid, []).extend(ids)
                if fr is not None:
                    finished[rid] = (fr, n)
        s.send_to_detokenizer.msgs.clear()
    raise AssertionError("did not finish")


def mixed_sampling_workload(s: Scheduler) -> Set[str]:
    """Requests that end at different steps, by length, eos or a stop id, with sampling that depends on the
    output count (seeded noise, min_new_tokens) or on the output ids (a penalty: counted on the device). Returns
    the ids of the requests whose tokens depend on nothing but their own logits (greedy or seeded)."""
    rng = random.Random(7)
    deterministic = set()
    for i in range(40):
        max_new = rng.choice([1, 2, 5, 17, 40])
        sp = SamplingParams(
            max_new_tokens=max_new, temperature=rng.choice([0.0, 0.8]), top_k=rng.choice([-1, 20]),
            sampling_seed=i if i % 2 else None, min_new_tokens=min(max_new, rng.choice([0, 3])),
            stop_token_ids=[rng.randrange(100, 200)] if i % 5 == 0 else None,
            frequency_penalty=0.5 if i == 13 else 0.0, ignore_eos=i % 3 == 0,
        )
        sp.verify()
        sp.normalize()
        ids = [rng.randrange(100, 40000) for _ in range(rng.choice([4, 30, 90]))]
        s.process_input(TokenizedGenerateReqInput(str(i), None, ids, sp, return_logprob=i % 4 == 0,
                                                  top_logprobs_num=2 if i % 8 == 0 else 0))
        if sp.is_greedy or sp.sampling_seed is not None:
            deterministic.add(str(i))
    return deterministic


def run_both_schedules(make) -> Dict[bool, Tuple[dict, Dict[str, List[int]], Set[str], Scheduler]]:
    """mixed_sampling_workload on a fresh scheduler per mode (make(disable_overlap_schedule=...)); per mode
    (True = overlap): finish reasons, streamed ids, the deterministic request ids and the scheduler."""
    results = {}
    for overlap in (False, True):
        s = make(disable_overlap_schedule=not overlap)
        deterministic = mixed_sampling_workload(s)
        outputs: Dict[str, List[int]] = {}
        finished = run_until_idle(s, outputs=outputs)
        results[overlap] = (finished, outputs, deterministic, s)
    return results
