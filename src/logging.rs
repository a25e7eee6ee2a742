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

use crate::config::{Config, LogFormat};
use std::borrow::Cow;

/// Installs the subscriber for the config's log settings (`RUST_LOG` wins when set) and routes
/// Pingora's `log` records through [`redact`]. Calling it twice keeps the first setup.
pub fn init(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{},pingora=warn", config.log.level)));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let installed = match config.log.format {
        LogFormat::Json => tracing::subscriber::set_global_default(builder.json().flatten_event(true).finish()),
        LogFormat::Plain => tracing::subscriber::set_global_default(builder.finish()),
    };
    if installed.is_ok() && log::set_boxed_logger(Box::new(PingoraLog)).is_ok() {
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

/// Replaces request heads and credentials in a log message with `[withheld]`.
pub fn redact(msg: &str) -> Cow<'_, str> {
    const MARKERS: &[&str] = &["buf:", "authorization", "x-api-key", "bearer ", "api-key", "token"];
    let lower = msg.to_ascii_lowercase();
    let cut = MARKERS.iter().filter_map(|m| lower.find(m)).min();
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
struct PingoraLog;

impl log::Log for PingoraLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let text = record.args().to_string();
        let msg = redact(&text);
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

    #[test]
    fn heads_and_credentials_are_withheld() {
        let head = "Fail: buf: GET / HTTP/1.1\\r\\nAuthorization: Bearer tg_admin_secret\\r\\n";
        let out = redact(head);
        assert!(!out.contains("tg_admin_secret"), "{out}");
        assert!(out.starts_with("Fail: "));
        assert!(!redact("x-api-key: tg_live_abc").contains("tg_live_abc"));
        assert!(!redact("AUTHORIZATION=Bearer s3cret").contains("s3cret"));
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
