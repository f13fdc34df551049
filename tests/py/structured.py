"""Structured output, tool calls and log-probabilities through a cluster,
with the official `openai` and `ollama` clients.

    python3 structured.py BASE_URL MODEL

- OpenAI `json_schema`: 20 of 20 answers (10 greedy, 10 sampled at 0.8)
  parse and validate; `json_object` parses;
- tool calls: `tool_choice` required and named always give a valid call,
  whole and streamed; the round trip (call, `tool` message, answer) works;
- `logprobs`/`top_logprobs` on chat and completions;
- Ollama `format` "json" and a schema: 20 of 20 valid; tools accepted.
Exits non-zero with a message otherwise.
"""
import json
import sys

import openai
from ollama import Client

base, model = sys.argv[1:3]
client = openai.OpenAI(base_url=base + "/v1", api_key="sk-test", max_retries=0)
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


def valid_person(text):
    v = json.loads(text)
    assert set(v) == {"name", "age", "pets"}, v
    assert isinstance(v["name"], str) and len(v["name"]) <= 24, v
    assert isinstance(v["age"], int) and 0 <= v["age"] <= 130, v
    assert isinstance(v["pets"], list) and len(v["pets"]) <= 3, v
    assert all(p in ("cat", "dog", "fish") for p in v["pets"]), v
    return v


ask = [{"role": "user", "content": "Describe a person and their pets as JSON."}]
fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
for i in range(20):
    sampled = {"temperature": 0.8, "seed": i} if i >= 10 else {"temperature": 0}
    r = client.chat.completions.create(model=model, messages=ask, max_tokens=120,
                                       response_format=fmt, **sampled)
    valid_person(r.choices[0].message.content)
short = [{"role": "user", "content": "Reply with a JSON object with the keys name and age."}]
r = client.chat.completions.create(model=model, messages=short, max_tokens=400, temperature=0,
                                   response_format={"type": "json_object"})
assert isinstance(json.loads(r.choices[0].message.content), dict)
try:
    client.chat.completions.create(model=model, messages=ask, max_tokens=8, response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    raise AssertionError("a bad schema was accepted")
except openai.BadRequestError as e:
    assert "response format" in str(e), e
print("json_schema: 20/20 valid")

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 40},
            "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Current time in a time zone",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                       "required": ["zone"], "additionalProperties": False}}},
]
weather = [{"role": "user", "content": "What is the weather like in Oslo?"}]


def check_call(call, name=None):
    assert call.type == "function", call
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert isinstance(args["city"], str) and args["unit"] in ("celsius", "fahrenheit"), args
    else:
        assert call.function.name == "get_time" and isinstance(args["zone"], str), call
    assert name is None or call.function.name == name, call
    return args


for i in range(10):
    r = client.chat.completions.create(model=model, messages=weather, tools=TOOLS, max_tokens=80,
                                       tool_choice="required", temperature=0.8, seed=i)
    assert r.choices[0].finish_reason == "tool_calls", r.choices[0]
    check_call(r.choices[0].message.tool_calls[0])
r = client.chat.completions.create(model=model, messages=weather, tools=TOOLS, max_tokens=80, temperature=0,
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
call = r.choices[0].message.tool_calls[0]
args = check_call(call, "get_weather")

# Streamed: the call arrives in the deltas.
chunks = list(client.chat.completions.create(model=model, messages=weather, tools=TOOLS, max_tokens=80,
                                             tool_choice="required", temperature=0, stream=True))
deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
assert deltas and deltas[0].function.name in ("get_weather", "get_time"), chunks
assert chunks[-1].choices[0].finish_reason == "tool_calls", chunks[-1]
json.loads(deltas[0].function.arguments)

# The round trip: the call, its result in a `tool` message, the answer.
history = weather + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
    {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 3, "sky": "snow"})},
]
for stream in (False, True):
    if stream:
        chunks = list(client.chat.completions.create(model=model, messages=history, tools=TOOLS,
                                                     max_tokens=40, temperature=0, stream=True,
                                                     tool_choice="none"))
        answer = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        r = client.chat.completions.create(model=model, messages=history, tools=TOOLS,
                                           max_tokens=40, temperature=0, tool_choice="none")
        answer = r.choices[0].message.content
        assert not r.choices[0].message.tool_calls
    assert answer.strip(), answer
print("tool calls: required/named valid, streamed, round trip")

r = client.chat.completions.create(model=model, messages=ask, max_tokens=8, temperature=0,
                                   logprobs=True, top_logprobs=3)
lp = r.choices[0].logprobs.content
assert len(lp) == 8, lp
for t in lp:
    assert len(t.top_logprobs) == 3 and t.logprob <= 0, t
    # Greedy: the token drawn is the most likely one.
    assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-5, t
c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=6, temperature=0, logprobs=2)
assert len(c.choices[0].logprobs.token_logprobs) == 6, c.choices[0].logprobs
print("logprobs ok")

o = Client(host=base)
for i in range(20):
    opts = {"temperature": 0.8, "seed": i, "num_predict": 400} if i % 2 else {"temperature": 0, "num_predict": 400}
    if i < 10:
        r = o.chat(model=model, messages=short, format="json", options=opts)
        assert isinstance(json.loads(r["message"]["content"]), dict)
    else:
        r = o.chat(model=model, messages=ask, format=PERSON, options=opts)
        valid_person(r["message"]["content"])
g = o.generate(model=model, prompt="A person as JSON:", format=PERSON, options={"temperature": 0, "num_predict": 120})
valid_person(g["response"])
r = o.chat(model=model, messages=weather, tools=TOOLS, options={"temperature": 0, "num_predict": 40})
assert r["message"]["role"] == "assistant"
print("ollama format: 20/20 valid")
print("ok")
