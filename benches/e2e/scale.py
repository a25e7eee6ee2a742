#!/usr/bin/env python3
"""Data and report for `make bench-scale` (benches/e2e/scale.sh).

    scale.py toml  --tenants N --keys K OUT.toml --config-head HEAD.toml
        HEAD.toml (server, store, tiers, rule) followed by N tenants with K keys each.
    scale.py store --tenants N --keys K OUT.db
        an embedded store (the SQLite file `[store] kind = "embedded"` opens) holding N tenants
        with K keys each, as the admin API would have written them.
    scale.py secret T K
        the secret of key K of tenant T.
    scale.py report RESULTS.tsv [--write docs/performance.md]

Tenant `t000042` has keys `t000042-k00` to `t000042-kNN`; the secret of each is fixed (see
`secret`), so the benchmark can call any of them, and only its SHA-256 is written anywhere.
"""

import argparse
import hashlib
import json
import pathlib
import sqlite3
import sys
import time

# report.py sits beside this file; importing it must not leave a __pycache__ in the source tree.
sys.dont_write_bytecode = True
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from report import other_load, write  # noqa: E402

BEGIN = "<!-- bench-scale:begin (written by benches/e2e/scale.sh; a rerun replaces this block) -->"
END = "<!-- bench-scale:end -->"
TIER = "standard"


def tenant_id(t):
    return f"t{t:06d}"


def key_id(t, k):
    return f"t{t:06d}-k{k:02d}"


def secret(t, k):
    # 40 characters, the length of a generated key.
    return f"tg_live_scale_{t:06d}_{k:02d}_".ljust(40, "x")


def digest(t, k):
    return hashlib.sha256(secret(t, k).encode()).hexdigest()


def gen_toml(args):
    head = pathlib.Path(args.config_head).read_text()
    with open(args.out, "w") as f:
        f.write(head)
        for t in range(args.tenants):
            f.write(f'\n[[tenants]]\nid = "{tenant_id(t)}"\ntier = "{TIER}"\n')
            for k in range(args.keys):
                f.write(
                    f'\n[[tenants.keys]]\nid = "{key_id(t, k)}"\nhash = "sha256:{digest(t, k)}"\n'
                    'scopes = ["read"]\n'
                )


def gen_store(args):
    now = int(time.time() * 1000)
    db = sqlite3.connect(args.out)
    # The directory tables as src/store/embedded.rs creates them; the store adds the rest when
    # it opens the file.
    db.executescript(
        """
        PRAGMA journal_mode = WAL;
        CREATE TABLE IF NOT EXISTS dir_tenants (id TEXT PRIMARY KEY, record TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS dir_keys (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, record TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS dir_meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
        INSERT OR IGNORE INTO dir_meta (k, v) VALUES ('version', 0);
        """
    )

    def tenants():
        for t in range(args.tenants):
            tid = tenant_id(t)
            record = {
                "id": tid,
                "name": tid,
                "email": "",
                "tier": TIER,
                "status": "active",
                "subdomains": [],
                "ip_allow": [],
                "billing_anchor_day": 1,
                "timezone": "UTC",
                "overrides": {},
                "created_ms": now,
                "updated_ms": now,
            }
            yield tid, json.dumps(record, separators=(",", ":"))

    def keys():
        for t in range(args.tenants):
            for k in range(args.keys):
                kid = key_id(t, k)
                record = {
                    "id": kid,
                    "tenant": tenant_id(t),
                    "name": "",
                    "hash": f"sha256:{digest(t, k)}",
                    "scopes": ["read"],
                    "created_ms": now,
                    "expires_ms": None,
                    "revoked_at_ms": None,
                    "rotated_to": None,
                }
                yield kid, tenant_id(t), json.dumps(record, separators=(",", ":"))

    with db:
        db.executemany("INSERT OR REPLACE INTO dir_tenants (id, record) VALUES (?, ?)", tenants())
        db.executemany("INSERT OR REPLACE INTO dir_keys (id, tenant, record) VALUES (?, ?, ?)", keys())
        db.execute("UPDATE dir_meta SET v = v + 1 WHERE k = 'version'")
    db.close()


def set_store_key(args):
    """Gives key K of tenant T a new secret (`secret(T, 99)`), the way a rotation would."""
    db = sqlite3.connect(args.db)
    kid = key_id(args.t, args.k)
    (record,) = db.execute("SELECT record FROM dir_keys WHERE id = ?", (kid,)).fetchone()
    rec = json.loads(record)
    rec["hash"] = f"sha256:{digest(args.t, 99)}"
    with db:
        db.execute("UPDATE dir_keys SET record = ? WHERE id = ?", (json.dumps(rec, separators=(",", ":")), kid))
        db.execute("UPDATE dir_meta SET v = v + 1 WHERE k = 'version'")
    db.close()


def mib(kb):
    return f"{kb / 1024:,.0f} MiB"


def report(args):
    lines = pathlib.Path(args.results).read_text().splitlines()
    meta = {}
    rows = []
    for line in lines:
        parts = line.split("\t")
        if parts[0] == "meta":
            meta[parts[1]] = parts[2]
        elif parts[0] == "case":
            rows.append(dict(p.split("=", 1) for p in parts[2:]) | {"case": parts[1]})
    out = []
    out.append(
        f"Measured on {meta.get('date', '?')} with `{meta.get('command', 'benches/e2e/scale.sh')}`; the run took "
        f"{meta.get('runtime_s', '?')} s. Machine: {meta.get('machine', '?')}. {meta.get('versions', '')}"
    )
    load = None
    samples = pathlib.Path(args.results).parent / "load-samples.txt"
    if samples.exists() and meta.get("script_pid"):
        load = other_load(samples, int(meta["script_pid"]), 0)
    line = (
        f"Also running: load average {meta.get('load_start', '?')} at the start, "
        f"{meta.get('load_end', '?')} at the end"
    )
    if load:
        others = ", ".join(f"{comm} ({secs / load['wall'] * 100:.0f}% of a CPU)" for comm, secs in load["others"])
        line += (
            f"; over the {load['wall']} s sampled, the CPUs were busy {load['machine_busy']:.0f} s, this benchmark's "
            f"processes {load['ours']} s; other processes (sampled every 5 s, 2% of a CPU or more): {others or 'none'}"
        )
    out.append("")
    out.append(line + ".")
    if meta.get("skipped"):
        out.append("")
        out.append(f"**Skipped:** {meta['skipped']}")
    out.append("")
    out.append(
        "| Case | File | Start → listening | Start → first keyed 200 | VmRSS | VmHWM | "
        "SIGHUP, one key changed → new key answers | VmRSS / VmHWM after the reload |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    by = {}
    for r in rows:
        by[r["case"]] = r
        out.append(
            f"| {r['label']} | {int(r['file_bytes']) / 1048576:,.1f} MiB | {float(r['listen_s']):.2f} s | "
            f"{float(r['ready_s']):.2f} s | {mib(int(r['rss_kb']))} | {mib(int(r['hwm_kb']))} | "
            f"{float(r['reload_s']):.2f} s | {mib(int(r['rss2_kb']))} / {mib(int(r['hwm2_kb']))} |"
        )
    notes = []
    base, small, big = by.get("baseline"), by.get("toml-100k"), by.get("toml-1m")
    if base and small and big:
        per_key = (int(big["rss_kb"]) - int(small["rss_kb"])) * 1024 / 900_000
        per_tenant = ((int(small["rss_kb"]) - int(base["rss_kb"])) * 1024 - 100_000 * per_key) / 100_000
        notes.append(
            f"From the config file: **{per_key:,.0f} bytes per key** ((1M-key VmRSS − 100k-key VmRSS) / 900,000) "
            f"and **{per_tenant:,.0f} bytes per tenant** (the 100k-tenant VmRSS, less the baseline and 100,000 keys, "
            f"/ 100,000). The 1M-key config holds {(int(big['rss_kb']) - int(base['rss_kb'])) / 1024:,.0f} MiB more "
            "than the baseline."
        )
    sbase, ssmall, sbig = by.get("baseline"), by.get("store-100k"), by.get("store-1m")
    if sbase and ssmall and sbig:
        per_key = (int(sbig["rss_kb"]) - int(ssmall["rss_kb"])) * 1024 / 900_000
        per_tenant = ((int(ssmall["rss_kb"]) - int(sbase["rss_kb"])) * 1024 - 100_000 * per_key) / 100_000
        notes.append(
            f"From the embedded store: **{per_key:,.0f} bytes per key** and **{per_tenant:,.0f} bytes per tenant**, "
            f"the same way; the 1M-key store holds {(int(sbig['rss_kb']) - int(sbase['rss_kb'])) / 1024:,.0f} MiB "
            "more than the baseline."
        )
    for r in rows:
        if r.get("store_change_s"):
            notes.append(
                f"{r['label']}: one key rotated in the store (its record rewritten and the directory version "
                f"bumped, as the admin API does) answered with its new secret after "
                f"{float(r['store_change_s']):.2f} s (the store is polled every 500 ms)."
            )
    out.append("")
    out.append(
        "File: the config file, or for the store cases the store's SQLite file. VmRSS is read once the first keyed "
        "request has answered and VmRSS has settled (moved less than 1% over 2 s); VmHWM is the peak so far."
    )
    if notes:
        out.append("")
        out.extend(f"- {n}" for n in notes)
    block = "\n".join(out) + "\n"
    sys.stdout.write(block)
    if args.write:
        write(pathlib.Path(args.write), block, BEGIN, END)
        print(f"bench-scale: written into {args.write}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("toml")
    t.add_argument("--tenants", type=int, required=True)
    t.add_argument("--keys", type=int, required=True)
    t.add_argument("--config-head", required=True)
    t.add_argument("out")
    s = sub.add_parser("store")
    s.add_argument("--tenants", type=int, required=True)
    s.add_argument("--keys", type=int, required=True)
    s.add_argument("out")
    k = sub.add_parser("secret")
    k.add_argument("t", type=int)
    k.add_argument("k", type=int)
    c = sub.add_parser("store-rotate")
    c.add_argument("db")
    c.add_argument("t", type=int)
    c.add_argument("k", type=int)
    h = sub.add_parser("hash")
    h.add_argument("t", type=int)
    h.add_argument("k", type=int)
    r = sub.add_parser("report")
    r.add_argument("results")
    r.add_argument("--write")
    args = ap.parse_args()
    if args.cmd == "toml":
        gen_toml(args)
    elif args.cmd == "store":
        gen_store(args)
    elif args.cmd == "secret":
        print(secret(args.t, args.k))
    elif args.cmd == "hash":
        print(digest(args.t, args.k))
    elif args.cmd == "store-rotate":
        set_store_key(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
