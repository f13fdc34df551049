#!/usr/bin/env python3
"""Soak: one node, then a 3-node loopback cluster, each with STREAMS
concurrent greedy streams for MINUTES. Per 10-minute window (or --window):
requests finished and failed, p50/p99 time between tokens as the client
sees it; each node's RSS at the start and the end.

  python3 bench/soak.py --shoal target/release/shoal --model M.gguf \\
      --minutes 60 --streams 8 [--tokens 128] [--window 600] [--json out.json]
"""

import argparse
import json
import os
import subprocess
import tempfile
import threading
import time
import urllib.request

# The bench's shared prompts (one per line).
PROMPTS = [l.strip() for l in open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts.txt"))
           if l.strip()]


def start_node(args, workdir, name, port, threads, extra):
    log = open(os.path.join(workdir, f"{name}.log"), "w")
    cmd = [args.shoal, "node", "-m", args.model, "--cluster", name,
           "--cluster-key-file", os.path.join(workdir, "key"), "--no-mdns",
           "--listen", "/ip4/127.0.0.1/tcp/0", "--http", f"127.0.0.1:{port}",
           "-t", str(threads), "--ctx", "1024", "--max-running", "16"] + extra
    p = subprocess.Popen(cmd, stdout=log, stderr=log)
    for _ in range(600):
        if "API on" in open(log.name).read():
            return p
        time.sleep(0.1)
    raise RuntimeError(f"{name} did not start: {open(log.name).read()[-2000:]}")


def status(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5) as r:
        return json.load(r)


def wait_plan(port, nodes):
    for _ in range(600):
        try:
            s = status(port)
            if len(s["nodes"]) >= nodes and s.get("plan"):
                return s
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("no plan")


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024


def generate(port, prompt, tokens):
    """One streamed request: (ok, error, gaps between tokens in seconds)."""
    body = json.dumps({"prompt": prompt, "max_tokens": tokens, "temperature": 0}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/shoal/generate", data=body,
                                 headers={"Content-Type": "application/json"})
    gaps, last = [], None
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            for line in r:
                ev = json.loads(line)
                if "token" in ev:
                    now = time.time()
                    if last is not None:
                        gaps.append(now - last)
                    last = now
                elif "error" in ev:
                    return False, str(ev["error"].get("message", ev["error"])), gaps
    except Exception as e:  # the soak counts every way a request can end
        return False, f"{type(e).__name__}: {e}", gaps
    return True, None, gaps


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(p / 100 * len(xs)))] * 1000, 1)


def phase(args, name, port, pids):
    start = time.time()
    deadline = start + args.minutes * 60
    windows = {}
    lock = threading.Lock()
    rss_start = {p: rss(p) for p in pids}

    def stream(k):
        i = k
        while time.time() < deadline:
            ok, err, gaps = generate(port, PROMPTS[i % len(PROMPTS)], args.tokens)
            i += 1
            w = int((time.time() - start) // args.window)
            with lock:
                d = windows.setdefault(w, {"finished": 0, "failed": 0, "gaps": [], "errors": {}})
                d["gaps"].extend(gaps)
                if ok:
                    d["finished"] += 1
                else:
                    d["failed"] += 1
                    d["errors"][err] = d["errors"].get(err, 0) + 1

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(args.streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rss_end = {p: rss(p) for p in pids}
    rows = []
    for w in sorted(windows):
        d = windows[w]
        rows.append({"window": w, "finished": d["finished"], "failed": d["failed"],
                     "p50_ms": pct(d["gaps"], 50), "p99_ms": pct(d["gaps"], 99), "errors": d["errors"]})
        print(f"{name} minutes {w * args.window // 60}-{(w + 1) * args.window // 60}: "
              f"{d['finished']} finished, {d['failed']} failed, per-token p50 {rows[-1]['p50_ms']} ms, "
              f"p99 {rows[-1]['p99_ms']} ms")
    print(f"{name} RSS MiB at start {list(rss_start.values())}, at the end {list(rss_end.values())}")
    return {"windows": rows, "rss_start": list(rss_start.values()), "rss_end": list(rss_end.values())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shoal", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--window", type=int, default=600)
    ap.add_argument("--json")
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="shoal-soak-")
    subprocess.run([args.shoal, "keygen", os.path.join(workdir, "key")], capture_output=True, check=True)
    out = {}
    procs = []
    try:
        one = start_node(args, workdir, "one", 18600, 2, [])
        procs.append(one)
        wait_plan(18600, 1)
        out["one node, 2 threads"] = phase(args, "1 node", 18600, [one.pid])
        one.terminate()
        one.wait()
        # 100 MiB each: no node holds the model alone (a real pipeline),
        # and each stage has room for the streams' KV caches.
        first = start_node(args, workdir, "three", 18601, 1, ["--max-memory", "100M"])
        procs.append(first)
        addr = status(18601)["nodes"][0]["addrs"][0]
        for port in (18602, 18603):
            procs.append(start_node(args, workdir, "three", port, 1,
                                    ["--max-memory", "100M", "--peer", addr]))
        wait_plan(18601, 3)
        out["3 nodes, 1 thread each"] = phase(args, "3 nodes", 18601, [p.pid for p in procs[1:]])
    finally:
        for p in procs:
            p.kill()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
