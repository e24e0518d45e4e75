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

With --head-to-head A:B, the two variants' servers are instead loaded at the same time, both
on the server core, one wrk each on the client core: both see the same machine in the same
seconds, so the ratio cost(A)/cost(B) of each such run cancels most of the noise that
separates two runs taken one after the other.

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
    # Issue 19 target 3: one variant per feature (a key that uses it), to set against
    # `keywarden-hit` (section 11).
    "keywarden-hit-allowlist",
    "keywarden-hit-owner",
    # Issue 15: a key with credits (10^12, never run out; section 12).
    "keywarden-hit-credits",
]
# Not in the default list: they read `X-Api-Key` only (`--header x-api-key`).
HANDWRITTEN = ["handwritten", "handwritten-10k"]
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


def store_calls(port):
    """The server's store calls on the request path so far: digest lookups, credit leases,
    credit returns."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as resp:
        stats = json.load(resp)
    return {k: stats.get(k, 0) for k in ("lookups", "leases", "returns")}


def pin(core):
    return ["taskset", "-c", str(core)] if core is not None else []


class Server:
    def __init__(self, variant, port, args, workdir):
        self.variant = variant
        self.port = port
        # `variant@binary` runs that variant from another build of the load server (to
        # compare two builds head to head).
        name, _, binary = variant.partition("@")
        self.keys_file = os.path.join(workdir, f"{variant.replace('/', '_')}.keys")
        cmd = pin(args.server_core) + [
            binary or args.binary,
            "--variant", name,
            "--addr", f"127.0.0.1:{port}",
            "--keys-file", self.keys_file,
            "--dir", workdir,
        ] + (["--cache-ttl", str(args.cache_ttl)] if args.cache_ttl else []) + (
            ["--credit-block", str(args.credit_block)] if args.credit_block else [])
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


def start_wrk(server, args, duration):
    """Starts one measured run; `finish_wrk` completes it."""
    calls0 = store_calls(server.port)  # before the CPU reading: /stats is not part of the run
    cmd = pin(args.client_core) + [
        "wrk", "-t1", f"-c{args.connections}", f"-d{duration}s", "--timeout", "5s",
        "-s", os.path.join(HERE, "wrk.lua"), f"http://127.0.0.1:{server.port}/",
    ]
    env = dict(os.environ, KEYS_FILE=server.keys_file, KEY_HEADER=args.header)
    cpu0 = proc_cpu_seconds(server.proc.pid)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return {"server": server, "proc": proc, "calls0": calls0, "cpu0": cpu0, "duration": duration}


def finish_wrk(run):
    server = run["server"]
    stdout, stderr = run["proc"].communicate(timeout=run["duration"] + 60)
    cpu1 = proc_cpu_seconds(server.proc.pid)
    calls1 = store_calls(server.port)  # after the CPU reading
    summary = None
    for line in stdout.splitlines():
        if line.startswith("WRKJSON "):
            summary = json.loads(line[len("WRKJSON "):])
    if summary is None or summary["requests"] == 0:
        raise SystemExit(f"{server.variant}: wrk failed: {stdout}\n{stderr}")
    server_cpu = cpu1 - run["cpu0"]
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
        "lookups": calls1["lookups"] - run["calls0"]["lookups"],
        "leases": calls1["leases"] - run["calls0"]["leases"],
        "returns": calls1["returns"] - run["calls0"]["returns"],
    }


def run_together(servers, args, duration):
    """Loads every server in `servers` at the same time (one wrk each): one dict per server,
    with the machine's steal and other processes' load over the common window."""
    sys0 = system_cpu()
    child0 = children_cpu()
    started = [start_wrk(server, args, duration) for server in servers]
    results = [finish_wrk(run) for run in started]
    child1 = children_cpu()
    sys1 = system_cpu()
    total = sys1[0] - sys0[0]
    busy = total - (sys1[1] - sys0[1])
    ours = sum(r["server_cpu_s"] for r in results) + (child1 - child0)
    for r in results:
        r["steal"] = (sys1[2] - sys0[2]) / total if total else 0.0
        # CPU used by everything but these servers and their wrk, as a share of all CPUs.
        r["foreign_load"] = max(0.0, busy / CLK_TCK - ours) / (total / CLK_TCK) if total else 0.0
    return results


def run_wrk(server, args, duration):
    """One measured run: returns a dict of figures."""
    return run_together([server], args, duration)[0]


def round_trips(runs):
    """Credit leases and returns per 1,000 requests over `runs`, as `total (leases + returns)`."""
    reqs = sum(r["requests"] for r in runs)
    leases = sum(r.get("leases", 0) for r in runs)
    returns = sum(r.get("returns", 0) for r in runs)
    if not reqs:
        return "0"
    per = lambda n: n * 1000 / reqs
    return f"{per(leases + returns):.4f} ({per(leases):.4f} + {per(returns):.4f})"


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
    p.add_argument("--header", choices=["bearer", "x-api-key"], default="bearer",
                   help="how the client sends the key: `Authorization: Bearer` or `X-Api-Key` "
                        "(needed by the handwritten variants)")
    p.add_argument("--head-to-head", default=None, metavar="A:B[,C:D...]",
                   help="instead of alternating each variant with bare, load A and B at the same "
                        "time (two wrk, both servers on the server core) and report cost(A)/cost(B) "
                        "and cost(B) - cost(A) per pair; a variant written VARIANT@PATH runs from the "
                        "load server at PATH (two builds head to head)")
    p.add_argument("--credit-block", type=int, default=None,
                   help="the most credits one lease takes, for keys with credits "
                        "(keywarden-hit-credits; default: the layer's 100)")
    p.add_argument("--cache-ttl", type=int, default=None,
                   help="cache TTL in seconds for the cached keywarden variants (default: the layer's 60 s); "
                        "runs load each server only a few seconds per round, so a short TTL expires idle keys")
    args = p.parse_args()
    if os.cpu_count() < 2 or shutil.which("taskset") is None:
        args.server_core = args.client_core = None
        print("note: fewer than 2 CPUs or no taskset; not pinning", file=sys.stderr)

    named = args.head_to_head.replace(":", ",") if args.head_to_head else args.variants
    if args.header != "x-api-key" and any(
        v.strip().partition("@")[0] in HANDWRITTEN for v in named.split(",")
    ):
        raise SystemExit("the handwritten variants read X-Api-Key only: add --header x-api-key")
    if args.head_to_head:
        return head_to_head(args)
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
          f"wrk on CPU {args.client_core}; cache TTL {args.cache_ttl or 60} s; credit block {args.credit_block or 100}; "
          f"{time.time() - started:.0f} s in all.")
    print(f"Conditions: steal median {median([r['steal'] for r in runs]):.2%} (max {max(r['steal'] for r in runs):.2%}); "
          f"other processes' CPU median {median([r['foreign_load'] for r in runs]):.0%} of both cores; "
          f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end.")
    print()
    print("| variant | server CPU µs/req | cost ratio bare/variant (median [min–max]) | pairs | req/s | p50 µs | p99 µs | store lookups/req | credit leases + returns per 1,000 req | non-2xx |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for v in variants:
        vr = [r for r in kept if r["variant"] == v]
        reqs = sum(r["requests"] for r in vr)
        look = sum(r["lookups"] for r in vr)
        credit_trips = round_trips(vr)
        non2xx = sum(r["non2xx"] for r in vr)
        if v == "bare":
            ratio = "1 (baseline)"
        else:
            rs = ratios[v]
            flag = "" if stable[v] else " (not stable)"
            ratio = f"{median(rs):.3f} [{min(rs):.3f}–{max(rs):.3f}]{flag}" if rs else "n/a"
        pairs = len(vr)
        print(f"| {v} | {col(v, 'cpu_us_per_req'):.2f} | {ratio} | {pairs} | {col(v, 'rps'):.0f} | "
              f"{col(v, 'p50_us'):.0f} | {col(v, 'p99_us'):.0f} | {look / reqs if reqs else 0:.4f} | {credit_trips} | {non2xx} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs, "ratios": ratios, "history": history}, f, indent=1)


def head_to_head(args):
    """Pairs of variants loaded at the same time: both servers share the server core and see
    the same machine, so noise that moves one moves the other."""
    pairs = []
    for spec in args.head_to_head.split(","):
        a, sep, b = spec.strip().partition(":")
        if not sep or not a or not b or a == b:
            raise SystemExit(f"--head-to-head: bad pair {spec!r} (want A:B)")
        pairs.append((a, b))
    variants = []
    for a, b in pairs:
        for v in (a, b):
            if v not in variants:
                variants.append(v)
    workdir = tempfile.mkdtemp(prefix="keywarden-load-")
    servers = {}
    started = time.time()
    load_start = os.getloadavg()
    runs = []
    ratios = {p: [] for p in pairs}
    extra = {p: [] for p in pairs}
    history = {p: [] for p in pairs}
    discarded = 0
    rounds = 0
    try:
        for i, v in enumerate(variants):
            print(f"starting {v} ...", file=sys.stderr, flush=True)
            servers[v] = Server(v, args.base_port + i, args, workdir)
        for v in variants:
            run_wrk(servers[v], args, args.warmup)  # warm caches, connections, allocator
        while rounds < args.max_rounds:
            rounds += 1
            order = pairs[rounds % len(pairs):] + pairs[:rounds % len(pairs)]
            for pair in order:
                a, b = pair
                # Alternate which wrk starts first.
                together = [servers[a], servers[b]] if rounds % 2 else [servers[b], servers[a]]
                res = {r["variant"]: r for r in run_together(together, args, args.duration)}
                ra, rb = res[a], res[b]
                steal = ra["steal"]
                keep = steal <= args.max_steal
                for r in (ra, rb):
                    r.update(round=rounds, pair_with=f"{a}:{b}", kept=keep)
                    runs.append(r)
                if not keep:
                    discarded += 1
                    print(f"round {rounds} {a}:{b}: discarded, steal {steal:.1%}", file=sys.stderr)
                    continue
                ratios[pair].append(ra["cpu_us_per_req"] / rb["cpu_us_per_req"])
                extra[pair].append(rb["cpu_us_per_req"] - ra["cpu_us_per_req"])
            for pair in pairs:
                history[pair].append(median(ratios[pair]))
            line = " ".join(f"{a}:{b}={history[(a, b)][-1]:.3f}" for a, b in pairs)
            print(f"round {rounds}: {line}", file=sys.stderr, flush=True)
            if rounds >= args.min_rounds and all(
                len(history[p]) >= args.stable_rounds
                and max(history[p][-args.stable_rounds:]) - min(history[p][-args.stable_rounds:])
                <= 2 * args.tolerance
                and len(ratios[p]) >= 3
                for p in pairs
            ):
                break
        stable = {
            p: max(history[p][-args.stable_rounds:]) - min(history[p][-args.stable_rounds:])
            <= 2 * args.tolerance
            for p in pairs
        }
    finally:
        for s in servers.values():
            s.stop()
    load_end = os.getloadavg()
    kept = [r for r in runs if r["kept"]]

    print()
    print(f"Head to head: {rounds} rounds ({'stable' if all(stable.values()) else 'NOT stable'} to "
          f"±{args.tolerance} over the last {args.stable_rounds}); {discarded} pair(s) discarded for "
          f"steal > {args.max_steal:.0%}; {args.duration} s per run, {args.connections} connections "
          f"per server, both servers on CPU {args.server_core}, both wrk on CPU {args.client_core}; "
          f"header {args.header}; cache TTL {args.cache_ttl or 60} s; credit block {args.credit_block or 100}; "
          f"{time.time() - started:.0f} s in all.")
    print(f"Conditions: steal median {median([r['steal'] for r in runs]):.2%} (max {max(r['steal'] for r in runs):.2%}); "
          f"other processes' CPU median {median([r['foreign_load'] for r in runs]):.0%} of both cores; "
          f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end.")
    print()
    print("| A | B | cost ratio A/B (median [min–max]) | B − A µs/req (median [min–max]) | pairs | A µs/req | B µs/req | A req/s | B req/s | B store lookups/req | B credit leases + returns per 1,000 req | non-2xx |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for pair in pairs:
        a, b = pair
        rs, xs = ratios[pair], extra[pair]
        ka = [r for r in kept if r["variant"] == a and r["pair_with"] == f"{a}:{b}"]
        kb = [r for r in kept if r["variant"] == b and r["pair_with"] == f"{a}:{b}"]
        flag = "" if stable[pair] else " (not stable)"
        ratio = f"{median(rs):.3f} [{min(rs):.3f}–{max(rs):.3f}]{flag}" if rs else "n/a"
        diff = f"{median(xs):+.3f} [{min(xs):+.3f}–{max(xs):+.3f}]" if xs else "n/a"
        reqs_b = sum(r["requests"] for r in kb)
        look_b = sum(r["lookups"] for r in kb)
        credit_trips = round_trips(kb)
        non2xx = sum(r["non2xx"] for r in ka + kb)
        print(f"| {a} | {b} | {ratio} | {diff} | {len(rs)} | "
              f"{median([r['cpu_us_per_req'] for r in ka]):.2f} | {median([r['cpu_us_per_req'] for r in kb]):.2f} | "
              f"{median([r['rps'] for r in ka]):.0f} | {median([r['rps'] for r in kb]):.0f} | "
              f"{look_b / reqs_b if reqs_b else 0:.4f} | {credit_trips} | {non2xx} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs,
                       "ratios": {f"{a}:{b}": v for (a, b), v in ratios.items()},
                       "extra_us": {f"{a}:{b}": v for (a, b), v in extra.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
