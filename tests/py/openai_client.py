"""Drives a shoal node with the official `openai` client; exits non-zero on failure.

usage: openai_client.py BASE_URL MODEL EXPECTED_CHAT_FILE EXPECTED_COMPLETION_FILE
"""
import sys

import openai

base, model, chat_file, completion_file = sys.argv[1:5]
expected_chat = open(chat_file, encoding="utf-8").read()
expected_completion = open(completion_file, encoding="utf-8").read()
client = openai.OpenAI(base_url=base, api_key="sk-test", max_retries=0)
messages = [{"role": "user", "content": "Why is the sky blue?"}]

r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24)
assert r.choices[0].message.content == expected_chat, (r.choices[0].message.content, expected_chat)
assert r.choices[0].finish_reason == "length", r.choices[0].finish_reason
assert r.usage.completion_tokens == 24, r.usage

chunks = list(client.chat.completions.create(
    model=model, messages=messages, temperature=0, max_tokens=24, stream=True,
    stream_options={"include_usage": True}))
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == expected_chat, (text, expected_chat)
assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24, chunks[-1]

c = client.completions.create(model=model, prompt="Once upon a time", temperature=0, max_tokens=16)
assert c.choices[0].text == expected_completion, (c.choices[0].text, expected_completion)

stopped = client.completions.create(model=model, prompt="Once upon a time", temperature=0,
                                    max_tokens=16, stop=[expected_completion[5:9]])
assert stopped.choices[0].text == expected_completion[:5], stopped.choices[0].text
assert stopped.choices[0].finish_reason == "stop"

# Listed by its short name, which answers as well as the file name.
listed = [m.id for m in client.models.list().data]
assert listed == ["smollm2:135m"], listed
r = client.chat.completions.create(model=listed[0], messages=messages, temperature=0, max_tokens=24)
assert r.choices[0].message.content == expected_chat

def raises(kind, **kw):
    try:
        client.chat.completions.create(**kw)
    except kind as e:
        return e
    raise AssertionError(f"expected {kind.__name__} for {kw}")

raises(openai.NotFoundError, model="no-such-model", messages=messages)
raises(openai.BadRequestError, model=model, messages=messages, temperature=5)
raises(openai.BadRequestError, model=model, messages=messages, n=2)
e = raises(openai.BadRequestError, model=model,
           messages=[{"role": "user", "content": "sky " * 2000}], max_tokens=4)
assert "context" in str(e), e
# Not built: refused by name, not ignored.
e = raises(openai.BadRequestError, model=model, messages=messages, logit_bias={"42": 5})
assert "not supported" in str(e), e
# Bookkeeping fields change nothing and are taken.
r = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24,
                                   user="u1", metadata={"k": "v"}, store=False)
assert r.choices[0].message.content == expected_chat
print("ok")
