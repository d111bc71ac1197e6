"""Continuous batching, prefix reuse and the native/OpenAI surfaces on a real server."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import requests

GREEDY = {"temperature": 0}


def generate(server, payload, timeout=300):
    r = requests.post(server.url("/generate"), json=payload, timeout=timeout)
    r.raise_for_status()
    return r.json()


def stream_generate(server, text, max_new_tokens):
    with requests.post(server.url("/generate"), json={
        "text": text, "stream": True, "sampling_params": {"max_new_tokens": max_new_tokens, **GREEDY}},
            stream=True, timeout=600) as r:
        r.raise_for_status()
        last = None
        for line in r.iter_lines():
            if not line:
                continue
            assert line.startswith(b"data: ")
            if line == b"data: [DONE]":
                break
            last = json.loads(line[6:])
        return last


def test_concurrent_streams_match_sequential(server):
    prompts = [f"Story {i}: Once upon a time, in a village number {i}," for i in range(32)]
    sequential = [generate(server, {"text": p, "sampling_params": {"max_new_tokens": 24, **GREEDY}})["text"]
                  for p in prompts]
    requests.post(server.url("/flush_cache"), timeout=30)
    with ThreadPoolExecutor(32) as pool:
        concurrent = list(pool.map(lambda p: stream_generate(server, p, 24), prompts))
    assert [c["text"] for c in concurrent] == sequential
    assert all(c["meta_info"]["finish_reason"]["type"] == "length" for c in concurrent)


def test_prefix_cache_reports_cached_tokens(server):
    prefix = " ".join(f"item{i}" for i in range(260))  # > 500 tokens
    first = generate(server, {"text": prefix + " First question?", "sampling_params": {"max_new_tokens": 2}})
    assert first["meta_info"]["prompt_tokens"] > 500
    second = generate(server, {"text": prefix + " Another question entirely?",
                               "sampling_params": {"max_new_tokens": 2}})
    assert second["meta_info"]["cached_tokens"] >= 496


def test_batch_generate_and_n(server):
    out = generate(server, {"text": ["Hello", "The sky is"], "sampling_params": {"max_new_tokens": 4, **GREEDY}})
    assert isinstance(out, list) and len(out) == 2
    single = generate(server, {"text": "The sky is", "sampling_params": {"max_new_tokens": 4, **GREEDY}})
    assert out[1]["text"] == single["text"]
    # n: each prompt's samples one after another, as SGLang orders them.
    out = generate(server, {"text": ["Hello", "The sky is"], "sampling_params": {"max_new_tokens": 4, "n": 2, **GREEDY}})
    assert [o["text"] for o in out[2:]] == [single["text"]] * 2 and out[0]["text"] == out[1]["text"]
    # A seeded sample j is the single request seeded seed + j: the n samples differ and are reproducible.
    sp = {"max_new_tokens": 12, "temperature": 1.0, "sampling_seed": 11}
    many = generate(server, {"text": "Once upon a time", "sampling_params": {**sp, "n": 3}, "rid": "nreq"})
    assert isinstance(many, list) and len(many) == 3
    assert [m["meta_info"]["id"] for m in many] == ["nreq-0", "nreq-1", "nreq-2"]
    for j, m in enumerate(many):
        alone = generate(server, {"text": "Once upon a time", "sampling_params": {**sp, "sampling_seed": 11 + j}})
        assert m["output_ids"] == alone["output_ids"]
    assert len({tuple(m["output_ids"]) for m in many}) > 1


def test_penalties_batched_match_alone_and_a_dropped_stream_frees_its_row(server):
    """Penalized greedy requests give the same text alone and batched with others (their device counts are
    per request), a penalty changes what is written, and a penalized stream the client drops is aborted: the
    autouse leak check then finds no count row still held (`penalty_rows_live`)."""
    prompt = "Count with me: one, two, three, four,"
    pen = {"max_new_tokens": 20, **GREEDY, "frequency_penalty": 1.5, "presence_penalty": 0.5}
    rep = {"max_new_tokens": 20, **GREEDY, "repetition_penalty": 1.6}
    alone = [generate(server, {"text": prompt, "sampling_params": sp})["output_ids"] for sp in (pen, rep)]
    plain = generate(server, {"text": prompt, "sampling_params": {"max_new_tokens": 20, **GREEDY}})["output_ids"]
    assert plain not in alone
    jobs = [(prompt, pen), (prompt, rep)] + [(f"Story {i}: the", {"max_new_tokens": 20, **GREEDY,
                                                               "frequency_penalty": 0.1 * i}) for i in range(6)]
    with ThreadPoolExecutor(len(jobs)) as ex:
        batched = list(ex.map(lambda j: generate(server, {"text": j[0], "sampling_params": j[1]})["output_ids"],
                              jobs))
    assert batched[:2] == alone
    aborted = server.server_info()["internal_state"]["num_aborted_reqs"]
    with requests.post(server.url("/generate"), json={
            "text": prompt, "stream": True, "sampling_params": {**pen, "max_new_tokens": 2000, "ignore_eos": True}},
            stream=True, timeout=60) as r:
        lines = r.iter_lines()
        assert sum(1 for line, _ in zip(lines, range(4)) if line) >= 1  # a few chunks, then the client leaves
    state = server.wait_idle()
    assert state["num_aborted_reqs"] == aborted + 1 and state["penalty_rows_live"] == 0, state


def test_stop_strings_are_not_leaked(server):
    base = generate(server, {"text": "Count: 1, 2, 3, 4,", "sampling_params": {"max_new_tokens": 12, **GREEDY}})
    text = base["text"]
    assert "," in text[1:]
    stop = text[text.index(",", 1):][:2]
    out = generate(server, {"text": "Count: 1, 2, 3, 4,",
                            "sampling_params": {"max_new_tokens": 12, "stop": stop, **GREEDY}})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == text[: text.index(stop)]
    assert stop not in out["text"]


def test_seeded_sampling_is_reproducible(server):
    sp = {"max_new_tokens": 16, "temperature": 1.0, "top_p": 0.9, "top_k": 50, "sampling_seed": 7}
    a = generate(server, {"text": "Once upon a time", "sampling_params": sp})
    b = generate(server, {"text": "Once upon a time", "sampling_params": sp})
    assert a["output_ids"] == b["output_ids"]


def test_logprobs_native(server):
    out = generate(server, {"text": "The capital of France is", "return_logprob": True, "top_logprobs_num": 3,
                            "return_text_in_logprobs": True, "sampling_params": {"max_new_tokens": 3, **GREEDY}})
    lps = out["meta_info"]["output_token_logprobs"]
    tops = out["meta_info"]["output_top_logprobs"]
    assert [t[1] for t in lps] == out["output_ids"]
    for (lp, tid, _), top in zip(lps, tops):
        assert len(top) == 3 and top[0][1] == tid and abs(top[0][0] - lp) < 1e-5  # greedy picks the top token
        assert top[0][0] >= top[1][0] >= top[2][0]


def test_prompt_logprobs_native_and_openai_echo(server):
    """A prompt scored from logprob_start_len agrees with itself across APIs, and with the output logprobs of
    the same tokens generated from a shorter prompt (the decode path): prompt P + [t] scores t as P's greedy
    output t was scored."""
    gen = generate(server, {"text": "The capital of France is", "return_logprob": True,
                            "sampling_params": {"max_new_tokens": 4, **GREEDY}})
    n = gen["meta_info"]["prompt_tokens"]
    ids = generate(server, {"text": "The capital of France is", "return_logprob": True, "logprob_start_len": 0,
                            "sampling_params": {"max_new_tokens": 0}})["meta_info"]["input_token_logprobs"]
    full = [t for _, t, _ in ids] + gen["output_ids"]
    out = generate(server, {"input_ids": full, "return_logprob": True, "logprob_start_len": 1, "top_logprobs_num": 2,
                            "return_text_in_logprobs": True, "sampling_params": {"max_new_tokens": 1, **GREEDY}})
    meta = out["meta_info"]
    scored = meta["input_token_logprobs"]
    assert len(ids) == n and ids[0][0] is None and [t for _, t, _ in scored] == full[1:]
    for (lp, tid, _), (want, want_id, _) in zip(scored[n - 1:], gen["meta_info"]["output_token_logprobs"]):
        assert tid == want_id and abs(lp - want) < 1e-3, (lp, want)
    assert len(meta["input_top_logprobs"]) == len(full) - 1 and all(len(t) == 2 for t in meta["input_top_logprobs"])
    # OpenAI's echo with logprobs scores the same prompt: null first, then the same values.
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="none")
    comp = client.completions.create(model="SmolLM2-135M-Instruct", prompt=full, max_tokens=0, echo=True,
                                     logprobs=1)
    lp = comp.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == len(full)
    assert max(abs(a - b[0]) for a, b in zip(lp.token_logprobs[1:], scored)) < 1e-4
    # A start past the prompt is a 400, and the server goes on.
    r = requests.post(server.url("/generate"), json={"input_ids": full, "return_logprob": True,
                                                       "logprob_start_len": len(full)})
    assert r.status_code == 400 and "logprob_start_len" in r.text
    r = requests.post(server.url("/generate"), json={"text": "x", "return_logprob": True, "logprob_start_len": "0"})
    assert r.status_code == 400


def test_openai_sdk(server):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="none")
    models = client.models.list()
    assert models.data[0].id == "SmolLM2-135M-Instruct"
    chat = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "Say hi"}])
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(
        model="SmolLM2-135M-Instruct", max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, messages=[{"role": "user", "content": "Say hi"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    comp = client.completions.create(model="SmolLM2-135M-Instruct", prompt="1, 2, 3,", max_tokens=6,
                                     temperature=0, n=2, logprobs=2)
    assert len(comp.choices) == 2 and comp.choices[0].text == comp.choices[1].text
    assert len(comp.choices[0].logprobs.tokens) == comp.usage.completion_tokens // 2


def scrape(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = requests.get(server.url("/metrics"), timeout=30)
    r.raise_for_status()
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {s.name: s.value for fam in text_string_to_metric_families(r.text) for s in fam.samples
            if "le" not in s.labels}


def test_metrics_count_what_was_served(server):
    """--enable-metrics: the counters and histograms move by what these requests did, streamed or not, and a
    request whose client leaves counts as aborted."""
    server.wait_idle()
    before = scrape(server)
    streamed = stream_generate(server, "Count to ten:", 8)
    plain = generate(server, {"text": "Name a color.", "sampling_params": {"max_new_tokens": 5, "ignore_eos": True,
                                                                           **GREEDY}})
    with requests.post(server.url("/generate"), json={"text": "Tell a long story.", "stream": True, "sampling_params":
                       {"max_new_tokens": 2000, "ignore_eos": True}}, stream=True, timeout=60) as r:
        next(r.iter_lines())  # one chunk, then hang up
    server.wait_idle()
    after = scrape(server)

    def delta(name):
        return after[name] - before[name]

    metas = [streamed["meta_info"], plain["meta_info"]]
    assert delta("sglx:num_requests_total") == 3 and delta("sglx:num_aborted_requests_total") == 1
    done_tokens = sum(m["completion_tokens"] for m in metas)
    assert done_tokens == 8 + 5
    assert delta("sglx:generation_tokens_total") > done_tokens  # plus what the dropped request made
    assert delta("sglx:prompt_tokens_total") > sum(m["prompt_tokens"] for m in metas)
    assert delta("sglx:time_to_first_token_seconds_count") == 3
    assert delta("sglx:e2e_request_latency_seconds_count") == 3
    assert delta("sglx:inter_token_latency_seconds_count") == delta("sglx:generation_tokens_total") - 3
    assert 0 < delta("sglx:time_to_first_token_seconds_sum") < delta("sglx:e2e_request_latency_seconds_sum")
    assert after["sglx:num_running_reqs"] == 0 and after["sglx:num_queue_reqs"] == 0
    assert after["sglx:token_usage"] == 0 and 0 <= after["sglx:cache_hit_rate"] <= 1


def test_info_endpoints(server):
    assert requests.get(server.url("/health"), timeout=10).status_code == 200
    info = requests.get(server.url("/get_model_info"), timeout=10).json()
    assert info["model_path"].endswith(".gguf") and info["is_generation"]
    assert requests.post(server.url("/flush_cache"), timeout=30).status_code == 200
    state = server.server_info()["internal_state"]
    assert state["available_kv_tokens"] == state["max_total_num_tokens"]  # flushed: all free


def test_start_and_stop_profile(server, tmp_path):
    import gzip

    bad = [b"{", b"[1]", json.dumps({"num_steps": "2"}).encode(), json.dumps({"num_steps": True}).encode(),
           json.dumps({"foo": 1}).encode(), json.dumps({"activities": [1]}).encode(),
           json.dumps({"activities": ["TPU"]}).encode()]
    for body in bad:
        r = requests.post(server.url("/start_profile"), data=body, timeout=30)
        assert r.status_code == 400, body
    assert requests.post(server.url("/stop_profile"), timeout=30).status_code == 400  # nothing started
    r = requests.post(server.url("/start_profile"), json={"output_dir": str(tmp_path), "activities": ["CPU"]},
                      timeout=30)
    assert r.status_code == 200 and str(tmp_path) in r.text
    assert requests.post(server.url("/start_profile"), timeout=30).status_code == 400  # already running
    generate(server, {"text": "Profile me", "sampling_params": {"max_new_tokens": 3, **GREEDY}})
    r = requests.post(server.url("/stop_profile"), timeout=300)
    assert r.status_code == 200
    (trace,) = tmp_path.glob("sglx-*.trace.json.gz")
    with gzip.open(trace, "rt") as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert {"sglx::launch_batch", "sglx::process_result"} <= names
    assert generate(server, {"text": "Still serving", "sampling_params": {"max_new_tokens": 2}})["text"]
