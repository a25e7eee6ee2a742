#!/usr/bin/env python3
"""Data, measurements and report for `make bench-scale` (benches/e2e/scale.sh).

Data:

    scale.py toml  --tenants N --keys K OUT.toml --config-head HEAD.toml
        HEAD.toml (server, store, tiers, rule) followed by N tenants with K keys each.
    scale.py store --tenants N --keys K OUT.db
        an embedded store (the SQLite file `[store] kind = "embedded"` opens) holding N tenants
        with K keys each, as the admin API would have written them.
    scale.py redis --tenants N --keys K
        the same records as Redis commands (RESP, for `redis-cli --pipe`), in the layout of the
        Redis store.
    scale.py secret T K / hash T K
        the secret of key K of tenant T, or its SHA-256.
    scale.py token
        the admin bearer token the benchmark uses and its `token_hash`.
    scale.py store-rotate DB T K
        key K of tenant T gets the secret `secret(T, 99)` in the store, as the admin API would
        write it (record, version and change feed).

Measurements (each prints `name=value` fields, tab-separated, for the results file):

    scale.py wait-start     start → data port answers, → /readyz 200, → first keyed 200
    scale.py admin-writes   keys created through the admin API, and when they answer
    scale.py admin-reads    the admin API's tenant list pages, a tenant and its keys
    scale.py follow         keys created on instance A, and when instance B answers them
    scale.py reloads        SIGHUP reloads of a config file, with a probe of the data port
    scale.py probe          (run by `reloads`) one connection's requests, one after another
    scale.py settle-after   waits until VmRSS has settled once a reload's thread has ended

    scale.py report RESULTS.tsv [--write docs/performance.md]

Tenant `t000042` has keys `t000042-k00` to `t000042-kNN`; the secret of each is fixed (see
`secret`), so the benchmark can call any of them, and only its SHA-256 is written anywhere.
"""

import argparse
import hashlib
import http.client
import json
import math
import os
import pathlib
import random
import signal
import sqlite3
import subprocess
import sys
import time

# report.py sits beside this file; importing it must not leave a __pycache__ in the source tree.
sys.dont_write_bytecode = True
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from report import other_load, write  # noqa: E402

BEGIN = "<!-- bench-scale:begin (written by benches/e2e/scale.sh; a rerun replaces this block) -->"
END = "<!-- bench-scale:end -->"
TIER = "standard"
# The admin bearer token of every case (the config holds its SHA-256 only).
ADMIN_TOKEN = "tg_admin_scale_benchmark_".ljust(40, "0")
HOST = "127.0.0.1"


def tenant_id(t):
    return f"t{t:06d}"


def key_id(t, k):
    return f"t{t:06d}-k{k:02d}"


def secret(t, k):
    # 40 characters, the length of a generated key.
    return f"tg_live_scale_{t:06d}_{k:02d}_".ljust(40, "x")


def digest(t, k):
    return hashlib.sha256(secret(t, k).encode()).hexdigest()


def compact(obj):
    return json.dumps(obj, separators=(",", ":"))


def tenant_record(t, now):
    tid = tenant_id(t)
    return {
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


def key_record(t, k, now):
    return {
        "id": key_id(t, k),
        "tenant": tenant_id(t),
        "name": "",
        "hash": f"sha256:{digest(t, k)}",
        "scopes": ["read"],
        "created_ms": now,
        "expires_ms": None,
        "revoked_at_ms": None,
        "rotated_to": None,
    }


# ---------------------------------------------------------------------------------------------
# Data


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


# The directory tables as `directory_schema()` in src/store/embedded.rs creates them: records,
# the tenant index of the keys, the version, and the change feed.
STORE_SCHEMA = """
    PRAGMA journal_mode = WAL;
    CREATE TABLE IF NOT EXISTS dir_tenants (id TEXT PRIMARY KEY, record TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS dir_keys (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, record TEXT NOT NULL);
    CREATE TABLE IF NOT EXISTS dir_meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
    INSERT OR IGNORE INTO dir_meta (k, v) VALUES ('version', 0);
    CREATE TABLE IF NOT EXISTS dir_changes (version INTEGER PRIMARY KEY, change TEXT NOT NULL);
"""


def gen_store(args):
    """Every record, and the version the admin API would have reached writing them one by one
    (one per tenant and per key). The feed is left empty: the admin API would have kept the last
    10,000 changes, which only an instance behind that version reads, and a start loads every
    record whatever the feed holds."""
    now = int(time.time() * 1000)
    db = sqlite3.connect(args.out)
    db.executescript(STORE_SCHEMA)

    def tenants():
        for t in range(args.tenants):
            yield tenant_id(t), compact(tenant_record(t, now))

    def keys():
        for t in range(args.tenants):
            for k in range(args.keys):
                yield key_id(t, k), tenant_id(t), compact(key_record(t, k, now))

    with db:
        db.executemany("INSERT OR REPLACE INTO dir_tenants (id, record) VALUES (?, ?)", tenants())
        db.executemany("INSERT OR REPLACE INTO dir_keys (id, tenant, record) VALUES (?, ?, ?)", keys())
        db.execute(
            "UPDATE dir_meta SET v = v + ? WHERE k = 'version'", (args.tenants + args.tenants * args.keys,)
        )
    # Built after the rows (faster than row by row); the store would otherwise build it when
    # it opens the file, inside the start being measured.
    db.execute("CREATE INDEX IF NOT EXISTS dir_keys_tenant ON dir_keys (tenant)")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


def set_store_key(args):
    """Gives key K of tenant T a new secret (`secret(T, 99)`), as the admin API's rotation writes
    it: the record, the version bump and the change in the feed, in one transaction."""
    db = sqlite3.connect(args.db)
    kid = key_id(args.t, args.k)
    (record,) = db.execute("SELECT record FROM dir_keys WHERE id = ?", (kid,)).fetchone()
    rec = json.loads(record)
    rec["hash"] = f"sha256:{digest(args.t, 99)}"
    with db:
        db.execute("UPDATE dir_keys SET record = ? WHERE id = ?", (compact(rec), kid))
        (version,) = db.execute("UPDATE dir_meta SET v = v + 1 WHERE k = 'version' RETURNING v").fetchone()
        db.execute(
            "INSERT OR REPLACE INTO dir_changes (version, change) VALUES (?, ?)",
            (version, compact({"version": version, "op": "key", "record": rec})),
        )
    db.close()


def resp(*parts):
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        b = p if isinstance(p, bytes) else str(p).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


def gen_redis(args):
    """The Redis store's layout (src/store/redis.rs): `tg:{dir}:tenants` and `tg:{dir}:keys`
    (id → record JSON), a `tg:{dir}:tenant-keys:<tenant>` set per tenant, `tg:{dir}:version`.
    The feed (`tg:{dir}:changes`) is left empty, as for the embedded store."""
    now = int(time.time() * 1000)
    out = sys.stdout.buffer
    batch = 500
    out.write(resp("DEL", "tg:{dir}:tenants", "tg:{dir}:keys", "tg:{dir}:changes", "tg:{dir}:version"))
    fields = []
    for t in range(args.tenants):
        fields += [tenant_id(t), compact(tenant_record(t, now))]
        if len(fields) >= 2 * batch:
            out.write(resp("HSET", "tg:{dir}:tenants", *fields))
            fields = []
    if fields:
        out.write(resp("HSET", "tg:{dir}:tenants", *fields))
    fields = []
    for t in range(args.tenants):
        ids = [key_id(t, k) for k in range(args.keys)]
        for k in range(args.keys):
            fields += [ids[k], compact(key_record(t, k, now))]
        out.write(resp("SADD", f"tg:{{dir}}:tenant-keys:{tenant_id(t)}", *ids))
        if len(fields) >= 2 * batch:
            out.write(resp("HSET", "tg:{dir}:keys", *fields))
            fields = []
    if fields:
        out.write(resp("HSET", "tg:{dir}:keys", *fields))
    out.write(resp("SET", "tg:{dir}:version", args.tenants + args.tenants * args.keys))
    out.flush()


# ---------------------------------------------------------------------------------------------
# Measurements


def ms(seconds):
    return f"{seconds * 1000:.3f}"


def pct(values, p):
    """Nearest-rank percentile: of 200 values p99 is the 198th, of 50 it is the largest."""
    s = sorted(values)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def fields(prefix, values):
    """`prefix_p50`, `prefix_p99` and `prefix_max` of a list of seconds, in milliseconds."""
    return {f"{prefix}_p50_ms": ms(pct(values, 50)), f"{prefix}_p99_ms": ms(pct(values, 99)),
            f"{prefix}_max_ms": ms(max(values))}


def emit(out):
    print("\t".join(f"{k}={v}" for k, v in out.items()))


class Client:
    """One keep-alive HTTP/1.1 connection; reconnects when the server has closed it."""

    def __init__(self, port, timeout=5.0):
        self.port, self.timeout, self.conn = port, timeout, None

    def call(self, method, path, body=None, headers=None):
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                r = self.conn.getresponse()
                data = r.read()
                if r.getheader("connection", "").lower() == "close":
                    self.close()
                return r.status, data
            except (http.client.HTTPException, ConnectionError, OSError):
                self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def status_of(port, path, headers=None):
    """The status of one request on a new connection; 0 when nothing answers."""
    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=2)
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        r.read()
        conn.close()
        return r.status
    except (http.client.HTTPException, OSError):
        return 0


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def bearer(s):
    return {"Authorization": f"Bearer {s}"}


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"}


def fail(msg):
    print(f"bench-scale: {msg}", file=sys.stderr)
    sys.exit(1)


def wait_start(args):
    """Polls from `--t0-ms` (when `tollgate run` was started), each request on a new connection:
    the probe key every 10 ms, until it answers 200 (the data port answering anything at all is
    "listening"); `/readyz` every 500 ms until then, and every 10 ms after, until it answers 200.

    `/readyz` is not polled faster while the store loads: each call asks the store for its
    version within the hot-path timeout (`[store] timeout`, 50 ms), and on Redis, while the load
    keeps the store's connection and runtime busy, such calls time out; five in a row open the
    store's circuit breaker, which fails the load, and it starts again after the cooldown. (Seen
    with 100k tenants and 1M keys: polled every 10 ms, `/readyz` answered 200 after 14.4 s, with
    `store circuit breaker is open` in the log; polled every 500 ms, after 4.2 s.)"""
    t0 = args.t0_ms / 1000
    deadline = time.time() + args.wait
    listen = readyz = ready = None
    last = [0, 0]
    next_readyz = 0.0
    while readyz is None or ready is None:
        now = time.time()
        if ready is None:
            code = status_of(args.data_port, "/scale", bearer(args.secret))
            now = time.time()
            if listen is None and code != 0:
                listen = now - t0
            if code == 200:
                ready = now - t0
            last[0] = code
        if readyz is None and (ready is not None or now >= next_readyz):
            next_readyz = now + 0.5
            code = status_of(args.admin_port, "/readyz")
            if code == 200:
                readyz = time.time() - t0
            last[1] = code
        if not alive(args.pid):
            fail("the gateway exited while starting")
        if time.time() > deadline:
            fail(f"no keyed 200 and /readyz 200 within {args.wait}s (last: key {last[0]}, /readyz {last[1]})")
        time.sleep(0.01)
    emit({"listen_s": f"{listen:.3f}", "readyz_s": f"{readyz:.3f}", "ready_s": f"{ready:.3f}"})


def spread_tenants(n, count, offset=0):
    """`count` distinct tenants spread over the directory."""
    step = max(1, n // count)
    return [(offset + i * step) % n for i in range(count)]


def create_key(admin, t):
    status, body = admin.call("POST", f"/v1/tenants/{tenant_id(t)}/keys", compact({"scopes": ["read"]}), ADMIN)
    if status != 201:
        fail(f"creating a key for {tenant_id(t)} answered {status}: {body[:300]!r}")
    return json.loads(body)["secret"]


def wait_key(data, s, since, wait, pause=0.0):
    """Calls the data port with secret `s` until it answers 200; the time since `since`."""
    while True:
        status, _ = data.call("GET", "/scale", headers=bearer(s))
        now = time.perf_counter()
        if status == 200:
            return now - since
        if status not in (401, 403):
            fail(f"a new key answered {status}")
        if now - since > wait:
            fail(f"a new key did not answer 200 within {wait}s")
        if pause:
            time.sleep(pause)


def admin_writes(args):
    """`--count` keys created one after another (`POST /v1/tenants/{id}/keys`, each for another
    tenant), each followed at once by calls with its secret on the data port until one answers
    200: the admin call's time, the time from its answer to the 200, and the sum."""
    admin, data = Client(args.admin_port), Client(args.data_port)
    # One call of each first: connections open, code paths warm.
    for t in spread_tenants(args.tenants, 2, offset=7):
        wait_key(data, create_key(admin, t), time.perf_counter(), args.wait)
    call, visible, total = [], [], []
    for t in spread_tenants(args.tenants, args.count, offset=1):
        start = time.perf_counter()
        s = create_key(admin, t)
        returned = time.perf_counter()
        v = wait_key(data, s, returned, args.wait)
        call.append(returned - start)
        visible.append(v)
        total.append(returned - start + v)
    emit({"writes": args.count, **fields("write_call", call), **fields("write_visible", visible),
          **fields("write_total", total)})


def admin_reads(args):
    """`--count` calls each, one after another on one connection: the first page of 100 tenants,
    the page after the middle tenant, the last tenant, and the last tenant's keys."""
    admin = Client(args.admin_port)
    last = tenant_id(args.tenants - 1)
    calls = {
        "list_first": "/v1/tenants?limit=100",
        "list_middle": f"/v1/tenants?limit=100&cursor={tenant_id(args.tenants // 2)}",
        "get_tenant": f"/v1/tenants/{last}",
        "get_keys": f"/v1/tenants/{last}/keys",
    }
    out = {}
    for name, path in calls.items():
        times = []
        for i in range(args.count + 2):
            start = time.perf_counter()
            status, body = admin.call("GET", path, headers=ADMIN)
            took = time.perf_counter() - start
            if status != 200:
                fail(f"GET {path} answered {status}: {body[:300]!r}")
            if i >= 2:  # the first two warm up
                times.append(took)
        doc = json.loads(body)
        if name.startswith("list") and len(doc["items"]) != min(100, args.tenants):
            fail(f"GET {path} gave {len(doc['items'])} tenants")
        if name == "get_keys" and len(doc["items"]) < args.keys:
            fail(f"GET {path} gave {len(doc['items'])} keys")
        out.update(fields(name, times))
    emit({"reads": args.count, **out})


# Threads of a gateway that no change of the directory makes work: the proxy threads (no request
# reaches B while its CPU is measured) and Pingora's timer thread, which ticks every 10 ms
# whatever happens (about 3 ms of CPU a second here, varying by a millisecond from one span to
# the next: more than the changes cost).
UNRELATED_THREADS = ("tollgate proxy", "Timer thread")


def cpu_of(pid):
    """(CPU seconds of every thread, from their schedstat, nanosecond resolution; the same less
    `UNRELATED_THREADS`; utime + stime from /proc/PID/stat, in clock ticks of 10 ms, which also
    counts threads that have exited)."""
    ns = related = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                t = int(f.read().split()[0])
        except OSError:
            continue
        ns += t
        if not name.startswith(UNRELATED_THREADS):
            related += t
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    ticks = int(parts[11]) + int(parts[12])
    return ns / 1e9, related / 1e9, ticks / os.sysconf("SC_CLK_TCK")


def follow(args):
    """Instances A and B share one Redis.

    CPU first, while B has had no request for `--quiet` seconds (so no quota lease of an earlier
    request is being returned): B's CPU time over two spans in which `--cpu-writes` / 2 keys each
    are created on A, one every `--spacing` seconds, and nobody calls B, less B's CPU time over
    two spans as long with no writes (idle, busy, idle, busy); for the whole process, and for its
    threads less `UNRELATED_THREADS`.

    Then latency: `--count` keys created on A one after another, each followed by calls on B's
    data port every millisecond until B answers it 200."""
    admin = Client(args.admin_port)
    time.sleep(args.quiet)
    half = args.cpu_writes // 2
    span = half * args.spacing + 0.5
    tenants = spread_tenants(args.tenants, 2 * half, offset=5)
    idle, busy, last = [[0.0, 0.0, 0.0] for _ in range(2)], [0.0, 0.0, 0.0], None
    for block in range(2):
        a = cpu_of(args.pid)
        time.sleep(span)
        b = cpu_of(args.pid)
        start = time.perf_counter()
        for i, t in enumerate(tenants[block * half:(block + 1) * half]):
            pause = start + i * args.spacing - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            last = create_key(admin, t)
        pause = start + span - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        c = cpu_of(args.pid)
        for i in range(3):
            idle[block][i] = b[i] - a[i]
            busy[i] += c[i] - b[i]
    idle_sum = [idle[0][i] + idle[1][i] for i in range(3)]
    per = [(busy[i] - idle_sum[i]) / (2 * half) for i in range(3)]
    # How much two spans without a write differ, per change: the noise of `per`.
    noise = [abs(idle[0][i] - idle[1][i]) / (2 * half) for i in range(3)]
    data = Client(args.data_port)
    # B has the last key (and the connection is open).
    wait_key(data, last, time.perf_counter(), args.wait, pause=0.01)

    since_call, since_answer = [], []
    # B has just applied the last change, so its next poll is about 500 ms away: each write
    # waits first for its own share of that interval (spread evenly, in shuffled order), so the
    # writes land at every point of B's polling cycle, not right after each poll.
    phases = [i * 0.5 / args.count for i in range(args.count)]
    random.Random(args.count).shuffle(phases)
    for t, phase in zip(spread_tenants(args.tenants, args.count, offset=3), phases):
        time.sleep(phase)
        start = time.perf_counter()
        s = create_key(admin, t)
        returned = time.perf_counter()
        v = wait_key(data, s, returned, args.wait, pause=0.001)
        since_answer.append(v)
        since_call.append(returned - start + v)
    emit({"follow_writes": args.count, **fields("follow_call", since_call), **fields("follow_answer", since_answer),
          "cpu_span_s": f"{4 * span:.1f}", "cpu_writes": 2 * half,
          "cpu_idle_ms": ms(idle_sum[0]), "cpu_busy_ms": ms(busy[0]), "cpu_per_change_us": f"{per[0] * 1e6:.0f}",
          "cpu_noise_us": f"{noise[0] * 1e6:.0f}",
          "cpu_feed_idle_ms": ms(idle_sum[1]), "cpu_feed_busy_ms": ms(busy[1]),
          "cpu_feed_per_change_us": f"{per[1] * 1e6:.0f}", "cpu_feed_noise_us": f"{noise[1] * 1e6:.0f}",
          "cpu_idle_ticks_ms": ms(idle_sum[2]), "cpu_busy_ticks_ms": ms(busy[2]),
          "cpu_per_change_ticks_us": f"{per[2] * 1e6:.0f}"})


def mem_kb(pid, key):
    """A line of /proc/PID/status (AnonHugePages: of /proc/PID/smaps_rollup), in KiB."""
    path = f"/proc/{pid}/smaps_rollup" if key == "AnonHugePages" else f"/proc/{pid}/status"
    with open(path) as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def settle(pid, wait):
    """Until VmRSS has moved less than 1% over 2 s (as scale.sh's `settle`), at most `wait` s."""
    deadline = time.time() + wait
    prev, steady = mem_kb(pid, "VmRSS"), 0
    while steady < 4 and time.time() < deadline:
        time.sleep(0.5)
        rss = mem_kb(pid, "VmRSS")
        steady = steady + 1 if abs(rss - prev) * 100 < prev else 0
        prev = rss


# Tokio ends a blocking-pool thread after 10 s without work. A reload runs on one, and what it
# frees (the previous directory) stays in that thread's mimalloc heap, resident, until then.
BLOCKING_KEEPALIVE = 10.0


def settle_after(pid, answered, wait):
    """VmRSS once the reload's thread has ended: `BLOCKING_KEEPALIVE` + 1 s after the reload's
    new key answered, then settled again."""
    pause = answered + BLOCKING_KEEPALIVE + 1.0 - time.time()
    if pause > 0:
        time.sleep(pause)
    settle(pid, wait)


def settle_cmd(args):
    settle_after(args.pid, args.since_ms / 1000, args.wait)


def probe(args):
    """Requests with one key on one connection, one after another with a pause of `--pause`
    seconds between them, until SIGTERM (or `--seconds`); writes `start latency status` per
    request (seconds, epoch) to `--out`. A stall of the gateway delays the request in flight
    or, within the pause, the next one."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    c = Client(args.port, timeout=10)
    h = bearer(args.secret)
    rows = []
    end = time.time() + args.seconds
    while not stop and time.time() < end:
        t = time.time()
        s = time.perf_counter()
        try:
            status, _ = c.call("GET", "/scale", headers=h)
        except (http.client.HTTPException, OSError):
            status = 0
        rows.append((t, time.perf_counter() - s, status))
        time.sleep(args.pause)
    with open(args.out, "w") as f:
        f.writelines(f"{t:.6f} {lat:.6f} {st}\n" for t, lat, st in rows)


def proxy_sched(perf, pid, probe_pid, files):
    """From `perf sched timehist` of each recording: the gateway's proxy thread's longest time on
    a CPU at a stretch, its longest time runnable without a CPU, its longest sleep (waiting for a
    request, the upstream, or a lock); and the probe's longest time runnable without a CPU. A
    stall of the gateway's own making shows as a long run or a long sleep while the probe waits
    for an answer; a busy machine shows as long runnable waits."""
    import re

    line = re.compile(r"\s*[\d.]+\s+\[\d+\]\s+(.+?)\[(\d+)(?:/(\d+))?\]\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\S+)")
    worst = {"run": 0.0, "runnable": 0.0, "sleep": 0.0, "probe_runnable": 0.0}
    for f in files:
        text = subprocess.run([perf, "sched", "timehist", "--state", "-i", str(f), "-p", f"{pid},{probe_pid}"],
                              capture_output=True, text=True).stdout
        last_state = {}
        for m in line.finditer(text):
            name, tid, owner, wait, delay, run, state = m.groups()
            wait, delay, run = float(wait), float(delay), float(run)
            before = last_state.get(tid)
            last_state[tid] = state
            # The wait before this run followed the previous switch-out: preempted (R), the
            # wait was for a CPU; asleep (S, D), for something else, then `delay` for a CPU.
            runnable = max(delay, wait if before == "R" else 0.0)
            if name.startswith("tollgate proxy") and owner == str(pid):
                worst["run"] = max(worst["run"], run)
                worst["runnable"] = max(worst["runnable"], runnable)
                if before in ("S", "D"):
                    worst["sleep"] = max(worst["sleep"], wait)
            elif tid == str(probe_pid):
                worst["probe_runnable"] = max(worst["probe_runnable"], runnable)
        f.unlink()
    if not files:
        return {}
    return {"sched_proxy_max_run_ms": f"{worst['run']:.2f}", "sched_proxy_max_delay_ms": f"{worst['runnable']:.2f}",
            "sched_proxy_max_sleep_ms": f"{worst['sleep']:.2f}",
            "sched_probe_max_delay_ms": f"{worst['probe_runnable']:.2f}"}


def after_last_window(rows, windows):
    """How long after the end of the last reload window before it the slowest of `rows` started
    (negative: before the first reload)."""
    if not rows:
        return "0"
    r = max(rows, key=lambda r: r[1])
    ends = [b for _, b in windows if b <= r[0]]
    return f"{r[0] - max(ends):.3f}" if ends else f"{r[0] - windows[0][0]:.3f}"


def reloads(args):
    """`--count` SIGHUP reloads of the config file, each with one key changed (key 0 of another
    tenant gets the secret `secret(T, 97)`): the time until the new secret answers 200, then VmRSS
    once it has settled, and VmRSS and VmHWM once the reload's thread has ended (`settle_after`). Meanwhile `probe` calls the data port with another key, a
    request every millisecond or so: its longest request while a reload runs (from the SIGHUP
    until 1 s after the new key answered) and at other times."""
    cfg = pathlib.Path(args.config)
    work = pathlib.Path(args.work)
    out_file = work / "probe.txt"
    # The config of each reload is written before the probe starts (writing 134 MB takes a core
    # for a moment): reload i changes one more key than reload i - 1, and renames its file over
    # the config.
    text = cfg.read_text()
    variants = []
    for i in range(args.count):
        t = args.tenants // 2 + i
        old, new = f"sha256:{digest(t, 0)}", f"sha256:{digest(t, 97)}"
        if text.count(old) != 1:
            fail(f"key {key_id(t, 0)} is not in {cfg} once")
        text = text.replace(old, new)
        path = work / f"reload-{i}.toml"
        path.write_text(text)
        variants.append((t, path))
    del text
    prober = subprocess.Popen(
        [sys.executable, __file__, "probe", "--port", str(args.data_port), "--secret", secret(1, 0),
         "--seconds", str(args.count * (args.wait + 30) + 10), "--out", str(out_file)]
    )
    windows, results = [], []
    data = Client(args.data_port)
    try:
        time.sleep(2.0)
        for t, path in variants:
            os.replace(path, cfg)
            if not alive(args.pid):
                fail("the gateway exited")
            recorder = None
            if args.perf:
                # The scheduler's view of the reload, from its SIGHUP until 1 s after the new key
                # answered (system-wide: `perf sched record` takes no thread list).
                recorder = subprocess.Popen([args.perf, "sched", "record", "-o", str(work / f"sched-{len(windows)}.data")],
                                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(0.5)
            w0 = time.time()
            start = time.perf_counter()
            os.kill(args.pid, signal.SIGHUP)
            took = wait_key(data, secret(t, 97), start, args.wait, pause=0.005)
            windows.append((w0, w0 + took + 1.0))
            if recorder:
                time.sleep(1.0)
                recorder.send_signal(signal.SIGINT)
                recorder.wait(timeout=60)
            answered = time.time()
            settle(args.pid, args.wait)
            soon = mem_kb(args.pid, "VmRSS")
            settle_after(args.pid, answered, args.wait)
            results.append((took, soon, mem_kb(args.pid, "VmRSS"), mem_kb(args.pid, "VmHWM"),
                            mem_kb(args.pid, "AnonHugePages"), time.time()))
    finally:
        prober.send_signal(signal.SIGTERM)
        prober.wait(timeout=60)
    rows = []
    for line in out_file.read_text().splitlines():
        t, lat, st = line.split()
        rows.append((float(t), float(lat), int(st)))
    if not rows:
        fail("the probe made no request")
    def in_reload(r):
        # Started while a reload ran, or was running when its SIGHUP came.
        return next((a for a, b in windows if a <= r[0] <= b or r[0] < a <= r[0] + r[1]), None)

    during, outside, hup_of = [], [], {}
    for r in rows:
        a = in_reload(r)
        if a is None:
            outside.append(r)
        else:
            during.append(r)
            hup_of[r] = a
    bad = sum(1 for r in rows if r[2] != 200)
    slowest = max(during, key=lambda r: r[1]) if during else None
    sched = {}
    if args.perf:
        sched = proxy_sched(args.perf, args.pid, prober.pid, sorted(work.glob("sched-*.data")))
    out = {
        "reloads": args.count,
        "reload_s_list": ",".join(f"{r[0]:.3f}" for r in results),
        "reload_rss_soon_kb_list": ",".join(str(r[1]) for r in results),
        "reload_rss_kb_list": ",".join(str(r[2]) for r in results),
        "reload_hwm_kb_list": ",".join(str(r[3]) for r in results),
        "reload_thp_kb_list": ",".join(str(r[4]) for r in results),
        "probe_requests": len(rows),
        "probe_non_200": bad,
        "probe_during": len(during),
        "probe_during_max_ms": ms(slowest[1] if slowest else 0),
        "probe_during_over_50ms": sum(1 for r in during if r[1] > 0.05),
        "probe_during_p99_ms": ms(pct([r[1] for r in during], 99)) if during else "0",
        "probe_outside_max_ms": ms(max((r[1] for r in outside), default=0)),
        "probe_outside_p99_ms": ms(pct([r[1] for r in outside], 99)) if outside else "0",
        "probe_outside_over_50ms": sum(1 for r in outside if r[1] > 0.05),
        # When the slowest request started, relative to the SIGHUP of its reload; and the slowest
        # at other times, relative to the end of the last reload window before it.
        "probe_slowest_after_hup_s": f"{slowest[0] - hup_of[slowest]:.3f}" if slowest else "0",
        "probe_outside_slowest_after_reload_s": after_last_window(outside, windows),
        **sched,
    }
    emit(out)


# ---------------------------------------------------------------------------------------------
# Report


def mib(kb):
    return f"{int(kb) / 1024:,.0f} MiB"


def fnum(v, nd=2):
    return f"{float(v):,.{nd}f}"


MB = 1_000_000


def verdict(ok):
    return "yes" if ok else "**no**"


def report(args):
    lines = pathlib.Path(args.results).read_text().splitlines()
    meta = {}
    rows = []
    for line in lines:
        parts = line.split("\t")
        if parts[0] == "meta":
            meta[parts[1]] = parts[2]
        elif parts[0] == "case":
            rows.append(dict(p.split("=", 1) for p in parts[2:] if "=" in p) | {"case": parts[1]})
    by = {r["case"]: r for r in rows}
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

    # Targets first: what the issue asked for, what was measured, whether it was met.
    targets = []

    def target(what, goal, measured, ok):
        targets.append(f"| {what} | {goal} | {measured} | {verdict(ok)} |")

    for name in ("store-1m", "redis-1m"):
        r = by.get(name)
        if r:
            worst = max(float(r["readyz_s"]), float(r["ready_s"]))
            target(
                f"Start from the store ({r['label']}) → `/readyz` 200 and first keyed 200", "≤ 2 s",
                f"{fnum(r['readyz_s'])} s / {fnum(r['ready_s'])} s", worst <= 2.0,
            )
    r = by.get("toml-1m")
    if r:
        target(f"Start from the config file ({r['label']}) → first keyed 200", "≤ 6 s",
               f"{fnum(r['ready_s'])} s (`/readyz` 200: {fnum(r['readyz_s'])} s)", float(r["ready_s"]) <= 6.0)
    for name in ("toml-1m", "store-1m", "redis-1m"):
        r = by.get(name)
        if r:
            rss, hwm = int(r["rss_kb"]), int(r["hwm_kb"])
            later = f"; after a reload: {mib(r['rss2_kb'])}" if r.get("rss2_kb") else ""
            target(f"VmRSS, steady ({r['label']})", "≤ 256 MB (244 MiB)",
                   f"{mib(rss)} ({rss * 1024 / MB:,.0f} MB; {mib(r['thp_kb'])} of it in transparent huge pages; "
                   f"settled right after the start: {mib(r['rss_settled_kb'])}{later})", rss * 1024 <= 256 * MB)
            target(f"VmHWM during the load ({r['label']})", "≤ 2× steady VmRSS",
                   f"{mib(hwm)} ({hwm / rss:.2f}×)", hwm <= 2 * rss)
    for name in ("store-1m", "store-100k"):
        r = by.get(name)
        if r and r.get("write_total_p99_ms"):
            target(f"Admin write (create a key) applied and answering on the same instance, p99 of "
                   f"{r['writes']} ({r['label']})", "≤ 5 ms",
                   f"{fnum(r['write_total_p99_ms'])} ms (call {fnum(r['write_call_p99_ms'])} ms)",
                   float(r["write_total_p99_ms"]) <= 5.0)
    for name in ("redis-1m", "redis-100k"):
        r = by.get(name)
        if r and r.get("follow_call_max_ms"):
            target(f"Write on instance A → instance B answers the new key, slowest of {r['follow_writes']} "
                   f"({r['label']})", "≤ 1 s", f"{fnum(r['follow_call_max_ms'], 0)} ms "
                   f"(p50 {fnum(r['follow_call_p50_ms'], 0)} ms)", float(r["follow_call_max_ms"]) <= 1000)
    small, big = by.get("redis-100k"), by.get("redis-1m")
    if small and big and small.get("cpu_feed_per_change_us") and big.get("cpu_feed_per_change_us"):
        a, b = float(small["cpu_feed_per_change_us"]), float(big["cpu_feed_per_change_us"])
        ratio = f" ({b / a:.2f}×)" if a > 0 else ""
        target("Instance B's CPU per change does not grow with the directory (1M keys against 100k; B's threads "
               "less its proxy and timer threads)", "1M ≤ 1.5× 100k",
               f"{b:,.0f} µs (± {fnum(big['cpu_feed_noise_us'], 0)}) against {a:,.0f} µs "
               f"(± {fnum(small['cpu_feed_noise_us'], 0)}){ratio}", a > 0 and b <= 1.5 * a)
    r = by.get("toml-1m")
    if r and r.get("reload_s_list"):
        times = [float(x) for x in r["reload_s_list"].split(",")]
        rss = [int(x) for x in r["reload_rss_kb_list"].split(",")]
        target(f"SIGHUP with one key changed → it answers ({r['label']})", "≤ 3 s",
               f"{times[0]:.2f} s (of {len(times)}: {min(times):.2f}–{max(times):.2f} s)", max(times) <= 3.0)
        sched = ""
        if r.get("sched_proxy_max_sleep_ms"):
            sched = (f"; the proxy thread at most {fnum(r['sched_proxy_max_run_ms'], 1)} ms on a CPU at a stretch, "
                     f"{fnum(r['sched_proxy_max_delay_ms'], 1)} ms without one, "
                     f"{fnum(r['sched_proxy_max_sleep_ms'], 1)} ms asleep")
        target(f"Longest request while a reload runs ({r['label']}, {r['probe_during']} requests)",
               "≤ 50 ms", f"{fnum(r['probe_during_max_ms'], 1)} ms ({r['probe_during_over_50ms']} over 50 ms; "
               f"at other times: {fnum(r['probe_outside_max_ms'], 1)} ms, {r['probe_outside_over_50ms']} over 50 ms{sched})",
               float(r["probe_during_max_ms"]) <= 50)
        target(f"VmRSS after {len(rss)} reloads against after the first ({r['label']})", "within 10%",
               f"{mib(rss[-1])} against {mib(rss[0])} ({(rss[-1] - rss[0]) / rss[0] * 100:+.1f}%)",
               abs(rss[-1] - rss[0]) <= 0.1 * rss[0])
    for name in ("store-1m", "toml-1m", "redis-1m"):
        r = by.get(name)
        if r and r.get("list_first_p99_ms"):
            worst = max(float(r[f"{c}_p99_ms"]) for c in ("list_first", "list_middle", "get_tenant", "get_keys"))
            target(f"Admin list page, page from a cursor, get, keys: p99 of each ({r['label']})", "≤ 5 ms",
                   " / ".join(fnum(r[f"{c}_p99_ms"]) for c in ("list_first", "list_middle", "get_tenant", "get_keys"))
                   + " ms", worst <= 5.0)
    r = by.get("store-1m")
    if r and r.get("tput_ratio"):
        target("Keyed throughput, 1M-key directory (10,000 keys of 10,000 tenants called) against a 2-tenant config",
               "≥ 0.95", f"{float(r['tput_ratio']):.3f} ({fnum(r['tput_big_rps'], 0)} against "
               f"{fnum(r['tput_small_rps'], 0)} requests/s; with 2 keys of the 1M-key directory: "
               f"{float(r['tput_size_ratio']):.3f})", float(r["tput_ratio"]) >= 0.95)
    if targets:
        out.append("")
        out.append("| Target | Goal | Measured | Met |")
        out.append("|---|---|---|:---:|")
        out.extend(targets)

    out.append("")
    out.append("Start, memory and reload, per case:")
    out.append("")
    out.append(
        "| Case | File | Start → listening | → `/readyz` 200 | → first keyed 200 | VmRSS: settled / steady | VmHWM | "
        "SIGHUP, one key changed → it answers | VmRSS after the reload: settled / thread ended | VmHWM after |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        size = f"{int(r['file_bytes']) / 1048576:,.1f} MiB" if r.get("file_bytes") else "–"
        reload = f"{float(r['reload_s']):.2f} s" if r.get("reload_s") else "–"
        after = f"{mib(r['rss_soon_kb'])} / {mib(r['rss2_kb'])}" if r.get("rss2_kb") else "–"
        hwm2 = mib(r["hwm2_kb"]) if r.get("hwm2_kb") else "–"
        out.append(
            f"| {r['label']} | {size} | {float(r['listen_s']):.2f} s | {float(r['readyz_s']):.2f} s | "
            f"{float(r['ready_s']):.2f} s | {mib(r['rss_settled_kb'])} / {mib(r['rss_kb'])} | {mib(r['hwm_kb'])} | "
            f"{reload} | {after} | {hwm2} |"
        )
    out.append("")
    out.append(
        "File: the config file, or for the store cases the store's SQLite file. The Redis cases show "
        "instance A (no reload there). VmRSS is read once the first keyed request has answered and VmRSS "
        "has settled (moved less than 1% over 2 s), and again, steady, once it has settled 11 s after that "
        "request: the threads that did the start's work have ended by then, and what they freed no longer "
        "stays resident. VmHWM is the peak of the start. After a reload VmRSS is read the same two ways, "
        "from when the changed key answered."
    )

    notes = []

    def held(r):
        return int(r["rss_kb"])

    for src, a, b in (("the config file", "toml-100k", "toml-1m"), ("the embedded store", "store-100k", "store-1m"),
                      ("Redis", "redis-100k", "redis-1m")):
        base, small, big = by.get("baseline"), by.get(a), by.get(b)
        if base and small and big:
            per_key = (held(big) - held(small)) * 1024 / 900_000
            per_tenant = ((held(small) - held(base)) * 1024 - 100_000 * per_key) / 100_000
            notes.append(
                f"From {src} (steady VmRSS): **{per_key:,.0f} bytes per key** ((1M-key VmRSS − 100k-key VmRSS) / 900,000) "
                f"and **{per_tenant:,.0f} bytes per tenant** (the 100k-key VmRSS, less the baseline's and 100,000 "
                f"keys', / 100,000); the 1M-key directory holds {(held(big) - held(base)) / 1024:,.0f} MiB more than "
                "the baseline."
            )
    for r in rows:
        if r.get("store_change_s"):
            notes.append(
                f"{r['label']}: one key rotated in the store by another writer (record, version and change feed, "
                f"as the admin API writes them) answered with its new secret after "
                f"{float(r['store_change_s']):.2f} s (the feed is polled every 500 ms)."
            )
    if notes:
        out.append("")
        out.extend(f"- {n}" for n in notes)

    writes = [r for r in rows if r.get("write_call_p50_ms")]
    if writes:
        out.append("")
        out.append("Admin writes on one instance: keys created one after another (`POST /v1/tenants/{id}/keys`, each for "
                   "another tenant), each followed at once by requests with its secret until one answers 200. "
                   "Milliseconds, p50 / p99 / max:")
        out.append("")
        out.append("| Case | Writes | Admin call | Call answered → new key answers 200 | Both |")
        out.append("|---|---:|---:|---:|---:|")
        for r in writes:
            cells = " | ".join(
                f"{fnum(r[f'{p}_p50_ms'])} / {fnum(r[f'{p}_p99_ms'])} / {fnum(r[f'{p}_max_ms'])}"
                for p in ("write_call", "write_visible", "write_total")
            )
            out.append(f"| {r['label']} | {r['writes']} | {cells} |")

    follows = [r for r in rows if r.get("follow_call_p50_ms")]
    if follows:
        out.append("")
        out.append("Two instances on one Redis (B follows the change feed every 500 ms). B's CPU time (all its "
                   "threads, from their schedstat; in brackets from the 10 ms ticks of /proc/PID/stat) over two "
                   "spans in which keys are created on A every 0.5 s and nobody calls B, less its CPU time over two "
                   "spans as long with no writes, alternating; then keys created on A one after another, at "
                   "spread-out points of B's polling cycle, each followed by requests on B every millisecond until "
                   "B answers it 200:")
        out.append("")
        out.append("| Case | B's CPU per change: whole process | less its proxy and timer threads | from "
                   "/proc/PID/stat | Writes | A's call → B answers, p50 / p99 / max | B: start → keyed 200, VmRSS |")
        out.append("|---|---:|---:|---:|---:|---:|---:|")
        for r in follows:
            out.append(
                f"| {r['label']} | {fnum(r['cpu_per_change_us'], 0)} µs (± {fnum(r['cpu_noise_us'], 0)}; "
                f"{fnum(r['cpu_idle_ms'], 1)} ms idle, {fnum(r['cpu_busy_ms'], 1)} ms with writes) | "
                f"{fnum(r['cpu_feed_per_change_us'], 0)} µs (± {fnum(r['cpu_feed_noise_us'], 0)}; "
                f"{fnum(r['cpu_feed_idle_ms'], 1)} / {fnum(r['cpu_feed_busy_ms'], 1)} ms) | "
                f"{fnum(r['cpu_per_change_ticks_us'], 0)} µs ({fnum(r['cpu_idle_ticks_ms'], 0)} / "
                f"{fnum(r['cpu_busy_ticks_ms'], 0)} ms) | {r['follow_writes']} | "
                f"{fnum(r['follow_call_p50_ms'], 0)} / {fnum(r['follow_call_p99_ms'], 0)} / "
                f"{fnum(r['follow_call_max_ms'], 0)} ms | {fnum(r['b_ready_s'])} s, {mib(r['b_rss_kb'])} |"
            )
        out.append("")
        out.append(f"CPU: {follows[0]['cpu_writes']} writes over {follows[0]['cpu_span_s']} s (two spans with writes, "
                   "two without). ± is how much the two spans without writes differed, per change. The proxy "
                   "threads had no request to serve; Pingora's timer thread ticks every 10 ms whatever happens "
                   "and varies more from span to span than the changes cost.")

    reads = [r for r in rows if r.get("list_first_p50_ms")]
    if reads:
        out.append("")
        out.append(f"Admin reads, {reads[0].get('reads', 50)} calls each, one after another on one connection. "
                   "Milliseconds, p50 / p99:")
        out.append("")
        out.append("| Case | `GET /v1/tenants?limit=100` | the page after the middle tenant | "
                   "`GET /v1/tenants/{last}` | `GET /v1/tenants/{last}/keys` |")
        out.append("|---|---:|---:|---:|---:|")
        for r in reads:
            cells = " | ".join(f"{fnum(r[f'{c}_p50_ms'])} / {fnum(r[f'{c}_p99_ms'])}"
                               for c in ("list_first", "list_middle", "get_tenant", "get_keys"))
            out.append(f"| {r['label']} | {cells} |")

    r = by.get("toml-1m")
    if r and r.get("reload_s_list"):
        times = r["reload_s_list"].split(",")
        soon = r["reload_rss_soon_kb_list"].split(",")
        rss = r["reload_rss_kb_list"].split(",")
        hwm = r["reload_hwm_kb_list"].split(",")
        thp = r.get("reload_thp_kb_list", "").split(",")
        out.append("")
        out.append(f"{len(times)} SIGHUP reloads of the {r['label'].replace(' (config)', '')} config file, each "
                   "with one more key changed, while one connection called the data port, a request every millisecond or so "
                   f"({r['probe_requests']} requests, {r['probe_non_200']} not answered 200):")
        out.append("")
        out.append("| Reload | SIGHUP → changed key answers | VmRSS, settled | VmRSS, thread ended | of which "
                   "transparent huge pages | VmHWM |")
        out.append("|---:|---:|---:|---:|---:|---:|")
        for i, (t, a0, a, h, b) in enumerate(zip(times, soon, rss, thp, hwm), 1):
            out.append(f"| {i} | {float(t):.2f} s | {mib(a0)} | {mib(a)} | {mib(h) if h else '?'} | {mib(b)} |")
        out.append("")
        out.append(
            f"The probe's requests while a reload ran (from its SIGHUP until 1 s after the changed key "
            f"answered; {r['probe_during']} requests): p99 {fnum(r['probe_during_p99_ms'])} ms, longest "
            f"{fnum(r['probe_during_max_ms'], 1)} ms (started {float(r['probe_slowest_after_hup_s']):.2f} s after "
            f"the SIGHUP), {r['probe_during_over_50ms']} over 50 ms; at other times p99 "
            f"{fnum(r['probe_outside_p99_ms'])} ms, longest {fnum(r['probe_outside_max_ms'], 1)} ms (started "
            f"{float(r['probe_outside_slowest_after_reload_s']):.2f} s after the end of the reload window before it), "
            f"{r['probe_outside_over_50ms']} over 50 ms."
            + (f" The scheduler's record over the reloads (`perf sched`, from each SIGHUP until 1 s after the key "
               f"answered): the gateway's proxy thread was at most {fnum(r['sched_proxy_max_run_ms'], 1)} ms on a CPU "
               f"at a stretch, at most {fnum(r['sched_proxy_max_delay_ms'], 1)} ms runnable without a CPU, and slept "
               f"at most {fnum(r['sched_proxy_max_sleep_ms'], 1)} ms (waiting for a request, the upstream or a lock); "
               f"the probe was at most {fnum(r['sched_probe_max_delay_ms'], 1)} ms runnable without a CPU."
               if r.get("sched_proxy_max_sleep_ms") else "")
        )

    r = by.get("store-1m")
    if r and r.get("tput_ratio"):
        out.append("")
        out.append(
            f"Keyed throughput, `wrk -t1 -c32 -d{r['tput_seconds']}s` against the 1M-key gateway and a 2-tenant "
            f"config gateway running side by side, {r['tput_rounds']} rounds alternating the order; each request "
            "carries the next key of the list. Requests/s per round, and the gateway's CPU per request (all its "
            "threads):"
        )
        out.append("")
        out.append("| Load | Requests/s | Mean | CPU per request | Ratio to the 2-tenant config, per round |")
        out.append("|---|---:|---:|---:|---:|")
        for key, what, ratios in (
            ("big", "1M-key directory, 10,000 keys of 10,000 tenants", r["tput_ratio_list"]),
            ("big2", "1M-key directory, 2 keys of 2 tenants", r["tput_size_ratio_list"]),
            ("small", "2-tenant config, its 2 keys", ""),
        ):
            out.append(f"| {what} | {r[f'tput_{key}_list']} | {fnum(r[f'tput_{key}_rps'], 0)} | "
                       f"{r[f'tput_{key}_cpu_us']} µs | {ratios or '–'} |")
        out.append("")
        out.append(f"Ratio of the sums: {float(r['tput_ratio']):.3f} (10,000 keys), {float(r['tput_size_ratio']):.3f} "
                   f"(2 keys). Answers other than 200: {r['tput_non200']}.")

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
    r = sub.add_parser("redis")
    r.add_argument("--tenants", type=int, required=True)
    r.add_argument("--keys", type=int, required=True)
    for name in ("secret", "hash"):
        k = sub.add_parser(name)
        k.add_argument("t", type=int)
        k.add_argument("k", type=int)
    sub.add_parser("token")
    c = sub.add_parser("store-rotate")
    c.add_argument("db")
    c.add_argument("t", type=int)
    c.add_argument("k", type=int)

    w = sub.add_parser("wait-start")
    w.add_argument("--t0-ms", type=int, required=True)
    w.add_argument("--pid", type=int, required=True)
    w.add_argument("--data-port", type=int, required=True)
    w.add_argument("--admin-port", type=int, required=True)
    w.add_argument("--secret", required=True)
    w.add_argument("--wait", type=float, default=180)
    for name in ("admin-writes", "admin-reads", "follow"):
        m = sub.add_parser(name)
        m.add_argument("--admin-port", type=int, required=True)
        m.add_argument("--data-port", type=int, default=0)
        m.add_argument("--tenants", type=int, required=True)
        m.add_argument("--keys", type=int, default=1)
        m.add_argument("--count", type=int, required=True)
        m.add_argument("--wait", type=float, default=180)
        if name == "follow":
            m.add_argument("--pid", type=int, required=True)
            m.add_argument("--cpu-writes", type=int, default=20)
            m.add_argument("--spacing", type=float, default=0.5)
            m.add_argument("--quiet", type=float, default=6.0)
    rl = sub.add_parser("reloads")
    rl.add_argument("--pid", type=int, required=True)
    rl.add_argument("--config", required=True)
    rl.add_argument("--data-port", type=int, required=True)
    rl.add_argument("--tenants", type=int, required=True)
    rl.add_argument("--count", type=int, default=5)
    rl.add_argument("--wait", type=float, default=180)
    rl.add_argument("--work", required=True)
    rl.add_argument("--perf", help="perf, to record the scheduler during each reload")
    p = sub.add_parser("probe")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--pause", type=float, default=0.001)
    st = sub.add_parser("settle-after")
    st.add_argument("--pid", type=int, required=True)
    st.add_argument("--since-ms", type=int, required=True)
    st.add_argument("--wait", type=float, default=180)
    rp = sub.add_parser("report")
    rp.add_argument("results")
    rp.add_argument("--write")
    args = ap.parse_args()
    if args.cmd == "toml":
        gen_toml(args)
    elif args.cmd == "store":
        gen_store(args)
    elif args.cmd == "redis":
        gen_redis(args)
    elif args.cmd == "secret":
        print(secret(args.t, args.k))
    elif args.cmd == "hash":
        print(digest(args.t, args.k))
    elif args.cmd == "token":
        print(ADMIN_TOKEN, "sha256:" + hashlib.sha256(ADMIN_TOKEN.encode()).hexdigest())
    elif args.cmd == "store-rotate":
        set_store_key(args)
    elif args.cmd == "wait-start":
        wait_start(args)
    elif args.cmd == "admin-writes":
        admin_writes(args)
    elif args.cmd == "admin-reads":
        admin_reads(args)
    elif args.cmd == "follow":
        follow(args)
    elif args.cmd == "reloads":
        reloads(args)
    elif args.cmd == "probe":
        probe(args)
    elif args.cmd == "settle-after":
        settle_cmd(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
