"""Talks to a shoal node with the official `ollama` Python client.

    python3 ollama_client.py HOST MODEL CHAT_EXPECTED COMPLETION_EXPECTED

Chat (whole and streamed) and raw generate must give the expected greedy
texts; /api/tags must list MODEL; an unknown model must raise
ResponseError with status 404; show/ps describe the model; keep_alive
taken; a format whose schema does not compile is refused. Exits non-zero with a message otherwise.
"""
import sys

from ollama import Client, ResponseError


def main():
    host, model, chat_file, completion_file = sys.argv[1:5]
    want_chat = open(chat_file).read()
    want_completion = open(completion_file).read()
    c = Client(host=host)
    greedy = {"temperature": 0, "repeat_penalty": 1.0, "num_predict": 24}
    msgs = [{"role": "user", "content": "Why is the sky blue?"}]

    r = c.chat(model=model, messages=msgs, options=greedy)
    assert r["message"]["content"] == want_chat, (r["message"]["content"], want_chat)
    assert r["done"] and r["eval_count"] > 0, r

    parts = [p["message"]["content"] for p in c.chat(model=model, messages=msgs, options=greedy, stream=True)]
    assert "".join(parts) == want_chat, ("".join(parts), want_chat)

    g = c.generate(model=model, prompt="Once upon a time", raw=True,
                   options={**greedy, "num_predict": 16})
    assert g["response"] == want_completion, (g["response"], want_completion)

    # Listed by its short name (Ollama's way), which answers like the file name.
    names = [m["model"] for m in c.list()["models"]]
    assert names == ["smollm2:135m"], names
    r = c.chat(model="smollm2:135m", messages=msgs, options=greedy)
    assert r["message"]["content"] == want_chat
    listed = c.list()["models"][0]["details"]
    assert listed["parameter_size"] == "135M" and listed["quantization_level"] == "Q4_1", listed

    # What Continue and Open WebUI read: show and ps.
    shown = c.show(model)
    assert shown["details"]["family"] == "llama", shown
    assert c.show("smollm2:135m")["details"] == shown["details"]
    assert shown["modelinfo"]["llama.context_length"] > 0, shown
    assert "im_start" in shown["template"], shown["template"][:200]
    assert [m["model"] for m in c.ps()["models"]] == names

    # keep_alive is taken; a format whose schema does not compile is
    # refused, not ignored.
    c.chat(model=model, messages=msgs, options={**greedy, "num_predict": 2}, keep_alive="5m")
    try:
        c.chat(model=model, messages=msgs, options=greedy, format={"type": "nonsense"}, stream=False)
        raise AssertionError("a bad format accepted")
    except ResponseError as e:
        assert e.status_code == 400 and "format" in str(e), e

    try:
        c.chat(model="no-such-model", messages=msgs)
        raise AssertionError("unknown model accepted")
    except ResponseError as e:
        assert e.status_code == 404, e.status_code
    print("ollama client ok")


if __name__ == "__main__":
    main()
