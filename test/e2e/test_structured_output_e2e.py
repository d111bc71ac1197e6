"""Structured output on the real server and model: OpenAI's response_format and SGLang's regex / ebnf give
outputs that python's json and re accept; bad constraints are a 400 and the server keeps serving."""

from __future__ import annotations

import json
import re

import openai
import requests

MODEL = "SmolLM2-135M-Instruct"
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"}},
          "required": ["name", "age"]}


def test_chat_response_format_json_schema(server):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="none")
    chat = client.chat.completions.create(
        model=MODEL, max_tokens=80, temperature=0,
        messages=[{"role": "user", "content": "Describe a person named Anna, aged 31, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    assert chat.choices[0].finish_reason == "stop"
    obj = json.loads(chat.choices[0].message.content)
    assert set(obj) == {"name", "age"} and isinstance(obj["name"], str) and isinstance(obj["age"], int)
    # Streamed, two seeded choices: each is a complete array of exactly three of the allowed words.
    colors = {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 3, "maxItems": 3}
    texts = {}
    for chunk in client.chat.completions.create(
            model=MODEL, max_tokens=80, temperature=0.8, seed=3, n=2, stream=True,
            messages=[{"role": "user", "content": "Name three colors as a JSON list."}],
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": colors}}):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert len(texts) == 2
    for text in texts.values():
        items = json.loads(text)
        assert len(items) == 3 and set(items) <= {"red", "green", "blue"}


def test_native_regex_and_ebnf(server):
    out = requests.post(server.url("/generate"), timeout=300, json={
        "text": "Call me at", "sampling_params": {"regex": r" \d{3}-\d{4}", "max_new_tokens": 20, "temperature": 0}})
    out.raise_for_status()
    assert re.fullmatch(r" \d{3}-\d{4}", out.json()["text"]) and out.json()["meta_info"]["finish_reason"]["type"] == "stop"
    comp = requests.post(server.url("/v1/completions"), timeout=300, json={
        "prompt": "Is the sky blue? Answer:", "max_tokens": 10, "temperature": 0,
        "ebnf": 'root ::= " " ("yes" | "no") "."'})
    comp.raise_for_status()
    assert re.fullmatch(r" (yes|no)\.", comp.json()["choices"][0]["text"])


def test_bad_constraints_are_400_and_the_server_keeps_serving(server):
    bad = [({"regex": "([a-"}, "Unclosed"), ({"json_schema": "{nope"}, "not valid JSON"),
           ({"json_schema": json.dumps({"type": "strang"})}, "strang"), ({"regex": "a", "ebnf": 'root ::= "a"'}, "only one")]
    for params, needle in bad:
        r = requests.post(server.url("/generate"), timeout=60,
                          json={"text": "x", "sampling_params": {**params, "max_new_tokens": 4}})
        assert r.status_code == 400 and needle in r.json()["message"], r.text
    r = requests.post(server.url("/v1/chat/completions"), timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}})
    assert r.status_code == 400 and "json_schema.schema" in r.json()["message"]
    ok = requests.post(server.url("/generate"), timeout=300,
                       json={"text": "Hi", "sampling_params": {"regex": "(yes|no)", "max_new_tokens": 4}})
    assert ok.status_code == 200 and ok.json()["text"] in ("yes", "no")


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"]}}}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "description": "Current time"}}


def test_tool_choice_required_and_named_give_real_calls(server):
    """Whatever the model would have written, a forced tool choice yields well-formed calls of offered tools."""
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="none")
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    chat = client.chat.completions.create(model=MODEL, max_tokens=100, temperature=0, messages=messages,
                                          tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
    choice = chat.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
    for call in choice.message.tool_calls:
        args = json.loads(call.function.arguments)
        assert call.function.name in ("get_weather", "get_time") and isinstance(args, dict)
        if call.function.name == "get_weather":
            assert isinstance(args["city"], str)
    named = client.chat.completions.create(
        model=MODEL, max_tokens=60, temperature=0, messages=messages, tools=[WEATHER_TOOL, TIME_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and isinstance(json.loads(call.function.arguments)["city"], str)
