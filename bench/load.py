#!/usr/bin/env python3
"""Load harness driver (run through bench/load.sh).

Starts one `loadserver` process per variant (pinned to the server core), then runs rounds.
Each round runs, for every variant V in a rotating order, `wrk` against `bare` and then
against V, back to back (strictly alternating bare / variant). For each run it reads the
server's utime+stime from /proc/<pid>/stat before and after, and divides by the requests wrk
completed: the server's CPU time per request. The pair gives one ratio cost(bare)/cost(V)
measured seconds apart. A pair is discarded when the CPU steal (from /proc/stat) during it
exceeds --max-steal. Rounds repeat until every variant's median ratio has moved by at most
--tolerance over the last --stable-rounds rounds, between --min-rounds and --max-rounds.

Prints a markdown table and writes the raw measurements as JSON.
"""

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

VARIANTS = [
    "bare",
    "tower-http",
    "keywarden-hit",
    "keywarden-hit-metrics",
    "keywarden-hit-10k",
    "keywarden-hit-10k-metrics",
    "keywarden-sqlite",
    "keywarden-sqlite-nocache",
    "keywarden-postgres-nocache",
    "keywarden-malformed",
]
CLK_TCK = os.sysconf("SC_CLK_TCK")
HERE = os.path.dirname(os.path.abspath(__file__))


def proc_cpu_seconds(pid):
    """utime + stime of the whole process (all threads), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is the state (field 3); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def system_cpu():
    """(total, idle+iowait, steal) jiffies from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = parts[:8]
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return total, idle + iowait, steal


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def lookups(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as resp:
        return json.load(resp)["lookups"]


def pin(core):
    return ["taskset", "-c", str(core)] if core is not None else []


class Server:
    def __init__(self, variant, port, args, workdir):
        self.variant = variant
        self.port = port
        self.keys_file = os.path.join(workdir, f"{variant}.keys")
        cmd = pin(args.server_core) + [
            args.binary,
            "--variant", variant,
            "--addr", f"127.0.0.1:{port}",
            "--keys-file", self.keys_file,
            "--dir", workdir,
        ] + (["--cache-ttl", str(args.cache_ttl)] if args.cache_ttl else [])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            raise SystemExit(f"{variant}: server did not start (got {line!r})")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run_wrk(server, args, duration):
    """One measured run: returns a dict of figures."""
    look0 = lookups(server.port)  # before the CPU reading: /stats is not part of the run
    cpu0 = proc_cpu_seconds(server.proc.pid)
    sys0 = system_cpu()
    child0 = children_cpu()
    cmd = pin(args.client_core) + [
        "wrk", "-t1", f"-c{args.connections}", f"-d{duration}s", "--timeout", "5s",
        "-s", os.path.join(HERE, "wrk.lua"), f"http://127.0.0.1:{server.port}/",
    ]
    out = subprocess.run(cmd, env=dict(os.environ, KEYS_FILE=server.keys_file),
                         capture_output=True, text=True, timeout=duration + 60)
    child1 = children_cpu()
    sys1 = system_cpu()
    cpu1 = proc_cpu_seconds(server.proc.pid)
    look1 = lookups(server.port)  # after the CPU reading
    summary = None
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            summary = json.loads(line[len("WRKJSON "):])
    if summary is None or summary["requests"] == 0:
        raise SystemExit(f"{server.variant}: wrk failed: {out.stdout}\n{out.stderr}")
    total = sys1[0] - sys0[0]
    busy = total - (sys1[1] - sys0[1])
    server_cpu = cpu1 - cpu0
    client_cpu = child1 - child0
    return {
        "variant": server.variant,
        "requests": summary["requests"],
        "rps": summary["requests"] / (summary["duration_us"] / 1e6),
        "p50_us": summary["p50_us"],
        "p99_us": summary["p99_us"],
        "non2xx": summary["non2xx"],
        "errors": summary["errors"],
        "server_cpu_s": server_cpu,
        "cpu_us_per_req": server_cpu * 1e6 / summary["requests"],
        "lookups": look1 - look0,
        "steal": (sys1[2] - sys0[2]) / total if total else 0.0,
        # CPU used by everything but this server and this wrk, as a share of all CPUs.
        "foreign_load": max(0.0, (busy / CLK_TCK - server_cpu - client_cpu)) / (total / CLK_TCK)
        if total else 0.0,
    }


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", required=True)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    p.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per variant")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--min-rounds", type=int, default=5)
    p.add_argument("--max-rounds", type=int, default=15)
    p.add_argument("--stable-rounds", type=int, default=3)
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--max-steal", type=float, default=0.05)
    p.add_argument("--server-core", type=int, default=1)
    p.add_argument("--client-core", type=int, default=0)
    p.add_argument("--base-port", type=int, default=3101)
    p.add_argument("--json", default=None, help="where to write the raw runs")
    p.add_argument("--cache-ttl", type=int, default=None,
                   help="cache TTL in seconds for the cached keywarden variants (default: the layer's 60 s); "
                        "runs load each server only a few seconds per round, so a short TTL expires idle keys")
    args = p.parse_args()
    if os.cpu_count() < 2 or shutil.which("taskset") is None:
        args.server_core = args.client_core = None
        print("note: fewer than 2 CPUs or no taskset; not pinning", file=sys.stderr)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "bare" not in variants:
        variants.insert(0, "bare")
    others = [v for v in variants if v != "bare"]
    workdir = tempfile.mkdtemp(prefix="keywarden-load-")
    servers = {}
    started = time.time()
    load_start = os.getloadavg()
    try:
        for i, v in enumerate(variants):
            print(f"starting {v} ...", file=sys.stderr, flush=True)
            servers[v] = Server(v, args.base_port + i, args, workdir)
        for v in variants:
            run_wrk(servers[v], args, args.warmup)  # warm caches, connections, allocator

        runs = []
        ratios = {v: [] for v in others}
        history = {v: [] for v in others}
        discarded = 0
        rounds = 0
        while rounds < args.max_rounds:
            rounds += 1
            order = others[rounds % len(others):] + others[:rounds % len(others)]
            for v in order:
                base = run_wrk(servers["bare"], args, args.duration)
                var = run_wrk(servers[v], args, args.duration)
                steal = max(base["steal"], var["steal"])
                keep = steal <= args.max_steal
                for r in (base, var):
                    r.update(round=rounds, pair_with=v, kept=keep)
                    runs.append(r)
                if not keep:
                    discarded += 1
                    print(f"round {rounds} {v}: discarded, steal {steal:.1%}", file=sys.stderr)
                    continue
                ratios[v].append(base["cpu_us_per_req"] / var["cpu_us_per_req"])
            for v in others:
                history[v].append(median(ratios[v]))
            line = " ".join(f"{v}={history[v][-1]:.3f}" for v in others)
            print(f"round {rounds}: {line}", file=sys.stderr, flush=True)
            if rounds >= args.min_rounds and all(
                len(history[v]) >= args.stable_rounds
                and max(history[v][-args.stable_rounds:]) - min(history[v][-args.stable_rounds:])
                <= 2 * args.tolerance
                and len(ratios[v]) >= 3
                for v in others
            ):
                break
        stable = {
            v: max(history[v][-args.stable_rounds:]) - min(history[v][-args.stable_rounds:])
            <= 2 * args.tolerance
            for v in others
        }
    finally:
        for s in servers.values():
            s.stop()
    load_end = os.getloadavg()

    kept = [r for r in runs if r["kept"]]
    def col(v, key):
        return median([r[key] for r in kept if r["variant"] == v])

    print()
    print(f"Rounds: {rounds} ({'stable' if all(stable.values()) else 'NOT stable'} to ±{args.tolerance} "
          f"over the last {args.stable_rounds}); {discarded} pair(s) discarded for steal > {args.max_steal:.0%}; "
          f"{args.duration} s per run, {args.connections} connections, server on CPU {args.server_core}, "
          f"wrk on CPU {args.client_core}; cache TTL {args.cache_ttl or 60} s; {time.time() - started:.0f} s in all.")
    print(f"Conditions: steal median {median([r['steal'] for r in runs]):.2%} (max {max(r['steal'] for r in runs):.2%}); "
          f"other processes' CPU median {median([r['foreign_load'] for r in runs]):.0%} of both cores; "
          f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end.")
    print()
    print("| variant | server CPU µs/req | cost ratio bare/variant (median [min–max]) | pairs | req/s | p50 µs | p99 µs | store lookups/req | non-2xx |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for v in variants:
        vr = [r for r in kept if r["variant"] == v]
        reqs = sum(r["requests"] for r in vr)
        look = sum(r["lookups"] for r in vr)
        non2xx = sum(r["non2xx"] for r in vr)
        if v == "bare":
            ratio = "1 (baseline)"
        else:
            rs = ratios[v]
            flag = "" if stable[v] else " (not stable)"
            ratio = f"{median(rs):.3f} [{min(rs):.3f}–{max(rs):.3f}]{flag}" if rs else "n/a"
        pairs = len(vr)
        print(f"| {v} | {col(v, 'cpu_us_per_req'):.2f} | {ratio} | {pairs} | {col(v, 'rps'):.0f} | "
              f"{col(v, 'p50_us'):.0f} | {col(v, 'p99_us'):.0f} | {look / reqs if reqs else 0:.4f} | {non2xx} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "ratios": ratios, "history": history}, f, indent=1)


if __name__ == "__main__":
    main()
