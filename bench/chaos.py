#!/usr/bin/env python3
"""Chaos: 4 shoal nodes on their own network namespaces (one bridge, mDNS),
STREAMS concurrent greedy requests to node 0 for SECONDS, while nodes 1-3 are
killed (SIGKILL) and restarted, frozen (SIGSTOP, then SIGCONT), stopped
(SIGTERM) and restarted, and cut off the bridge and plugged back, at seeded
random moments (at most two disturbed at once: any two nodes hold the model).

Every answer is compared with `shoal run` of the same prompt on one machine.
Prints a summary and writes JSON (--json FILE): requests identical,
different (must be 0), failed with their reasons, hung (no end within the
hang limit: must be 0), replays, disturbances, and each node's RSS over time.

  python3 bench/chaos.py --shoal target/release/shoal --model M.gguf \\
      --seconds 600 --streams 6 --seed 1 [--tokens 64] [--json out.json]

Needs root (network namespaces) and iproute2.
"""

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

PROMPTS = [
    "The capital of France is",
    "Once upon a time, there was a",
    "The best way to learn a programming language is",
    "In 1492, Christopher Columbus",
    "The three primary colors are",
    "My favourite recipe for pancakes starts with",
    "The theory of relativity was developed by",
    "Machine learning is a field of",
]
NODES = 4
HTTP_PORT = 18500
HANG_SECS = 240


def sh(cmd, check=True):
    r = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{cmd}: {r.stderr.strip()}")
    return r


class Lan:
    """Namespaces h0..h{n-1} on a bridge in a switch namespace."""

    def __init__(self, n):
        tag = f"chaos{os.getpid() % 100000}"
        net = 150 + os.getpid() % 90
        self.switch = f"{tag}-sw"
        self.hosts = [f"{tag}-h{i}" for i in range(n)]
        self.ips = [f"10.{net}.0.{i + 1}" for i in range(n)]
        sh(f"ip netns add {self.switch}")
        sh(f"ip -n {self.switch} link add br0 type bridge")
        sh(f"ip -n {self.switch} link set br0 up")
        for i, (h, ip) in enumerate(zip(self.hosts, self.ips)):
            sh(f"ip netns add {h}")
            sh(f"ip -n {h} link add eth0 type veth peer name p{i} netns {self.switch}")
            sh(f"ip -n {self.switch} link set p{i} master br0")
            sh(f"ip -n {self.switch} link set p{i} up")
            sh(f"ip -n {h} addr add {ip}/24 dev eth0")
            sh(f"ip -n {h} link set eth0 up")
            sh(f"ip -n {h} link set lo up")

    def link(self, i, up):
        sh(f"ip -n {self.switch} link set p{i} {'up' if up else 'down'}")

    def close(self):
        for h in self.hosts + [self.switch]:
            sh(f"ip netns pids {h} | xargs -r kill -9; ip netns del {h}", check=False)


class Node:
    def __init__(self, args, lan, i, workdir):
        self.args, self.lan, self.i, self.workdir = args, lan, i, workdir
        self.proc = None
        self.starts = 0

    def start(self):
        self.starts += 1
        log = open(os.path.join(self.workdir, f"node{self.i}.{self.starts}.log"), "w")
        cmd = ["ip", "netns", "exec", self.lan.hosts[self.i], self.args.shoal, "node",
               "-m", self.args.model, "--cluster-key-file", os.path.join(self.workdir, "key"),
               "--http", f"127.0.0.1:{HTTP_PORT}", "-t", "1", "--ctx", "1024",
               "--max-memory", "80M"]
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log)
        self.log = log.name
        for _ in range(600):
            if "API on" in open(self.log).read():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"node {self.i} exited: {open(self.log).read()[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"node {self.i} did not start")

    def signal(self, sig):
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def rss_mib(self):
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) // 1024
        except (OSError, AttributeError):
            pass
        return None


def client(lan, args, sub, extra):
    return ["ip", "netns", "exec", lan.hosts[0], args.shoal, sub,
            "--node", f"http://127.0.0.1:{HTTP_PORT}"] + extra


def wait_cluster(lan, args, nodes_wanted, timeout=90):
    t = time.time()
    while time.time() - t < timeout:
        r = subprocess.run(client(lan, args, "status", ["--json"]), capture_output=True, text=True)
        if r.returncode == 0:
            s = json.loads(r.stdout)
            if len(s["nodes"]) >= nodes_wanted and s.get("plan"):
                return
        time.sleep(0.5)
    raise RuntimeError("the cluster did not form")


def metric(lan, args, name):
    r = subprocess.run(["ip", "netns", "exec", lan.hosts[0], "curl", "-s",
                        f"http://127.0.0.1:{HTTP_PORT}/metrics"], capture_output=True, text=True)
    m = re.search(rf"^{name} (\d+)", r.stdout, re.M)
    return int(m.group(1)) if m else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shoal", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--seconds", type=int, default=600)
    ap.add_argument("--streams", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json")
    args = ap.parse_args()
    workdir = tempfile.mkdtemp(prefix="shoal-chaos-")
    subprocess.run([args.shoal, "keygen", os.path.join(workdir, "key")], capture_output=True, check=True)
    # The answers of one machine.
    want = {}
    for p in PROMPTS:
        r = subprocess.run([args.shoal, "run", "-m", args.model, "-t", "1", "--temp", "0",
                            "-n", str(args.tokens), p], capture_output=True, text=True, check=True)
        want[p] = r.stdout
    lan = Lan(NODES)
    nodes = [Node(args, lan, i, workdir) for i in range(NODES)]
    results = []   # (kind, detail)
    actions = []   # (t, action, node)
    rss = {i: [] for i in range(NODES)}
    lock = threading.Lock()
    start = time.time()
    deadline = start + args.seconds
    try:
        for n in nodes:
            n.start()
        wait_cluster(lan, args, NODES)

        def stream(k):
            rng = random.Random(args.seed * 1000 + k)
            while time.time() < deadline:
                p = rng.choice(PROMPTS)
                t = time.time()
                try:
                    r = subprocess.run(client(lan, args, "ask", ["--temp", "0", "-n", str(args.tokens), p]),
                                       capture_output=True, text=True, timeout=HANG_SECS)
                except subprocess.TimeoutExpired:
                    with lock:
                        results.append(("hung", p))
                    continue
                if r.returncode != 0:
                    why = (r.stderr.strip().splitlines() or ["?"])[-1]
                    kind, detail = "failed", why
                elif r.stdout == want[p]:
                    kind, detail = "identical", round(time.time() - t, 1)
                else:
                    kind, detail = "different", p
                with lock:
                    results.append((kind, detail))

        def chaos():
            rng = random.Random(args.seed)
            pending = []  # (when, undo, node)
            while time.time() < deadline:
                now = time.time()
                for item in [x for x in pending if x[0] <= now]:
                    pending.remove(item)
                    item[1]()
                    actions.append((round(now - start, 1), "recover", item[2]))
                busy = {x[2] for x in pending}
                if len(busy) < 2 and rng.random() < 0.5:
                    victim = rng.choice([i for i in range(1, NODES) if i not in busy])
                    n = nodes[victim]
                    act = rng.choice(["kill", "freeze", "term", "cut"])
                    back = now + rng.uniform(3, 8)
                    if act == "kill":
                        n.signal(signal.SIGKILL)
                        n.proc.wait()
                        pending.append((back, n.start, victim))
                    elif act == "term":
                        n.signal(signal.SIGTERM)
                        try:
                            n.proc.wait(timeout=15)
                        except subprocess.TimeoutExpired:
                            actions.append((round(now - start, 1), "term-did-not-exit", victim))
                            n.signal(signal.SIGKILL)
                            n.proc.wait()
                        pending.append((back, n.start, victim))
                    elif act == "freeze":
                        n.signal(signal.SIGSTOP)
                        pending.append((back, lambda n=n: n.signal(signal.SIGCONT), victim))
                    else:
                        lan.link(victim, False)
                        pending.append((back, lambda v=victim: lan.link(v, True), victim))
                    actions.append((round(now - start, 1), act, victim))
                time.sleep(rng.uniform(2, 6))
            for item in pending:
                item[1]()

        def sample():
            while time.time() < deadline:
                for i, n in enumerate(nodes):
                    rss[i].append((round(time.time() - start), n.rss_mib()))
                time.sleep(10)

        threads = [threading.Thread(target=stream, args=(k,)) for k in range(args.streams)]
        threads += [threading.Thread(target=chaos), threading.Thread(target=sample)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        replays = metric(lan, args, "shoal_replays_total")
    finally:
        for n in nodes:
            n.signal(signal.SIGCONT)
            n.signal(signal.SIGKILL)
        lan.close()
    count = {k: sum(1 for r in results if r[0] == k) for k in ["identical", "different", "failed", "hung"]}
    reasons = {}
    for kind, detail in results:
        if kind == "failed":
            reasons[detail] = reasons.get(detail, 0) + 1
    done = {a: sum(1 for x in actions if x[1] == a) for a in ["kill", "freeze", "term", "cut"]}
    summary = {
        "seconds": args.seconds, "streams": args.streams, "tokens": args.tokens, "seed": args.seed,
        "requests": len(results), **count, "failure_reasons": reasons, "replays": replays,
        "disturbances": done, "actions": actions,
        "rss_mib": {i: {"min": min((v for _, v in s if v), default=None),
                        "max": max((v for _, v in s if v), default=None),
                        "samples": s} for i, s in rss.items()},
        "logs": workdir,
    }
    print(f"chaos {args.seconds}s, {args.streams} streams of {args.tokens} tokens, seed {args.seed}: "
          f"{len(results)} requests: {count['identical']} identical to one machine, "
          f"{count['different']} different, {count['failed']} failed, {count['hung']} hung; "
          f"replays {replays}; disturbances {done}")
    for why, k in reasons.items():
        print(f"  failed x{k}: {why}")
    for i in range(NODES):
        r = summary["rss_mib"][i]
        print(f"  node {i} RSS {r['min']}..{r['max']} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    sys.exit(0 if count["different"] == 0 and count["hung"] == 0 else 1)


if __name__ == "__main__":
    main()
