//! Redis Cluster as a deployment: the gateway discovers a cluster from one seed URL
//! (`cluster = true`) or from a list of URLs, enforces quotas for tenants on every master and
//! reports ready; `tollgate usage report` waits for the cluster instead of failing; the usage
//! ledger equals what the upstream saw, with one high-water mark per writer and tenant however
//! many flushes there were; and a frozen master holds up the ledger of its own tenants only,
//! which catch up without double counting once it runs again.
//!
//! Every test starts its own cluster of `redis-server` processes on free ports (about a second).

mod common;
use common::*;
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

fn key_of(t: &str) -> String {
    format!("tg_live_{}_clusterkeyXXXXXXXXXXXXXXXXXXXX", t.replace('-', "x"))
}

/// A gateway on the cluster: `store` holds the `url` (and `cluster`) lines.
fn config(echo: &Echo, store: &str, tenants: &[String], quota: u64) -> String {
    format!(
        r#"{SERVER_TABLE}
[store]
kind = "redis"
{store}
timeout = "200ms"

[metering]
flush_interval = "100ms"

[upstreams.default]
servers = ["{echo}"]

[tiers.basic]
upstream = "default"
quotas.requests = {{ limit = {quota}, period = "month" }}

{tenants}"#,
        echo = echo.addr,
        tenants = keyed_tenants(tenants, "basic", key_of),
    )
}

fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

/// Sends `n` requests for `tenant`; returns (admitted, refused with 429).
fn send(gw: &Gateway, tenant: &str, n: usize) -> (u64, u64) {
    let auth = bearer(&key_of(tenant));
    let mut conn = Conn::open(gw.addr).expect("connect");
    let (mut ok, mut limited) = (0, 0);
    for _ in 0..n {
        let r = conn.request("GET", "/x", &[("authorization", &auth)], b"").expect("request");
        match r.status {
            200 => ok += 1,
            429 => limited += 1,
            s => panic!("unexpected {s} for {tenant}: {}\n{}", r.text(), gw.log()),
        }
    }
    (ok, limited)
}

/// The ledger's `requests` today for `tenant`, read from the master that holds it.
fn ledger_requests(cluster: &RedisCluster, tenant: &str) -> u64 {
    ledger_requests_on(cluster, cluster.master_for_tenant(tenant), tenant)
}

/// The ledger's `requests` today for `tenant`, read from node `m`.
fn ledger_requests_on(cluster: &RedisCluster, m: usize, tenant: &str) -> u64 {
    let v: Option<u64> = cluster
        .query(m, redis::cmd("HGET").arg(format!("tg:{{{tenant}}}:usage:{}", today())).arg("requests"))
        .expect("HGET usage");
    v.unwrap_or(0)
}

/// Polls until every tenant's ledger `requests` equals `want`, or panics at the deadline.
fn wait_ledger(cluster: &RedisCluster, want: &HashMap<String, u64>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got: HashMap<String, u64> = want.keys().map(|t| (t.clone(), ledger_requests(cluster, t))).collect();
        if got == *want {
            return;
        }
        assert!(Instant::now() < deadline, "ledger {got:?}, expected {want:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn readyz(gw: &Gateway) -> u16 {
    get(gw.admin, "/readyz", &[]).expect("readyz").status
}

/// One seed URL and `cluster = true`: the gateway discovers the cluster, so quotas hold on
/// every master (a standalone connection to the seed would get MOVED for two thirds of the
/// tenants and fall back to the failure policy, admitting past the limit).
#[test]
fn one_seed_with_cluster_true_serves_tenants_on_every_master() {
    let cluster = RedisCluster::start(3, 0, 5000);
    let echo = Echo::start();
    let tenants = cluster.tenants_on_distinct_masters("seed", 3);
    let store = format!("url = \"{}\"\ncluster = true", cluster.url(0));
    let gw = Gateway::start(&config(&echo, &store, &tenants, 5));
    for t in &tenants {
        assert_eq!(send(&gw, t, 7), (5, 2), "quota of 5 for {t}:\n{}", gw.log());
        let m = cluster.master_for_tenant(t);
        let keys: Vec<String> = cluster.query(m, redis::cmd("KEYS").arg(format!("tg:{{{t}}}:q:*"))).expect("KEYS");
        let counters = keys.iter().filter(|k| !k.ends_with(":h") && !k.ends_with(":e")).count();
        assert_eq!(counters, 1, "the quota counter of {t} is on its master (node {m}): {keys:?}");
    }
    let masters: std::collections::HashSet<usize> = tenants.iter().map(|t| cluster.master_for_tenant(t)).collect();
    assert_eq!(masters.len(), 3, "the tenants cover every master");
    let deadline = Instant::now() + Duration::from_secs(10);
    while readyz(&gw) != 200 {
        assert!(Instant::now() < deadline, "/readyz stays {}:\n{}", readyz(&gw), gw.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `url` as a list means a cluster; `tollgate usage report` against it prints the rows the
/// gateway has just written: the command waits for the cluster to be discovered.
#[test]
fn url_list_and_usage_report_right_after_a_flush() {
    let cluster = RedisCluster::start(3, 0, 5000);
    let echo = Echo::start();
    let tenants = cluster.tenants_on_distinct_masters("list", 3);
    let store = format!("url = [\"{}\", \"{}\"]", cluster.url(1), cluster.url(2));
    let gw = Gateway::start(&config(&echo, &store, &tenants, 1000));
    let mut want = HashMap::new();
    for (i, t) in tenants.iter().enumerate() {
        let (ok, _) = send(&gw, t, 3 + i);
        want.insert(t.clone(), ok);
    }
    wait_ledger(&cluster, &want, Duration::from_secs(10));
    for t in &tenants {
        let started = Instant::now();
        let out = Command::new(bin())
            .args(["usage", "report", "-c"])
            .arg(&gw.config_path)
            .args(["--tenant", t, "--from", &today(), "--to", &today(), "--format", "csv"])
            .output()
            .expect("usage report");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "usage report for {t} failed: {}", String::from_utf8_lossy(&out.stderr));
        let line = format!("total,requests,{},", want[t]);
        assert!(stdout.contains(&line), "{t}: no `{line}` in\n{stdout}");
        assert!(started.elapsed() < Duration::from_secs(5), "the report took {:?}", started.elapsed());
    }
}

/// A cluster that cannot be discovered: the report waits, then says which seeds it tried.
#[test]
fn usage_report_names_the_seeds_when_the_cluster_does_not_answer() {
    let dir = temp_dir("cluster-report");
    let port = free_port();
    let cfg = dir.join("tollgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:{port}\"\ncluster = true\n[upstreams.u]\nservers = [\"127.0.0.1:9\"]\n[tiers.t]\nupstream = \"u\"\n[[tenants]]\nid = \"acme\"\ntier = \"t\"\n"
        ),
    )
    .expect("write config");
    let started = Instant::now();
    let out = Command::new(bin())
        .args(["usage", "report", "-c"])
        .arg(&cfg)
        .args(["--tenant", "acme", "--from", &today(), "--to", &today()])
        .output()
        .expect("usage report");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("redis://127.0.0.1:{port}")), "names the seed: {stderr}");
    assert!(stderr.contains("cluster info"), "says what to check: {stderr}");
    assert!(started.elapsed() >= Duration::from_secs(4), "it waited before giving up");
}

/// After traffic over many flushes from two gateways, the ledger equals what the upstream
/// saw per tenant, and the cluster holds one high-water mark hash per tenant with one field
/// per writer: nothing that grows with the number of flushes.
#[test]
fn ledger_equals_the_upstream_with_bounded_marks() {
    let cluster = RedisCluster::start(3, 0, 5000);
    let echo = Echo::start();
    let tenants = cluster.tenants_on_distinct_masters("ledger", 3);
    let store = format!("url = \"{}\"\ncluster = true", cluster.url(0));
    let template = config(&echo, &store, &tenants, 1_000_000);
    let gws = [Gateway::start(&template), Gateway::start(&template)];
    let mut want: HashMap<String, u64> = tenants.iter().map(|t| (t.clone(), 0)).collect();
    let mut marks_after_first_round = None;
    for round in 0..5 {
        for (i, t) in tenants.iter().enumerate() {
            let (ok, _) = send(&gws[(round + i) % 2], t, 4 + i);
            *want.get_mut(t).expect("tenant") += ok;
        }
        // Each round waits for its own flush, so the rounds are separate flushes.
        wait_ledger(&cluster, &want, Duration::from_secs(10));
        let marks = cluster.keys_on_masters("tg:*:lhwm");
        if round == 0 {
            marks_after_first_round = Some(marks.len());
        }
        assert!(marks.len() <= tenants.len(), "one mark hash per tenant at most: {marks:?}");
    }
    assert_eq!(want.values().sum::<u64>(), echo.hits(), "the ledger counts what the upstream saw");
    let marks = cluster.keys_on_masters("tg:*:lhwm");
    assert_eq!(Some(marks.len()), marks_after_first_round, "marks do not grow with flushes");
    assert_eq!(marks.len(), tenants.len());
    for t in &tenants {
        let m = cluster.master_for_tenant(t);
        let writers: u64 = cluster.query(m, redis::cmd("HLEN").arg(format!("tg:{{{t}}}:lhwm"))).expect("HLEN");
        assert_eq!(writers, 2, "one field per gateway for {t}");
        let ttl: i64 = cluster.query(m, redis::cmd("PTTL").arg(format!("tg:{{{t}}}:lhwm"))).expect("PTTL");
        assert!(ttl > 29 * 86_400_000, "the marks expire (in 30 days): {ttl}");
    }
    assert!(cluster.keys_on_masters("tg:*:lb:*").is_empty(), "no per-batch markers");
}

/// A master frozen (SIGSTOP) during traffic: tenants on the other masters keep their ledger
/// current while it is frozen; the frozen master's tenants catch up once it runs again
/// (SIGCONT), and nothing is counted twice.
#[test]
fn a_frozen_master_holds_up_only_its_own_tenants_ledger() {
    let cluster = RedisCluster::start(3, 0, 5000);
    let echo = Echo::start();
    // The directory (`{dir}`) is read on every readiness check and directory poll; freeze a
    // master that does not hold it, so the test is about the ledger.
    let dir_master = cluster.master_of_slot(cluster_slot("tg:{dir}:version"), 0);
    let tenants = cluster.tenants_on_distinct_masters("freeze", 3);
    let frozen_tenant = tenants
        .iter()
        .find(|t| cluster.master_for_tenant(t) != dir_master)
        .expect("a tenant off the {dir} master")
        .clone();
    let frozen = cluster.master_for_tenant(&frozen_tenant);
    let store = format!("url = \"{}\"\ncluster = true", cluster.url(dir_master));
    let gw = Gateway::start(&config(&echo, &store, &tenants, 1_000_000));

    // Before: every tenant has a lease block (so requests during the freeze need no store
    // call) and its ledger is current.
    let mut want: HashMap<String, u64> = HashMap::new();
    for t in &tenants {
        want.insert(t.clone(), send(&gw, t, 5).0);
    }
    wait_ledger(&cluster, &want, Duration::from_secs(10));

    let masters: HashMap<String, usize> = tenants.iter().map(|t| (t.clone(), cluster.master_for_tenant(t))).collect();
    cluster.stop(frozen);
    let frozen_at = Instant::now();
    for t in &tenants {
        *want.get_mut(t).expect("tenant") += send(&gw, t, 6).0;
    }
    // While the master is frozen, the other tenants' rows are written.
    let healthy: HashMap<String, u64> =
        want.iter().filter(|(t, _)| **t != frozen_tenant).map(|(t, n)| (t.clone(), *n)).collect();
    // Read from the masters found before the freeze: asking a frozen node which master holds a
    // tenant would wait for its timeout.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got: HashMap<String, u64> =
            healthy.keys().map(|t| (t.clone(), ledger_requests_on(&cluster, masters[t], t))).collect();
        if got == healthy {
            break;
        }
        assert!(Instant::now() < deadline, "healthy tenants' ledger {got:?}, expected {healthy:?}:\n{}", gw.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let written_within = frozen_at.elapsed();
    assert!(written_within < Duration::from_secs(2), "written {written_within:?} into the freeze, not during it");
    // Still frozen: the master answers nothing.
    assert!(cluster
        .conn(frozen, Duration::from_millis(300))
        .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
        .is_err());
    // Let it be frozen for about two seconds in all.
    std::thread::sleep(Duration::from_secs(2).saturating_sub(frozen_at.elapsed()));
    cluster.cont(frozen);

    wait_ledger(&cluster, &want, Duration::from_secs(15));
    // Wait until nothing is buffered any more: from then on nothing can be replayed, so the
    // equality below is final (a double count would show as more).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = get(gw.admin, "/metrics", &[]).expect("metrics").text();
        if m.lines().any(|l| l == "tollgate_ledger_buffered_batches 0") {
            break;
        }
        assert!(Instant::now() < deadline, "batches stay buffered");
        std::thread::sleep(Duration::from_millis(50));
    }
    let got: HashMap<String, u64> = want.keys().map(|t| (t.clone(), ledger_requests(&cluster, t))).collect();
    assert_eq!(got, want, "after the freeze, every admitted request counted once");
    assert_eq!(want.values().sum::<u64>(), echo.hits());
    eprintln!("healthy tenants' ledger current {written_within:?} into the freeze");
}

/// A 3-master cluster with a replica each, 3 tenants on different masters, and the victim: a
/// tenant (and its master) off the `{dir}` master, so that killing it leaves the directory up.
fn failover_cluster(prefix: &str) -> (RedisCluster, Vec<String>, String, usize) {
    let cluster = RedisCluster::start(3, 1, 1000);
    let dir_master = cluster.master_of_slot(cluster_slot("tg:{dir}:version"), 0);
    let tenants = cluster.tenants_on_distinct_masters(prefix, 3);
    let victim_tenant = tenants
        .iter()
        .find(|t| cluster.master_for_tenant(t) != dir_master)
        .expect("a tenant off the {dir} master")
        .clone();
    let victim = cluster.master_for_tenant(&victim_tenant);
    (cluster, tenants, victim_tenant, victim)
}

/// Waits until master `m`'s replica acknowledges its writes.
fn wait_replica_in_sync(cluster: &RedisCluster, m: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.query::<i64>(m, redis::cmd("WAIT").arg(1).arg(500)).unwrap_or(0) < 1 {
        assert!(Instant::now() < deadline, "the replica of node {m} does not acknowledge its writes");
    }
}

/// A master killed with a replica to take over: once the replica is promoted, its tenants'
/// ledger rows are written there (the new master does not know the script yet), and the
/// counts replicated before the kill are neither lost nor counted again.
#[test]
fn after_a_failover_the_ledger_continues_on_the_new_master() {
    let (mut cluster, tenants, victim_tenant, victim) = failover_cluster("failover");
    let echo = Echo::start();
    let dir_master = cluster.master_of_slot(cluster_slot("tg:{dir}:version"), 0);
    let store = format!("url = [\"{}\", \"{}\"]", cluster.url(dir_master), cluster.url((victim + 1) % 6));
    let gw = Gateway::start(&config(&echo, &store, &tenants, 1_000_000));
    let mut want: HashMap<String, u64> = HashMap::new();
    for t in &tenants {
        want.insert(t.clone(), send(&gw, t, 4).0);
    }
    wait_ledger(&cluster, &want, Duration::from_secs(10));
    // What the victim holds has reached its replica before it dies.
    wait_replica_in_sync(&cluster, victim);

    cluster.kill(victim);
    let promoted = cluster.wait_failover(victim, Duration::from_secs(15));
    assert_eq!(cluster.master_for_tenant(&victim_tenant), promoted);
    for t in &tenants {
        *want.get_mut(t).expect("tenant") += send(&gw, t, 5).0;
    }
    wait_ledger(&cluster, &want, Duration::from_secs(15));
    let marks: u64 =
        cluster.query(promoted, redis::cmd("HLEN").arg(format!("tg:{{{victim_tenant}}}:lhwm"))).expect("HLEN");
    assert_eq!(marks, 1, "one writer's mark, carried over by replication");
    assert_eq!(want.values().sum::<u64>(), echo.hits());
}

/// A cluster node given as a single Redis (no `cluster = true`) answers MOVED for tenants on
/// other masters; the gateway says how to fix the config.
#[test]
fn a_cluster_node_used_as_a_single_redis_is_named_in_the_log() {
    let cluster = RedisCluster::start(3, 0, 5000);
    let echo = Echo::start();
    let tenants = cluster.tenants_on_distinct_masters("moved", 3);
    let seed = (0..3).find(|i| cluster.master_for_tenant(&tenants[0]) != *i).expect("another master");
    let gw = Gateway::start(&config(&echo, &format!("url = \"{}\"", cluster.url(seed)), &tenants, 1000));
    send(&gw, &tenants[0], 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.log().contains("set `cluster = true`") {
        assert!(Instant::now() < deadline, "no hint in the log:\n{}", gw.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A master SIGKILLed under load, with a replica to promote: no client sees an error (quota
/// leases in memory carry the victim's tenant, and the failure policy covers the rest), and
/// once the replica has taken over, the ledger equals the upstream's count of answered
/// requests, per tenant: rows written before the kill reached the replica (the ledger waits
/// for a replica's acknowledgement on a replicated master), rows that could not be written
/// were buffered and replayed, and nothing is counted twice.
#[test]
fn a_master_killed_under_load_loses_no_request_and_no_ledger_row() {
    let (mut cluster, tenants, victim_tenant, victim) = failover_cluster("killed");
    let echo = Echo::start();
    let seeds: Vec<String> = (0..6).filter(|i| *i != victim).map(|i| format!("\"{}\"", cluster.url(i))).collect();
    let store = format!("url = [{}]", seeds.join(", "));
    let gws: Vec<Gateway> = (0..2).map(|_| Gateway::start(&config(&echo, &store, &tenants, 1_000_000))).collect();
    // The victim's replica is in sync before the load starts.
    wait_replica_in_sync(&cluster, victim);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = gws
        .iter()
        .flat_map(|gw| tenants.iter().map(move |t| (gw.addr, t.clone())))
        .map(|(addr, t)| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let auth = bearer(&key_of(&t));
                let mut conn = Conn::open(addr).expect("connect");
                let (mut ok, mut bad) = (0u64, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match conn.request("GET", "/x", &[("authorization", &auth)], b"") {
                        Ok(r) if r.status == 200 => ok += 1,
                        Ok(r) => bad.push(r.status),
                        Err(e) => panic!("{t}: {e}"),
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                (t, ok, bad)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    cluster.kill(victim);
    let promoted = cluster.wait_failover(victim, Duration::from_secs(20));
    assert_eq!(cluster.master_for_tenant(&victim_tenant), promoted);
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut want: HashMap<String, u64> = HashMap::new();
    for h in load {
        let (t, ok, bad) = h.join().expect("load thread");
        assert!(bad.is_empty(), "{t}: answers other than 200 during the failover: {bad:?}");
        *want.entry(t).or_default() += ok;
    }
    assert_eq!(want.values().sum::<u64>(), echo.hits(), "every answered request reached the upstream");
    assert!(want[&victim_tenant] > 0);
    wait_ledger(&cluster, &want, Duration::from_secs(20));
}
