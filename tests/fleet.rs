//! A fleet on a real Redis and a real 3-master Redis Cluster under bursts: three gateway
//! instances share quotas that hold exactly (never above the limit, and at most the documented
//! bound below it), through a frozen store, a frozen shard, a master killed and replaced by its
//! replica, a crashed instance holding a lease, and an instance restarted at once under the
//! same `instance_id`. The bounds checked here are the ones `docs/limits.md` states.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const LIMIT: u64 = 100;

fn key_of(t: &str) -> String {
    format!("tg_live_{t}_fleetburstkeyXXXXXXXXXXXXXXXX")
}

fn config(redis_url: &str, echo: &Echo, tenants: &[String], store_extra: &str, tier_extra: &str) -> String {
    format!(
        r#"{SERVER_TABLE}
[store]
kind = "redis"
url = "{redis_url}"
# 1 s per store call rather than the default 50 ms: on a loaded two-core test machine a
# healthy Redis is not always scheduled within 50 ms, and what these tests check is exactness
# with a healthy (or a frozen) store, not the failure policy of a slow one.
timeout = "1s"
{store_extra}{lease}

[upstreams.default]
servers = ["{echo}"]

[tiers.basic]
upstream = "default"
quotas.requests = {{ limit = {LIMIT}, period = "month" }}
{tier_extra}

{tenants}"#,
        echo = echo.addr,
        tenants = keyed_tenants(tenants, "basic", key_of),
        // Requests wait for a lease call up to 5 s unless a test says otherwise, for the same
        // reason.
        lease = if store_extra.contains("lease_timeout") { "" } else { "\nlease_timeout = \"5s\"" },
    )
}

/// Opens every request first (all but the last byte of its head sent), then releases them
/// at once; returns the statuses per tenant, in the order of `plan`.
fn burst(plan: &[(SocketAddr, String)]) -> Vec<u16> {
    let mut conns = Vec::with_capacity(plan.len());
    for (addr, tenant) in plan {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let head = format!(
            "GET /burst HTTP/1.1\r\nHost: fleet.test\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r",
            key_of(tenant)
        );
        s.write_all(head.as_bytes()).expect("open the request");
        conns.push(s);
    }
    for s in &mut conns {
        s.write_all(b"\n").expect("release");
    }
    conns
        .into_iter()
        .map(|mut s| {
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            std::str::from_utf8(buf.get(9..12).unwrap_or(b"000")).ok().and_then(|c| c.parse().ok()).unwrap_or(0)
        })
        .collect()
}

/// `per_instance` requests per tenant on each gateway, interleaved.
fn plan(gws: &[&Gateway], tenants: &[String], per_instance: usize) -> Vec<(SocketAddr, String)> {
    let mut out = Vec::new();
    for _ in 0..per_instance {
        for t in tenants {
            for gw in gws {
                out.push((gw.addr, t.clone()));
            }
        }
    }
    out
}

fn admitted_per_tenant(plan: &[(SocketAddr, String)], statuses: &[u16], tenants: &[String]) -> Vec<(u64, u64)> {
    tenants
        .iter()
        .map(|t| {
            let mine = plan.iter().zip(statuses).filter(|((_, pt), _)| pt == t);
            let (mut ok, mut other) = (0, 0);
            for (_, s) in mine {
                match s {
                    200 => ok += 1,
                    429 => {}
                    _ => other += 1,
                }
            }
            (ok, other)
        })
        .collect()
}

fn tenants(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// 3 instances, 3 tenants a repetition, 3× oversubscribed bursts, 5 repetitions: every tenant
/// gets exactly its limit (the under-admission bound of a burst where every instance has more
/// demand than the whole limit is 0: whatever an instance leases, its own requests spend).
#[test]
fn oversubscribed_bursts_admit_exactly_the_limit() {
    let redis = Redis::start();
    let echo = Echo::start();
    let all = tenants("burst", 15);
    let template = config(&redis.url(), &echo, &all, "", "");
    let gws: Vec<Gateway> = (0..3).map(|_| Gateway::start(&template)).collect();
    let refs: Vec<&Gateway> = gws.iter().collect();
    for rep in 0..5 {
        let these = &all[rep * 3..rep * 3 + 3];
        let before = echo.hits();
        let p = plan(&refs, these, LIMIT as usize);
        let statuses = burst(&p);
        let counts = admitted_per_tenant(&p, &statuses, these);
        for (t, (ok, other)) in these.iter().zip(&counts) {
            assert_eq!(*other, 0, "repetition {rep}, {t}: only 200 and 429 answers");
            assert!(*ok <= LIMIT, "repetition {rep}, {t}: {ok} admitted over a limit of {LIMIT}");
            assert_eq!(*ok, LIMIT, "repetition {rep}, {t}: {ok} admitted of {LIMIT}");
        }
        assert_eq!(echo.hits() - before, 3 * LIMIT, "repetition {rep}: the upstream saw the admitted requests");
    }
}

/// Demand equal to the limit, spread evenly over the instances: everything is admitted.
#[test]
fn demand_equal_to_the_limit_is_all_admitted() {
    let redis = Redis::start();
    let echo = Echo::start();
    let all = tenants("even", 3);
    let template = config(&redis.url(), &echo, &all, "", "");
    let gws: Vec<Gateway> = (0..3).map(|_| Gateway::start(&template)).collect();
    let refs: Vec<&Gateway> = gws.iter().collect();
    let p = plan(&refs, &all, (LIMIT / 3) as usize);
    let statuses = burst(&p);
    for (t, (ok, other)) in all.iter().zip(admitted_per_tenant(&p, &statuses, &all)) {
        assert_eq!(other, 0, "{t}");
        assert_eq!(ok, LIMIT / 3 * 3, "{t}: every request of an even demand within the limit is admitted");
    }
}

/// Redis frozen (SIGSTOP) for 2 s in the middle of a burst under `local`: each instance admits
/// what it holds plus its share of what was left at its last contact, so the fleet admits at
/// most the limit plus what was granted since the stalest instance's last contact, here the
/// warm-up (`docs/limits.md`, "Failure policies").
#[test]
fn a_frozen_store_under_local_admits_at_most_the_documented_bound() {
    let redis = Redis::start();
    let echo = Echo::start();
    let all = tenants("frozen", 3);
    let template = config(&redis.url(), &echo, &all, "lease_timeout = \"1s\"", "on_store_error = \"local\"");
    let gws: Vec<Gateway> = (0..3).map(|_| Gateway::start(&template)).collect();
    let refs: Vec<&Gateway> = gws.iter().collect();
    // Every instance counts the fleet, then has seen every counter.
    wait_for_fleet(&refs, 3);
    let warm = plan(&refs, &all, 2);
    let warm_status = burst(&warm);
    assert!(warm_status.iter().all(|s| *s == 200), "warm-up: {warm_status:?}");
    let warmup_per_tenant = 2 * 3;
    let pid = redis.pid();
    let thaw = std::thread::spawn(move || {
        let signal = |sig: &str| {
            let _ = std::process::Command::new("kill").args([format!("-{sig}"), pid.to_string()]).status();
        };
        signal("STOP");
        std::thread::sleep(Duration::from_secs(2));
        signal("CONT");
    });
    std::thread::sleep(Duration::from_millis(100));
    let p = plan(&refs, &all, LIMIT as usize);
    let started = Instant::now();
    let statuses = burst(&p);
    let _ = thaw.join();
    assert!(started.elapsed() < Duration::from_secs(20), "the burst did not hang on the frozen store");
    for (t, (ok, other)) in all.iter().zip(admitted_per_tenant(&p, &statuses, &all)) {
        let per_gw: Vec<usize> = refs
            .iter()
            .map(|g| p.iter().zip(&statuses).filter(|((a, pt), s)| *a == g.addr && pt == t && **s == 200).count())
            .collect();
        eprintln!("{t}: admitted per instance {per_gw:?}, took {:?}", started.elapsed());
        assert_eq!(other, 0, "{t}: a frozen store gives 200 or 429, never an error");
        let bound = LIMIT + warmup_per_tenant;
        assert!(ok + warmup_per_tenant <= bound, "{t}: {} admitted, bound {bound}", ok + warmup_per_tenant);
    }
}

/// An instance SIGKILLed while it holds a large lease: the others can use its unspent units
/// within `lease_ttl`.
#[test]
fn a_crashed_instances_lease_comes_back_within_the_lease_ttl() {
    let redis = Redis::start();
    let echo = Echo::start();
    let all = tenants("crash", 1);
    let t = &all[0];
    // A large quota so the first instance takes a block of 1000; the second sees it held.
    let template = config(&redis.url(), &echo, &all, "lease_ttl = \"2s\"\nlease_idle = \"60s\"", "")
        .replace(&format!("limit = {LIMIT}"), "limit = 64000");
    let mut a = Gateway::start(&template);
    // B takes exact grants, so what the counter holds beyond a few units is A's block.
    let b = Gateway::start(&template.replace("[store]\n", "[store]\nmax_lease_block = 1\n"));
    let auth = bearer(&key_of(t));
    assert_eq!(a.get("/x", &[("authorization", &auth)]).status, 200);
    assert_eq!(b.get("/x", &[("authorization", &auth)]).status, 200);
    let counter = || -> u64 {
        let cli = |args: &[&str]| {
            let out = std::process::Command::new("redis-cli")
                .args(["-p", &redis.port.to_string(), "--raw"])
                .args(args)
                .output()
                .expect("redis-cli");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        let keys = cli(&["KEYS", &format!("tg:{{{t}}}:q:requests:*")]);
        let key = keys.lines().find(|k| !k.ends_with(":h") && !k.ends_with(":e")).expect("the counter").to_string();
        cli(&["GET", &key]).parse().expect("a number")
    };
    let held = counter();
    assert!(held >= 1000, "the first instance holds a block: the counter is {held}");
    // The usage API counts what was spent, not what is leased.
    assert!(quota_used(&b, &auth) < 10, "leased units are not reported as used");
    a.signal("KILL");
    let _ = a.wait_exit(Duration::from_secs(5));
    let killed = Instant::now();
    loop {
        // B's next call (a request's, or its renewal) reclaims the expired record.
        assert_eq!(b.get("/x", &[("authorization", &auth)]).status, 200);
        if counter() < 100 {
            break;
        }
        assert!(killed.elapsed() < Duration::from_secs(8), "the crashed instance's lease never came back");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(killed.elapsed() >= Duration::from_millis(1000), "not before the lease record could expire");
}

/// `x-quota-used`-style reading of the tenant's quota through the self-service usage API.
fn quota_used(gw: &Gateway, auth: &str) -> u64 {
    let r = gw.get("/_tollgate/usage", &[("authorization", auth)]);
    let text = r.text();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("usage json {e}: {text}"));
    v["quotas"][0]["used"].as_u64().unwrap_or_else(|| panic!("no quota in {text}"))
}

/// An instance SIGKILLed and restarted at once with the same `instance_id`: its predecessor's
/// slots still count until they expire, so in-flight requests never exceed `concurrency`.
#[test]
fn a_restart_under_the_same_instance_id_never_exceeds_concurrency() {
    let redis = Redis::start();
    let (echo, gate) = Echo::gated();
    let all = tenants("restart", 1);
    let t = &all[0];
    let template = config(&redis.url(), &echo, &all, "instance_id = \"pinned\"\nslot_ttl = \"3s\"", "concurrency = 4");
    let dir = temp_dir("fleet-restart");
    let mut a = Gateway::start_in(dir.clone(), &template, &[]);
    let auth = bearer(&key_of(t));
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = Conn::open(a.addr).expect("connect");
        c.send_raw(&build_request("GET", "/stream?sse=2", &[("authorization", &auth)], b"")).expect("send");
        assert_eq!(c.read_head().expect("head").0, 200);
        held.push(c);
    }
    a.signal("KILL");
    let _ = a.wait_exit(Duration::from_secs(5));
    drop(held);
    let b = Gateway::start(&template);
    // The dead process's four slots are still live in Redis: the new one must not take them over.
    let r = b.get("/x", &[("authorization", &auth)]);
    assert_eq!(r.status, 429, "four slots of the previous process are still held");
    assert_eq!(r.problem_code(), "concurrency_limit");
    gate.open();
}

/// Waits until every gateway's fleet registry reading (`tollgate_fleet_instances`) is `n`.
fn wait_for_fleet(gws: &[&Gateway], n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for gw in gws {
        loop {
            let text = get(gw.admin, "/metrics", &[]).expect("metrics").text();
            let seen = text
                .lines()
                .find(|l| l.starts_with("tollgate_fleet_instances "))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0) as u64;
            if seen == n {
                break;
            }
            assert!(Instant::now() < deadline, "the fleet registry shows {seen} instances, not {n}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

// -------------------------------------------------------------------------------------------
// Redis Cluster
// -------------------------------------------------------------------------------------------

/// The cluster's seeds as a `url` list.
fn cluster_url(cluster: &RedisCluster) -> String {
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    format!("[{}]", urls.join(", "))
}

fn cluster_config(
    cluster: &RedisCluster,
    echo: &Echo,
    tenants: &[String],
    store_extra: &str,
    tier_extra: &str,
) -> String {
    config("@URL@", echo, tenants, store_extra, tier_extra)
        .replace("url = \"@URL@\"", &format!("url = {}", cluster_url(cluster)))
}

/// The same bursts on a 3-master cluster, three tenants a repetition on three different masters.
#[test]
fn cluster_oversubscribed_bursts_admit_exactly_the_limit() {
    let cluster = RedisCluster::start(3, 0, 5000);
    let echo = Echo::start();
    let reps: Vec<Vec<String>> =
        (0..5).map(|r| cluster.tenants_on_distinct_masters(&format!("cburst{r}"), 3)).collect();
    let all: Vec<String> = reps.iter().flatten().cloned().collect();
    let template = cluster_config(&cluster, &echo, &all, "", "");
    let gws: Vec<Gateway> = (0..3).map(|_| Gateway::start(&template)).collect();
    let refs: Vec<&Gateway> = gws.iter().collect();
    for (rep, these) in reps.iter().enumerate() {
        let before = echo.hits();
        let p = plan(&refs, these, LIMIT as usize);
        let statuses = burst(&p);
        for (t, (ok, other)) in these.iter().zip(admitted_per_tenant(&p, &statuses, these)) {
            assert_eq!(other, 0, "repetition {rep}, {t}: only 200 and 429 answers");
            assert_eq!(
                ok,
                LIMIT,
                "repetition {rep}, {t} (master {}): {ok} admitted of {LIMIT}",
                cluster.master_for_tenant(t)
            );
        }
        assert_eq!(echo.hits() - before, 3 * LIMIT, "repetition {rep}");
    }
}

/// One master frozen (SIGSTOP) while its tenant keeps sending: that tenant's failures open
/// only its node's breaker. Tenants on the other masters keep exact quotas (a 3× burst admits
/// exactly the limit) and exact concurrency (2 of 6 streams held across the fleet). The breaker
/// opens at the first failure here, so a breaker shared by the whole cluster would send every
/// tenant to the failure policy.
#[test]
fn a_frozen_shard_leaves_the_other_tenants_exact() {
    let cluster = RedisCluster::start(3, 0, 5000);
    let (echo, gate) = Echo::gated();
    let mut all = cluster.tenants_on_distinct_masters("shard", 3);
    // One more tenant on a healthy master, for the concurrency check.
    let healthy_master = cluster.master_for_tenant(&all[1]);
    let streams = (0..10_000)
        .map(|k| format!("streams-{k}"))
        .find(|t| cluster.master_for_tenant(t) == healthy_master)
        .expect("a tenant on that master");
    all.push(streams.clone());
    // The streams tenant has a tier of its own with `concurrency = 2`.
    let template =
        cluster_config(&cluster, &echo, &all, "lease_timeout = \"1s\"\nslot_ttl = \"2s\"\nbreaker_failures = 1", "")
            .replace(
                &format!("id = \"{streams}\"\ntier = \"basic\""),
                &format!("id = \"{streams}\"\ntier = \"streams\""),
            )
            + "\n[tiers.streams]\nupstream = \"default\"\nconcurrency = 2\n";
    let gws: Vec<Gateway> = (0..3).map(|_| Gateway::start(&template)).collect();
    let refs: Vec<&Gateway> = gws.iter().collect();
    wait_for_fleet(&refs, 3);
    let (frozen, healthy) = (all[0].clone(), all[1..3].to_vec());
    let victim = cluster.master_for_tenant(&frozen);
    cluster.stop(victim);
    // The frozen master's tenant fails its store calls on every instance, which opens its
    // node's breaker.
    let _ = burst(&plan(&refs, std::slice::from_ref(&frozen), 10));
    // The other tenants: exact quotas...
    let p = plan(&refs, &healthy, LIMIT as usize);
    let statuses = burst(&p);
    let quotas = admitted_per_tenant(&p, &statuses, &healthy);
    // ...and exact concurrency: streams held open across the fleet, 2 admitted of 6.
    let auth = bearer(&key_of(&streams));
    let mut held = Vec::new();
    let mut refused = 0;
    for gw in refs.iter().cycle().take(6) {
        let mut c = Conn::open(gw.addr).expect("connect");
        c.send_raw(&build_request("GET", "/stream?sse=2", &[("authorization", &auth)], b"")).expect("send");
        match c.read_head().expect("head").0 {
            200 => held.push(c),
            429 => refused += 1,
            other => panic!("a stream answered {other}"),
        }
    }
    cluster.cont(victim);
    gate.open();
    for (t, (ok, other)) in healthy.iter().zip(quotas) {
        assert_eq!(other, 0, "{t}");
        assert_eq!(ok, LIMIT, "{t}: exact while another shard is frozen");
    }
    assert_eq!((held.len(), refused), (2, 4), "concurrency = 2 across the fleet while another shard is frozen");
}
