#!/usr/bin/env python3
"""Failover trials: a 3-node cluster (loopback, or network namespaces with
--netns), TRIALS answers of 300 tokens greedy and TRIALS with seeded
sampling at temperature 0.8, each with a stage other than the asked node
killed (SIGKILL) at a seeded random moment of the answer; every answer is
compared with `shoal run` on one machine. The killed node is restarted
between trials.

  python3 bench/failover.py --shoal target/release/shoal --model M.gguf \\
      [--trials 20] [--netns] [--seed 1]
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from chaos import Lan  # noqa: E402

STORY = "Once upon a time, in a small village by the sea,"
SETTINGS = [["--temp", "0"], ["--temp", "0.8", "--seed", "7"]]
HTTP = 18700
P2P = 18790


class Cluster:
    def __init__(self, args, workdir):
        self.args, self.workdir = args, workdir
        self.lan = Lan(3) if args.netns else None
        self.procs = [None, None, None]
        self.starts = 0

    def url(self, i):
        port = HTTP if self.lan else HTTP + i
        return f"http://127.0.0.1:{port}"

    def wrap(self, i, cmd):
        return ["ip", "netns", "exec", self.lan.hosts[i]] + cmd if self.lan else cmd

    def start(self, i):
        self.starts += 1
        log = open(os.path.join(self.workdir, f"node{i}.{self.starts}.log"), "w")
        cmd = [self.args.shoal, "node", "-m", self.args.model, "--cluster-key-file",
               os.path.join(self.workdir, "key"), "--http", self.url(i)[7:], "-t", "1",
               "--ctx", "1024", "--max-memory", "80M"]
        if not self.lan:
            # Fixed ports: a restarted node is found again where it was.
            cmd += ["--no-mdns", "--listen", f"/ip4/127.0.0.1/tcp/{P2P + i}"]
            cmd += [a for j in range(3) if j != i for a in ("--peer", f"/ip4/127.0.0.1/tcp/{P2P + j}")]
        self.procs[i] = subprocess.Popen(self.wrap(i, cmd), stdout=log, stderr=log)
        for _ in range(600):
            if "API on" in open(log.name).read():
                break
            time.sleep(0.1)

    def status(self, i):
        r = subprocess.run(self.wrap(i, [self.args.shoal, "status", "--node", self.url(i), "--json"]),
                           capture_output=True, text=True)
        return json.loads(r.stdout) if r.returncode == 0 else {}

    def staged(self):
        """The nodes (our indices) holding layers, in plan order, once all 3 are in."""
        for _ in range(600):
            s = self.status(0)
            if s.get("plan") and len(s.get("nodes", [])) == 3:
                index = {self.status(i).get("node_id"): i for i in range(3)}
                order = sorted((n["layers"][0], n["id"]) for n in s["nodes"] if n["layers"])
                if len(order) >= 2 and all(nid in index for _, nid in order):
                    return [index[nid] for _, nid in order]
            time.sleep(0.2)
        raise RuntimeError("no plan over 3 nodes")

    def close(self):
        for p in self.procs:
            if p:
                p.kill()
        if self.lan:
            self.lan.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shoal", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--netns", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    workdir = tempfile.mkdtemp(prefix="shoal-failover-")
    subprocess.run([args.shoal, "keygen", os.path.join(workdir, "key")], capture_output=True, check=True)
    want = [subprocess.run([args.shoal, "run", "-m", args.model, "-t", "1", "--no-template", "-n", "300"]
                           + s + [STORY], capture_output=True, text=True, check=True).stdout
            for s in SETTINGS]
    c = Cluster(args, workdir)
    results = {0: [0, 0], 1: [0, 0]}  # setting -> [identical, not]
    failures = []
    try:
        for i in range(3):
            c.start(i)
        for t in range(2 * args.trials):
            order = c.staged()
            asked, victim = order[0], order[1]
            k = t % 2
            cmd = c.wrap(asked, [args.shoal, "ask", "--node", c.url(asked), "--no-template", "-n", "300"]
                         + SETTINGS[k] + [STORY])
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            head = p.stdout.read(1)  # the answer is streaming
            time.sleep(rng.uniform(0.0, 2.5))
            c.procs[victim].send_signal(signal.SIGKILL)
            c.procs[victim].wait()
            rest = p.stdout.read()  # through the same buffer as `head`
            err = p.stderr.read()
            p.wait(timeout=300)
            ok = p.returncode == 0 and head + rest == want[k]
            results[k][0 if ok else 1] += 1
            if not ok:
                got = head + rest
                at = next((j for j, (x, y) in enumerate(zip(got, want[k])) if x != y), min(len(got), len(want[k])))
                failures.append({"trial": t, "setting": SETTINGS[k], "rc": p.returncode,
                                 "error": err.strip()[-300:], "got": got[max(0, at - 40):at + 40],
                                 "want": want[k][max(0, at - 40):at + 40]})
            c.start(victim)
    finally:
        c.close()
    where = "namespaces" if args.netns else "loopback"
    for k, s in enumerate(SETTINGS):
        n = sum(results[k])
        print(f"failover ({where}, {' '.join(s)}): {results[k][0]} of {n} answers identical to one machine")
    for f in failures:
        print("  ", f)
    sys.exit(0 if not failures else 1)


if __name__ == "__main__":
    main()
