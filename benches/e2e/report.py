#!/usr/bin/env python3
"""The report of `make bench-e2e`: reads what benches/e2e/run.sh left in its results directory,
prints a Markdown table and, with --write FILE, puts it into FILE between the `bench-e2e`
markers (replacing what a previous run put there; the markers are appended when missing).

    benches/e2e/report.py target/bench-e2e [--write docs/performance.md]

Every cell is the median over the rounds, with the minimum and maximum. Ratios are taken within
a round (a variant against the bare hop measured in the same round), then summarised.
"""

import argparse
import collections
import pathlib
import statistics
import sys

BEGIN = "<!-- bench-e2e:begin (written by benches/e2e/run.sh; a rerun replaces this block) -->"
END = "<!-- bench-e2e:end -->"

# Throughput targets, as a share of the bare hop's requests per second; and the p99 bound.
TARGETS = {"public": 0.97, "embedded": 0.95, "json": 0.90, "redis": 0.93}
P99_ADDED_US = 100.0
GATEWAY = ("public", "keyed", "embedded", "redis", "json")


def read_tsv(path):
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, line.split("\t"))) for line in lines[1:] if line]


def read_meta(path):
    meta, labels = {}, {}
    for line in path.read_text().splitlines():
        parts = line.split("\t")
        if parts[0] == "label":
            labels[parts[1]] = parts[2]
        elif len(parts) >= 2:
            meta[parts[0]] = parts[1]
    return meta, labels


def spread(values, fmt):
    """`median (min–max)`, or the value alone when there is one."""
    med = statistics.median(values)
    if len(values) == 1 or min(values) == max(values):
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(values))}–{fmt(max(values))})"


def thousands(v):
    return f"{v:,.0f}"


def micros(v):
    return f"{v:,.0f}"


def cpu(v):
    return f"{v:.1f}"


def ratio(v):
    return f"{v:.2f}"


def added(v):
    return f"{v:+,.0f}"


def other_load(samples_path, script_pid, seconds):
    """What else used the CPU during the run: the machine's busy time (from /proc/stat) less this
    benchmark's processes (the script and its descendants), and the busiest other processes."""
    snapshots = []
    for line in samples_path.read_text().splitlines():
        if line.startswith("@ "):
            parts = line.split()
            # "@ <time> cpu user nice system idle iowait irq softirq steal ..."
            ticks = [int(x) for x in parts[3:]]
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
            snapshots.append({"time": int(parts[1]), "busy": sum(ticks[:8]) - idle, "procs": {}})
        elif snapshots:
            parts = line.split(None, 3)
            if len(parts) == 4:
                pid, ppid, secs, comm = parts
                snapshots[-1]["procs"][int(pid)] = (int(ppid), int(secs), comm.strip())
    if len(snapshots) < 2:
        return None
    # This benchmark's processes: the script and everything below it, in any snapshot.
    ours = {script_pid}
    for snap in snapshots:
        changed = True
        while changed:
            changed = False
            for pid, (ppid, _, _) in snap["procs"].items():
                if ppid in ours and pid not in ours:
                    ours.add(pid)
                    changed = True
    first, last = snapshots[0], snapshots[-1]
    wall = max(1, last["time"] - first["time"])
    hz = 100.0
    machine_busy = (last["busy"] - first["busy"]) / hz
    used = collections.Counter()
    seen_first = {}
    for snap in snapshots:
        for pid, (_, secs, comm) in snap["procs"].items():
            if pid in ours:
                continue
            if pid not in seen_first:
                # A process that was already there counts from the first snapshot; one that
                # started later counts whole.
                seen_first[pid] = secs if snap is first else 0
            used[(pid, comm)] = max(used[(pid, comm)], secs - seen_first[pid])
    by_name = collections.Counter()
    for (_, comm), secs in used.items():
        by_name[comm] += secs
    others = [(comm, secs) for comm, secs in by_name.most_common() if secs / wall >= 0.02]
    ours_secs = 0
    for pid in ours:
        a = first["procs"].get(pid)
        b = last["procs"].get(pid)
        if b is not None:
            ours_secs += b[1] - (a[1] if a else 0)
    return {"wall": wall, "machine_busy": machine_busy, "others": others, "ours": ours_secs}


def build(out):
    meta, labels = read_meta(out / "meta.tsv")
    rows = read_tsv(out / "results.tsv")
    variants = meta.get("variants", "").split()
    by = collections.defaultdict(dict)
    for row in rows:
        by[row["variant"]][int(row["round"])] = {k: float(v) for k, v in row.items() if k not in ("variant",)}
    rounds = sorted({r for v in by.values() for r in v})
    bare = by.get("bare", {})

    lines = []
    lines.append(
        f"Measured on {meta['date']} with `{meta['command']}` ({meta['settings']}); the run took "
        f"{int(meta['runtime_s']) // 60} min {int(meta['runtime_s']) % 60} s."
    )
    lines.append("")
    lines.append(
        f"- Machine: {meta['nproc']} CPUs ({meta['cpu']}), {meta['memory']} of RAM, {meta['kernel']}. "
        f"Pinning: {meta['pinning']}."
    )
    lines.append(
        f"- Versions: {meta['tollgate']}, Pingora {meta['pingora']}, {meta['rustc']}, nginx {meta['nginx']}, "
        f"wrk {meta['wrk']}, redis-server {meta['redis']}. Allocators: {meta.get('allocators', '?')}."
    )
    lines.append(
        f"- Load: `wrk -t1 -c{meta['connections']} -d<N>s --latency`, {len(rounds)} interleaved "
        f"round{'s' if len(rounds) != 1 else ''} (the order "
        "rotates each round), each measured run after a warm-up run; the upstream answers 26 bytes of JSON."
    )
    try:
        start = open(out / "loadavg-start.txt").read().split()[:3]
        end = open(out / "loadavg-end.txt").read().split()[:3]
        load = other_load(out / "load-samples.txt", int(meta["script_pid"]), int(meta["runtime_s"]))
    except (OSError, KeyError, ValueError):
        load, start, end = None, None, None
    if load:
        others = ", ".join(f"{comm} ({secs / load['wall'] * 100:.0f}% of a CPU)" for comm, secs in load["others"])
        lines.append(
            f"- Also running: load average {' '.join(start)} at the start, {' '.join(end)} at the end. Over the "
            f"{load['wall']} s sampled, the CPUs were busy {load['machine_busy']:.0f} s, this benchmark's "
            f"processes {load['ours']} s; other processes (sampled every 5 s, 2% of a CPU or more): "
            f"{others or 'none'}."
        )
    lines.append("")
    lines.append(
        "| Variant | Requests/s | × bare | CPU used | CPU µs/request | Capacity × bare | p50 µs | p99 µs | "
        "Target | Met |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---|:---:|")
    problems = []
    latency_rows = []
    # On one connection, a p99 more than ten times the p50 of a hop that does nothing is the
    # machine (other processes taking the CPU), not the hop: the p99 target is not judged then.
    bare_rounds = sorted(bare)
    tail_noise = bool(bare_rounds) and statistics.median(bare[r]["one_p99_us"] for r in bare_rounds) > 10 * max(
        1.0, statistics.median(bare[r]["one_p50_us"] for r in bare_rounds)
    )
    for v in variants:
        data = by.get(v)
        if not data:
            continue
        rs = sorted(data)
        col = lambda k: [data[r][k] for r in rs]  # noqa: E731
        bad = sum(data[r]["non2xx"] + data[r]["errors"] for r in rs)
        if bad:
            problems.append(f"{labels.get(v, v)}: {bad:.0f} answers other than 2xx or socket errors")
        paired = [r for r in rs if r in bare]

        def within(key, f):
            return [f(data[r][key], bare[r][key]) for r in paired]

        if v == "bare":
            c_ratio, c_cap = "1", "1"
        elif paired:
            r_rps = within("rps", lambda a, b: a / b)
            r_cap = within("cpu_us", lambda a, b: b / a)
            c_ratio, c_cap = spread(r_rps, ratio), spread(r_cap, ratio)
        else:
            c_ratio = c_cap = "–"
        target, met = "", ""
        if v in TARGETS and paired:
            want = TARGETS[v]
            got = statistics.median(r_cap)
            target = f"≥ {want:.2f}×"
            met = "yes" if got >= want else f"no ({(got - want) * 100:+.0f} points)"
        lines.append(
            f"| {labels.get(v, v)} | {spread(col('rps'), thousands)} | {c_ratio} | {spread(col('cpu_util'), ratio)} | "
            f"{spread(col('cpu_us'), cpu)} | {c_cap} | {spread(col('p50_us'), micros)} | "
            f"{spread(col('p99_us'), micros)} | {target} | {met} |"
        )
        if all(data[r].get("one_rps", 0) > 0 for r in rs):
            if v == "bare":
                a50 = a99 = "–"
                lmet = ""
            elif paired:
                add50 = within("one_p50_us", lambda a, b: a - b)
                add99 = within("one_p99_us", lambda a, b: a - b)
                a50, a99 = spread(add50, added), spread(add99, added)
                lmet = ""
                if v in GATEWAY:
                    got = statistics.median(add99)
                    if tail_noise:
                        lmet = "not judged"
                    else:
                        lmet = "yes" if got <= P99_ADDED_US else f"no (+{got - P99_ADDED_US:.0f} µs)"
            else:
                a50 = a99 = lmet = "–"
            latency_rows.append(
                f"| {labels.get(v, v)} | {spread(col('one_rps'), thousands)} | {spread(col('one_p50_us'), micros)} | "
                f"{spread(col('one_p99_us'), micros)} | {a50} | {a99} | {lmet} |"
            )
    lines.append("")
    lines.append(
        "Medians over the rounds, min–max in brackets. `× bare` compares each variant with the bare hop measured in "
        "the same round. CPU µs/request is the proxy process's user + system time (all its threads) over the "
        "measured run, divided by the requests completed; `CPU used` is that time over the run's length (1 = a "
        "whole CPU). `Capacity × bare` is the bare hop's CPU µs/request over the variant's, in the same round: "
        "the throughput ratio when each proxy has a CPU to itself. The targets are judged on it, because on a "
        "shared machine the requests/s a proxy reaches also depend on how much of its CPU other processes took "
        "during its turn. `Points` are hundredths of the bare hop's capacity. Loaded p50 and p99 are mostly "
        "queueing behind 64 connections; the hop's own latency is in the next table."
    )
    if meta.get("json_log_bytes"):
        lines.append(f"The JSON access log wrote {meta['json_log_bytes']} bytes per request (to a file).")
    if problems:
        lines.append("")
        lines.append("**Refused or failed requests:** " + "; ".join(problems) + ".")
    else:
        lines.append("Every answer was a 200; no socket errors.")
    if latency_rows:
        lines.append("")
        lines.append(
            "The hop's own latency: right after each loaded run, the same variant on one connection "
            "(`wrk -t1 -c1`), so that no request waits behind another. Target: p99 added ≤ "
            f"{P99_ADDED_US:.0f} µs."
        )
        lines.append("")
        lines.append("| Variant | Requests/s | p50 µs | p99 µs | p50 added µs | p99 added µs | Met |")
        lines.append("|---|---:|---:|---:|---:|---:|:---:|")
        lines.extend(latency_rows)
        if tail_noise:
            lines.append("")
            lines.append(
                "The bare hop's own p99 on one connection was more than ten times its p50: the tail was set by other "
                "processes taking the CPUs, not by the hops, so the p99 target is not judged from this run. The p50 "
                "added is the hop's own cost."
            )

    perf = [v for v in meta.get("perf_variants", "").split() if (out / f"perf-{v}.txt").exists()]
    if perf:
        lines.append("")
        lines.append(
            f"Profiles (`perf record -F 999 -g -p PID` for 6 s under the same load, `perf report --no-children`, "
            f"self time; {meta.get('perf', 'perf')}):"
        )
        for v in perf:
            parts = (out / f"perf-{v}.txt").read_text().strip("\n").split("\n--\n")
            lines.append("")
            lines.append(
                f"<details><summary>{labels.get(v, v)}: by object, the hottest symbols, the hottest symbols of "
                "the proxy's own binary</summary>"
            )
            lines.append("")
            lines.append("```text")
            for i, part in enumerate(parts):
                if i:
                    lines.append("")
                lines.extend(line.rstrip() for line in part.splitlines())
            lines.append("```")
            lines.append("")
            lines.append("</details>")
    return "\n".join(lines) + "\n" + store_traffic(out)


def store_traffic(out):
    """The Redis variant's store round trips, under load and idle (store-traffic.tsv)."""
    path = out / "store-traffic.tsv"
    if not path.exists():
        return ""
    lines = ["", "Store round trips of the Redis variant (`tollgate_store_round_trips_total` by `op`):", ""]
    lines.append("| When | Op | Round trips | Per request | Rate |")
    lines.append("|---|---|---:|---:|---:|")
    for row in path.read_text().splitlines():
        when, span, op, count, per_request, rate = (row.split("\t") + [""] * 6)[:6]
        lines.append(f"| {when} ({span}) | `{op}` | {count} | {per_request.replace(' per request', '')} | {rate} |")
    return "\n".join(lines) + "\n"


def write(doc, block, begin=BEGIN, end=END):
    """Puts `block` between the markers in `doc`, replacing what was there; appends the markers
    when they are missing."""
    text = doc.read_text()
    new = f"{begin}\n{block}{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + new + tail
    else:
        text = text.rstrip("\n") + "\n\n" + new + "\n"
    doc.write_text(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=pathlib.Path)
    ap.add_argument("--write", type=pathlib.Path, help="the Markdown file to put the table into")
    args = ap.parse_args()
    block = build(args.results)
    sys.stdout.write(block)
    if args.write:
        write(args.write, block)
        print(f"bench-e2e: written into {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
