//! Log output: Tollgate's own `tracing` events, and Pingora's `log` records passed through a
//! bridge that keeps secrets and client noise out and says what happened in plain words.
//!
//! Pingora writes some request heads verbatim into its messages (an unparsable head is quoted
//! after `buf:`), and those heads may carry an API key or the admin token. Every Pingora record
//! therefore goes through [`redact`] before it is written: the quoted head, and anything after a
//! credential header name or a `Bearer` scheme, is replaced by `[withheld]`.
//!
//! The bridge then decides where each record goes ([`route`]):
//!
//! - Records about a client that went away, timed out or sent garbage are client behaviour, not
//!   gateway faults: debug.
//! - `Fail to proxy` records repeat what the access log already says about a request (its
//!   `decision`, `status` and `reason`): debug, so a 502 is one line, not two.
//! - An upstream server's health change, which Pingora spells as a Rust debug dump, becomes
//!   `upstream server ADDR is unhealthy` (warn, with the check's error) or `upstream server ADDR
//!   is healthy again` (info), target `tollgate::upstream`, so the default `pingora=warn` filter
//!   does not hide the recovery.
//! - While a new process of a zero-downtime upgrade waits for the listening sockets, Pingora logs
//!   an error every second; that wait is normal, so it becomes one info line per attempt, target
//!   `tollgate::upgrade`.
//! - Everything else keeps Pingora's level, target `pingora` (with the Rust module in `origin`).
//!
//! **Writing.** Every line goes to stderr, and once [`start_writer`] has run (the server does
//! it when it is built, after `run -d` has forked) it goes there through a bounded queue and a
//! writer thread of its own, so a request never waits for the log: the thread collects what is
//! queued and writes it with one system call per batch. When the queue is full, because
//! whatever reads stderr does not keep up, a new line is dropped and counted
//! (`tollgate_log_lines_dropped_total`) instead of blocking the thread that wrote it. Dropping
//! the [`LogWriter`] that [`start_writer`] returns (or calling [`flush`]) writes out what is
//! queued; lines after that are written directly again.
//!
//! **The access log.** One line per request, target `tollgate::access` ([`access`]). When
//! stderr is not a terminal (so no colours are wanted) the line is formatted here, straight from
//! the request's values, in exactly the layout the `tracing` formatter would give it; on a
//! terminal it goes through `tracing` like any other event. Either way the `log.level` and
//! `RUST_LOG` filters decide whether it is written.

use crate::config::{Config, LogFormat};
use std::borrow::Cow;
use std::cell::Cell;
use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

/// What [`init`] decided about the access log, fixed for the life of the process (the filter
/// is not reloaded).
struct Setup {
    format: LogFormat,
    /// The filter lets `tollgate::access` events through.
    access_enabled: bool,
    /// Format access lines here rather than through `tracing`: stderr is not a terminal, so the
    /// subscriber writes no colour codes either.
    direct: bool,
}

static SETUP: OnceLock<Setup> = OnceLock::new();

/// Installs the subscriber for the config's log settings (`RUST_LOG` wins when set) and routes
/// Pingora's `log` records through [`redact`]. Calling it twice keeps the first setup. Lines are
/// written directly to stderr until [`start_writer`] runs.
pub fn init(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{},pingora=warn", config.log.level)));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(Sink).with_ansi(ansi);
    let installed = match config.log.format {
        LogFormat::Json => tracing::subscriber::set_global_default(builder.json().flatten_event(true).finish()),
        LogFormat::Plain => tracing::subscriber::set_global_default(builder.finish()),
    };
    if installed.is_err() {
        return;
    }
    let access_enabled = tracing::enabled!(target: "tollgate::access", tracing::Level::INFO);
    let _ = SETUP.set(Setup { format: config.log.format, access_enabled, direct: !ansi });
    // The configured key headers are credentials too, whatever they are called; so is the
    // token header, and anything that looks like the start of a JWT (`eyJ`, base64 of `{"`).
    let mut markers: Vec<String> = config.tenancy.key_headers.iter().map(|h| h.as_str().to_string()).collect();
    markers.extend(config.tenancy.token_header.iter().map(|h| h.as_str().to_string()));
    if config.tenancy.uses(crate::config::Source::Jwt) {
        markers.push("eyj".into());
    }
    if log::set_boxed_logger(Box::new(PingoraLog { markers })).is_ok() {
        // `log` checks this level before formatting anything, so Pingora's debug chatter costs
        // nothing unless debug output was asked for.
        let max = match tracing::level_filters::LevelFilter::current().into_level() {
            None => log::LevelFilter::Off,
            Some(tracing::Level::ERROR) => log::LevelFilter::Error,
            Some(tracing::Level::WARN) => log::LevelFilter::Warn,
            Some(tracing::Level::INFO) => log::LevelFilter::Info,
            Some(tracing::Level::DEBUG) => log::LevelFilter::Debug,
            Some(tracing::Level::TRACE) => log::LevelFilter::Trace,
        };
        log::set_max_level(max);
    }
}

// ---------------------------------------------------------------------------------------------
// The writer

/// What the writer thread is sent.
enum Msg {
    Line(Vec<u8>),
    /// Write out everything queued before this, then answer.
    Flush(SyncSender<()>),
}

/// The queue to the writer thread; `None` if the thread could not be started.
static QUEUE: OnceLock<Option<SyncSender<Msg>>> = OnceLock::new();
/// Lines go through the queue (otherwise straight to stderr).
static QUEUED: AtomicBool = AtomicBool::new(false);
/// Lines lost: dropped on a full queue, or not written because stderr failed.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The writer thread writes at most this much with one system call.
const BATCH_BYTES: usize = 64 * 1024;
/// How long the writer thread lets lines gather after writing a batch, while lines keep coming:
/// a line waits at most about this long before it is written.
const GATHER: Duration = Duration::from_millis(5);

/// Keeps log lines going through the writer thread; dropping it writes out every queued line.
#[must_use = "dropping the LogWriter stops the non-blocking writer at once"]
pub struct LogWriter(());

impl Drop for LogWriter {
    fn drop(&mut self) {
        flush();
    }
}

/// Sends log lines through a queue of `buffer_lines` lines to a writer thread from now on.
/// Must run after any `fork` (`run -d`): a forked child has no copy of the thread. The queue
/// size of the first call stays.
pub fn start_writer(buffer_lines: usize) -> LogWriter {
    let queue = QUEUE.get_or_init(|| {
        let (tx, rx) = mpsc::sync_channel(buffer_lines.max(1));
        let spawned = std::thread::Builder::new().name("tollgate-log".into()).spawn(move || write_lines(&rx));
        spawned.ok().map(|_| tx)
    });
    if queue.is_some() {
        QUEUED.store(true, Ordering::Release);
    }
    LogWriter(())
}

/// Writes out every queued line and returns to writing directly; waits at most about two
/// seconds for a stderr that does not take the lines. Call it before `std::process::exit`.
pub fn flush() {
    if !QUEUED.swap(false, Ordering::AcqRel) {
        return;
    }
    let Some(Some(queue)) = QUEUE.get() else { return };
    let (ack, acked) = mpsc::sync_channel(1);
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut msg = Msg::Flush(ack);
    // A full queue makes room as the thread writes; a stuck stderr does not, hence the deadline.
    loop {
        match queue.try_send(msg) {
            Ok(()) => break,
            Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                msg = m;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => return,
        }
    }
    let _ = acked.recv_timeout(Duration::from_secs(1));
}

/// Log lines lost so far (`tollgate_log_lines_dropped_total`).
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Hands a finished line (ending in `\n`) to the writer thread, or writes it when there is none.
fn emit(line: Cow<'_, [u8]>) {
    if QUEUED.load(Ordering::Acquire) {
        if let Some(Some(queue)) = QUEUE.get() {
            offer(queue, line.into_owned());
            return;
        }
    }
    if std::io::stderr().write_all(&line).is_err() {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Queues a line without waiting: a full queue (or a writer thread that is gone) drops it,
/// counted.
fn offer(queue: &SyncSender<Msg>, line: Vec<u8>) {
    if queue.try_send(Msg::Line(line)).is_err() {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// The writer thread: takes every line that is queued and writes them in as few system calls
/// as the batch size allows. Idle, it sleeps until a line arrives. Busy, it lets lines gather
/// for [`GATHER`] between batches instead of being woken for each one: a wake-up is a system
/// call for the request thread that queues the line and a context switch for this one, which
/// together cost more than formatting the line.
fn write_lines(rx: &Receiver<Msg>) {
    let mut batch = Batch { bytes: Vec::with_capacity(BATCH_BYTES), lines: 0, out: std::io::stderr() };
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next {
            batch.take(msg);
            while let Ok(msg) = rx.try_recv() {
                batch.take(msg);
            }
            batch.write();
            std::thread::sleep(GATHER);
            next = rx.try_recv().ok();
        }
    }
}

/// Lines taken off the queue and not written yet.
struct Batch {
    bytes: Vec<u8>,
    lines: u64,
    out: std::io::Stderr,
}

impl Batch {
    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Line(line) => {
                self.bytes.extend_from_slice(&line);
                self.lines += 1;
                if self.bytes.len() >= BATCH_BYTES {
                    self.write();
                }
            }
            Msg::Flush(ack) => {
                self.write();
                let _ = ack.try_send(());
            }
        }
    }

    /// One system call (a few for a pipe that takes less at a time); lines stderr refused are
    /// counted as dropped.
    fn write(&mut self) {
        if !self.bytes.is_empty() && self.out.write_all(&self.bytes).is_err() {
            DROPPED.fetch_add(self.lines, Ordering::Relaxed);
        }
        self.bytes.clear();
        self.lines = 0;
    }
}

/// The subscriber's writer: each event arrives as one `write_all` of a whole line.
struct Sink;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Sink {
    type Writer = Sink;

    fn make_writer(&'a self) -> Sink {
        Sink
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        emit(Cow::Borrowed(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `tollgate_log_lines_dropped_total`, read from [`dropped_lines`] at each scrape.
pub struct DroppedLines(prometheus::IntCounter);

impl DroppedLines {
    pub fn new() -> prometheus::Result<DroppedLines> {
        prometheus::IntCounter::new(
            "tollgate_log_lines_dropped_total",
            "Log lines dropped because the log writer could not keep up (or stderr failed)",
        )
        .map(DroppedLines)
    }
}

impl prometheus::core::Collector for DroppedLines {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let (now, shown) = (dropped_lines(), self.0.get());
        if now > shown {
            self.0.inc_by(now - shown);
        }
        self.0.collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The access log

/// One access-log line: what the meter stage knows about a finished request. The fields and
/// their order are the documented ones (docs/deployment.md); `-` stands for "none" in text
/// fields, and absent numbers are left out.
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub tenant: &'a str,
    pub tier: &'a str,
    pub key_id: &'a str,
    pub rule: &'a str,
    pub decision: &'a str,
    pub reason: &'a str,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub upstream: &'a str,
    /// Microseconds, written as milliseconds with three decimals at most.
    pub upstream_us: Option<u64>,
    pub total_us: u64,
    pub client_ip: Option<IpAddr>,
    pub charge_metric: &'a str,
    pub charge_units: Option<u64>,
    pub quota_metric: &'a str,
    pub quota_remaining: Option<u64>,
}

/// Writes the access-log line of a request, if the log filter lets `tollgate::access` through.
pub fn access(a: &Access<'_>) {
    match SETUP.get() {
        Some(s) if !s.access_enabled => {}
        Some(s) if s.direct => {
            let mut line = Vec::with_capacity(512);
            match s.format {
                LogFormat::Json => access_json(&mut line, a, SystemTime::now()),
                LogFormat::Plain => access_plain(&mut line, a, SystemTime::now()),
            }
            emit(Cow::Owned(line));
        }
        _ => access_event(a),
    }
}

/// The access line as a `tracing` event, for a terminal (colours) or a subscriber installed by
/// someone else.
fn access_event(a: &Access<'_>) {
    let ms = |us: u64| us as f64 / 1000.0;
    tracing::info!(
        target: "tollgate::access",
        request_id = %a.request_id,
        method = %a.method,
        path = %a.path,
        tenant = a.tenant,
        tier = a.tier,
        key_id = a.key_id,
        rule = a.rule,
        decision = a.decision,
        reason = a.reason,
        status = a.status,
        bytes_in = a.bytes_in,
        bytes_out = a.bytes_out,
        upstream = a.upstream,
        upstream_ms = a.upstream_us.map(ms),
        total_ms = ms(a.total_us),
        client_ip = a.client_ip.map(|i| i.to_string()).unwrap_or_default(),
        charge_metric = a.charge_metric,
        charge_units = a.charge_units,
        quota_metric = a.quota_metric,
        quota_remaining = a.quota_remaining,
        "request"
    );
}

/// How a field is written: `tracing-subscriber`'s plain format (` name=value`, strings in Rust
/// debug quoting) or its JSON format (`,"name":value`).
#[derive(Clone, Copy)]
enum Style {
    Plain,
    Json,
}

impl Style {
    fn name(self, out: &mut Vec<u8>, name: &str) {
        match self {
            Style::Plain => {
                out.push(b' ');
                out.extend_from_slice(name.as_bytes());
                out.push(b'=');
            }
            Style::Json => {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b"\":");
            }
        }
    }

    fn text(self, out: &mut Vec<u8>, name: &str, v: &str) {
        self.name(out, name);
        match self {
            Style::Plain => push_debug_str(out, v),
            Style::Json => push_json_str(out, v),
        }
    }

    fn num(self, out: &mut Vec<u8>, name: &str, v: u64) {
        self.name(out, name);
        push_u64(out, v);
    }

    fn millis(self, out: &mut Vec<u8>, name: &str, us: u64) {
        self.name(out, name);
        push_millis(out, us);
    }
}

/// The fields after the request id, method and path, in the order both formats write them.
fn access_fields(out: &mut Vec<u8>, a: &Access<'_>, style: Style) {
    style.text(out, "tenant", a.tenant);
    style.text(out, "tier", a.tier);
    style.text(out, "key_id", a.key_id);
    style.text(out, "rule", a.rule);
    style.text(out, "decision", a.decision);
    style.text(out, "reason", a.reason);
    style.num(out, "status", a.status.into());
    style.num(out, "bytes_in", a.bytes_in);
    style.num(out, "bytes_out", a.bytes_out);
    style.text(out, "upstream", a.upstream);
    if let Some(us) = a.upstream_us {
        style.millis(out, "upstream_ms", us);
    }
    style.millis(out, "total_ms", a.total_us);
    // `%`-formatted in both: quoted, never escaped (an address has nothing to escape).
    style.name(out, "client_ip");
    out.push(b'"');
    push_ip(out, a.client_ip);
    out.push(b'"');
    style.text(out, "charge_metric", a.charge_metric);
    if let Some(n) = a.charge_units {
        style.num(out, "charge_units", n);
    }
    style.text(out, "quota_metric", a.quota_metric);
    if let Some(n) = a.quota_remaining {
        style.num(out, "quota_remaining", n);
    }
}

/// The line `tracing-subscriber`'s plain (`Full`, no colours) formatter writes for the event.
fn access_plain(out: &mut Vec<u8>, a: &Access<'_>, now: SystemTime) {
    push_timestamp(out, now);
    out.extend_from_slice(b"  INFO tollgate::access: request request_id=");
    // `%` fields are written as they are, `&str` fields as Rust debug strings, numbers plainly.
    out.extend_from_slice(a.request_id.as_bytes());
    out.extend_from_slice(b" method=");
    out.extend_from_slice(a.method.as_bytes());
    out.extend_from_slice(b" path=");
    out.extend_from_slice(a.path.as_bytes());
    access_fields(out, a, Style::Plain);
    out.push(b'\n');
}

/// The line `tracing-subscriber`'s JSON formatter (`flatten_event`) writes for the event.
fn access_json(out: &mut Vec<u8>, a: &Access<'_>, now: SystemTime) {
    out.extend_from_slice(b"{\"timestamp\":\"");
    push_timestamp(out, now);
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\"");
    Style::Json.text(out, "request_id", a.request_id);
    Style::Json.text(out, "method", a.method);
    Style::Json.text(out, "path", a.path);
    access_fields(out, a, Style::Json);
    out.extend_from_slice(b",\"target\":\"tollgate::access\"}\n");
}

/// Printable ASCII other than `"` and `\`: the same in every quoting used here.
fn plain_ascii(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// `s` as Rust's `{:?}` writes it (what the plain formatter does with a `&str` field).
fn push_debug_str(out: &mut Vec<u8>, s: &str) {
    if plain_ascii(s) {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = write!(out, "{s:?}");
    }
}

/// `s` as a JSON string, escaped as `serde_json` escapes it.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        let _ = serde_json::to_writer(&mut *out, s);
    }
}

fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Microseconds as milliseconds, written as the shortest float that reads back the same (what
/// `{:?}` and `serde_json` write for `us as f64 / 1000.0`): `1.0`, `0.06`, `12.345`.
fn push_millis(out: &mut Vec<u8>, us: u64) {
    push_u64(out, us / 1000);
    out.push(b'.');
    let frac = us % 1000;
    if frac == 0 {
        out.push(b'0');
        return;
    }
    let digits = [b'0' + (frac / 100) as u8, b'0' + (frac / 10 % 10) as u8, b'0' + (frac % 10) as u8];
    let len = if frac.is_multiple_of(100) {
        1
    } else if frac.is_multiple_of(10) {
        2
    } else {
        3
    };
    out.extend_from_slice(&digits[..len]);
}

fn push_ip(out: &mut Vec<u8>, ip: Option<IpAddr>) {
    match ip {
        None => {}
        Some(IpAddr::V4(v4)) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_u64(out, octet.into());
            }
        }
        Some(ip) => {
            let _ = write!(out, "{ip}");
        }
    }
}

thread_local! {
    /// The last second this thread wrote a timestamp for, and its `YYYY-MM-DDTHH:MM:SS`.
    static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
}

/// `now` as `tracing-subscriber` writes it: RFC 3339, UTC, microseconds.
fn push_timestamp(out: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (cached, mut text) = SECOND.get();
    if cached != secs {
        text = civil_seconds(secs);
        SECOND.set((secs, text));
    }
    out.extend_from_slice(&text);
    out.push(b'.');
    let micros = since.subsec_micros();
    let mut frac = [b'0'; 6];
    let mut n = micros;
    for d in frac.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&frac);
    out.push(b'Z');
}

/// `YYYY-MM-DDTHH:MM:SS` of Unix seconds (years 1970 to 9999).
fn civil_seconds(secs: u64) -> [u8; 19] {
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    let (hh, mm, ss) = (rem / 3600, rem / 60 % 60, rem % 60);
    let mut t = *b"0000-00-00T00:00:00";
    let two = |t: &mut [u8; 19], at: usize, v: u64| {
        t[at] = b'0' + (v / 10 % 10) as u8;
        t[at + 1] = b'0' + (v % 10) as u8;
    };
    let y = y.clamp(0, 9999) as u64;
    two(&mut t, 0, y / 100);
    two(&mut t, 2, y % 100);
    two(&mut t, 5, m.into());
    two(&mut t, 8, d.into());
    two(&mut t, 11, hh);
    two(&mut t, 14, mm);
    two(&mut t, 17, ss);
    t
}

/// The proleptic Gregorian date of a day number (days since 1970-01-01), after Howard Hinnant's
/// `civil_from_days`.
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Replaces request heads and credentials in a log message with `[withheld]`.
pub fn redact(msg: &str) -> Cow<'_, str> {
    redact_with(msg, &[])
}

/// [`redact`], also cutting at any of `extra` (lower-case header names).
pub fn redact_with<'m>(msg: &'m str, extra: &[String]) -> Cow<'m, str> {
    const MARKERS: &[&str] = &["buf:", "authorization", "x-api-key", "bearer ", "api-key", "token", "cookie"];
    let lower = msg.to_ascii_lowercase();
    let cut = MARKERS.iter().copied().chain(extra.iter().map(String::as_str)).filter_map(|m| lower.find(m)).min();
    match cut {
        // `to_ascii_lowercase` keeps byte offsets, so the cut is a char boundary of `msg` too.
        Some(i) if msg.is_char_boundary(i) => Cow::Owned(format!("{}[withheld]", &msg[..i])),
        Some(_) => Cow::Borrowed("[withheld]"),
        None => Cow::Borrowed(msg),
    }
}

/// Whether an error record from Pingora is about a client, not about the gateway.
fn client_noise(msg: &str) -> bool {
    const CLIENT: &[&str] = &[
        "Downstream",
        "downstream",
        "while reading request headers",
        "Client prematurely closed",
        "keepalive timeout",
        "read timeout",
    ];
    CLIENT.iter().any(|c| msg.contains(c))
}

/// Where a Pingora record is written, and in which words.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    /// Under target `pingora`, at this level.
    Pingora(log::Level, &'a str),
    /// An upstream server failed its health check (`error`) or passes it again (`None`).
    Health { server: &'a str, error: Option<&'a str> },
    /// The new process of an upgrade has not received the listening sockets yet.
    UpgradeWait,
}

/// Decides where a (redacted) Pingora record goes; see the module docs.
fn route(level: log::Level, msg: &str) -> Route<'_> {
    if let Some((server, error)) = health_change(msg) {
        return Route::Health { server, error };
    }
    if msg.starts_with("No incoming socket transfer") {
        return Route::UpgradeWait;
    }
    let level = match level {
        log::Level::Error | log::Level::Warn if client_noise(msg) || msg.starts_with("Fail to proxy") => {
            log::Level::Debug
        }
        other => other,
    };
    Route::Pingora(level, msg)
}

/// Reads Pingora's `<Backend debug dump> becomes unhealthy, <error>` and `<...> becomes
/// healthy`: the server's address, and the error when it became unhealthy.
fn health_change(msg: &str) -> Option<(&str, Option<&str>)> {
    let (summary, outcome) = msg.split_once(" becomes ")?;
    let addr = summary.strip_prefix("Backend {")?.split_once("addr: ")?.1;
    let addr = addr.strip_prefix("Inet(").or_else(|| addr.strip_prefix("Unix("))?;
    let (addr, _) = addr.split_once(')')?;
    if outcome == "healthy" {
        return Some((addr, None));
    }
    let error = outcome.strip_prefix("unhealthy")?.trim_start_matches(',').trim();
    Some((addr, Some(if error.is_empty() { "-" } else { error })))
}

/// The `log` backend that hands Pingora's records to `tracing`, redacted.
struct PingoraLog {
    /// The configured key header names, withheld like the built-in credential names.
    markers: Vec<String>,
}

impl log::Log for PingoraLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let text = record.args().to_string();
        let msg = redact_with(&text, &self.markers);
        let origin = record.target();
        match route(record.level(), &msg) {
            Route::Health { server, error: Some(error) } => {
                tracing::warn!(target: "tollgate::upstream", server, error, "upstream server {server} is unhealthy")
            }
            Route::Health { server, error: None } => {
                tracing::info!(target: "tollgate::upstream", server, "upstream server {server} is healthy again")
            }
            Route::UpgradeWait => tracing::info!(
                target: "tollgate::upgrade",
                "waiting for the running instance to hand over its listening sockets (send it SIGQUIT)"
            ),
            Route::Pingora(level, msg) => match level {
                log::Level::Error => tracing::error!(target: "pingora", origin, "{msg}"),
                log::Level::Warn => tracing::warn!(target: "pingora", origin, "{msg}"),
                log::Level::Info => tracing::info!(target: "pingora", origin, "{msg}"),
                log::Level::Debug => tracing::debug!(target: "pingora", origin, "{msg}"),
                log::Level::Trace => tracing::trace!(target: "pingora", origin, "{msg}"),
            },
        }
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything after the timestamp: the part of a line that does not depend on the clock.
    fn after_timestamp(line: &str) -> &str {
        match line.find('Z') {
            Some(i) => &line[i + 1..],
            None => line,
        }
    }

    /// The line `tracing-subscriber` writes for the access event, in `format`.
    fn through_tracing(a: &Access<'_>, format: LogFormat) -> String {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap_or_else(|p| p.into_inner()).extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let builder = tracing_subscriber::fmt().with_writer(move || out.clone()).with_ansi(false);
        match format {
            LogFormat::Json => {
                tracing::subscriber::with_default(builder.json().flatten_event(true).finish(), || access_event(a))
            }
            LogFormat::Plain => tracing::subscriber::with_default(builder.finish(), || access_event(a)),
        }
        let bytes = buf.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        String::from_utf8(bytes).unwrap_or_default()
    }

    fn direct(a: &Access<'_>, format: LogFormat) -> String {
        let mut out = Vec::new();
        match format {
            LogFormat::Json => access_json(&mut out, a, SystemTime::now()),
            LogFormat::Plain => access_plain(&mut out, a, SystemTime::now()),
        }
        String::from_utf8(out).unwrap_or_default()
    }

    fn sample() -> Access<'static> {
        Access {
            request_id: "req-7f3a",
            method: "POST",
            path: "/api/generate",
            tenant: "acme",
            tier: "pro",
            key_id: "acme-key",
            rule: "gen-generate",
            decision: "forwarded",
            reason: "-",
            status: 200,
            bytes_in: 0,
            bytes_out: 303,
            upstream: "api",
            upstream_us: Some(1087),
            total_us: 1771,
            client_ip: Some(IpAddr::from([127, 0, 0, 1])),
            charge_metric: "records_generated",
            charge_units: Some(500),
            quota_metric: "records_generated",
            quota_remaining: Some(49_999_500),
        }
    }

    #[test]
    fn access_lines_are_what_tracing_would_write() {
        let base = sample();
        let cases = [
            base,
            Access {
                tenant: "-",
                tier: "-",
                key_id: "-",
                rule: "-",
                decision: "rejected",
                reason: "invalid_key",
                status: 401,
                upstream: "-",
                upstream_us: None,
                total_us: 1000,
                client_ip: None,
                charge_metric: "-",
                charge_units: None,
                quota_metric: "-",
                quota_remaining: None,
                ..base
            },
            // Text that needs escaping in one format or the other.
            Access {
                path: "/caf\u{e9}/\"q\"\\x",
                tenant: "t\"q",
                rule: "r\\u\u{e9}\u{301}",
                key_id: "k\n\t\u{1}\u{7f}",
                method: "PROP\"FIND",
                upstream_us: Some(0),
                total_us: 12_345_678,
                client_ip: Some("2001:db8::1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))),
                ..base
            },
            Access { upstream_us: Some(60), total_us: 100, client_ip: Some(IpAddr::from([10, 200, 3, 0])), ..base },
        ];
        for a in &cases {
            for format in [LogFormat::Plain, LogFormat::Json] {
                let want = through_tracing(a, format);
                let got = direct(a, format);
                assert_eq!(after_timestamp(&got), after_timestamp(&want), "{format:?}");
                assert_eq!(got.len(), want.len(), "{format:?}: {got}");
            }
        }
    }

    #[test]
    fn milliseconds_are_written_as_the_float_would_be() {
        let mut us = 0u64;
        while us < 20_000_000 {
            let mut out = Vec::new();
            push_millis(&mut out, us);
            let text = String::from_utf8(out).unwrap_or_default();
            let f = us as f64 / 1000.0;
            assert_eq!(text, format!("{f:?}"), "{us}");
            assert_eq!(text, serde_json::to_string(&f).unwrap_or_default(), "{us}");
            us = us * 3 / 2 + 1 + us % 7;
        }
    }

    #[test]
    fn timestamps_are_rfc3339_to_the_microsecond() {
        let mut secs = 0u64;
        while secs < 253_402_300_799 {
            for micros in [0u32, 7, 999_999, 123_456] {
                let t = SystemTime::UNIX_EPOCH + Duration::new(secs, micros * 1000 + 999);
                let mut out = Vec::new();
                push_timestamp(&mut out, t);
                let want = chrono::DateTime::<chrono::Utc>::from(t).format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
                assert_eq!(String::from_utf8(out).unwrap_or_default(), want);
            }
            secs = secs * 2 + 86_399 + secs % 13;
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let (tx, rx) = mpsc::sync_channel(2);
        let before = dropped_lines();
        for line in [&b"one\n"[..], b"two\n", b"three\n"] {
            offer(&tx, line.to_vec());
        }
        assert_eq!(dropped_lines() - before, 1);
        let queued: Vec<Vec<u8>> = rx
            .try_iter()
            .filter_map(|m| match m {
                Msg::Line(l) => Some(l),
                Msg::Flush(_) => None,
            })
            .collect();
        assert_eq!(queued, vec![b"one\n".to_vec(), b"two\n".to_vec()]);
    }

    #[test]
    fn heads_and_credentials_are_withheld() {
        let head = "Fail: buf: GET / HTTP/1.1\\r\\nAuthorization: Bearer tg_admin_secret\\r\\n";
        let out = redact(head);
        assert!(!out.contains("tg_admin_secret"), "{out}");
        assert!(out.starts_with("Fail: "));
        assert!(!redact("x-api-key: tg_live_abc").contains("tg_live_abc"));
        assert!(!redact("AUTHORIZATION=Bearer s3cret").contains("s3cret"));
        assert!(!redact("\"cookie\": \"session=s3cret\"").contains("s3cret"));
        let custom = ["x-gateway-key".to_string()];
        assert!(!redact_with("\"x-gateway-key\": \"tg_live_s3cret\"", &custom).contains("s3cret"));
        assert_eq!(redact("Backend 127.0.0.1:9000 becomes unhealthy"), "Backend 127.0.0.1:9000 becomes unhealthy");
    }

    #[test]
    fn client_failures_are_not_errors() {
        assert!(client_noise("Fail to proxy: Downstream ReadError while reading request headers"));
        assert!(!client_noise("Fail to proxy: Upstream ConnectRefused"));
        let r = route(log::Level::Error, "Downstream handshake error from 10.0.0.1:5000: eof");
        assert_eq!(r, Route::Pingora(log::Level::Debug, "Downstream handshake error from 10.0.0.1:5000: eof"));
    }

    #[test]
    fn failed_proxy_attempts_are_left_to_the_access_log() {
        let last = "Fail to proxy: ConnectRefused context: 127.0.0.1:9 cause: Connection refused (os error 111), \
                    status: 502, tries: 1, retry: false, GET /dead/x, Host: localhost";
        assert_eq!(route(log::Level::Error, last), Route::Pingora(log::Level::Debug, last));
        let retried = "Fail to proxy: ConnectTimedout, tries: 1, retry: true, GET /x, Host: localhost";
        assert_eq!(route(log::Level::Warn, retried), Route::Pingora(log::Level::Debug, retried));
        // Other errors keep their level.
        let other = "Unable to send listener sockets to new process: ENOENT";
        assert_eq!(route(log::Level::Error, other), Route::Pingora(log::Level::Error, other));
    }

    #[test]
    fn health_changes_are_told_in_plain_words() {
        let down = "Backend { addr: Inet(127.0.0.1:9000), weight: 1, ext: Extensions } becomes unhealthy, \
                    ConnectRefused context: TCP health check cause: Connection refused (os error 111)";
        assert_eq!(
            route(log::Level::Warn, down),
            Route::Health {
                server: "127.0.0.1:9000",
                error: Some("ConnectRefused context: TCP health check cause: Connection refused (os error 111)"),
            }
        );
        let up = "Backend { addr: Inet([::1]:8081), weight: 1, ext: Extensions } becomes healthy";
        assert_eq!(route(log::Level::Info, up), Route::Health { server: "[::1]:8081", error: None });
        // A message that only looks similar is passed on as it is.
        let odd = "Backend pool becomes healthy";
        assert_eq!(route(log::Level::Info, odd), Route::Pingora(log::Level::Info, odd));
    }

    #[test]
    fn waiting_for_upgrade_sockets_is_not_an_error() {
        let r = route(log::Level::Error, "No incoming socket transfer, sleep 1s and try again");
        assert_eq!(r, Route::UpgradeWait);
        let gave_up = "Giving up reading socket from: /tmp/tollgate_upgrade.sock, error: EAGAIN";
        assert_eq!(route(log::Level::Error, gave_up), Route::Pingora(log::Level::Error, gave_up));
    }
}
