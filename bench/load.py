"""Concurrent streaming chat completions through the official `openai` client.

    python3 bench/load.py URL STREAMS TOKENS

Starts STREAMS requests at once (different prompts, greedy, max_tokens
TOKENS), streams them all, and prints one JSON line: total completion tokens,
wall seconds, aggregate tokens/s, mean time to first token.
"""
import json
import sys
import threading
import time

from openai import OpenAI

PROMPTS = [
    "Write a long story about a lighthouse keeper.",
    "Explain in detail how a steam engine works.",
    "Describe a walk through a busy market in the morning.",
    "Write a letter to a friend about your summer holidays.",
    "Explain why the sky is blue, step by step.",
    "Tell me the history of the bicycle.",
    "Describe how bread is made, from wheat to loaf.",
    "Write a story about a cat who learns to fly.",
]


def main():
    url, streams, tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    client = OpenAI(base_url=url.rstrip("/") + "/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    results = [None] * streams

    def one(i):
        t0 = time.perf_counter()
        first, n = None, 0
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            max_tokens=tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and first is None:
                first = time.perf_counter() - t0
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
        results[i] = (n, first or 0.0)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    secs = time.perf_counter() - t0
    total = sum(r[0] for r in results)
    print(json.dumps({
        "streams": streams,
        "tokens": total,
        "secs": round(secs, 3),
        "tok_s": round(total / secs, 2),
        "ttft_s": round(sum(r[1] for r in results) / streams, 3),
    }))


if __name__ == "__main__":
    main()
