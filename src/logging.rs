//! Log output: Tollgate's own `tracing` events, and Pingora's `log` records passed through a
//! filter that keeps secrets and client noise out.
//!
//! Pingora writes some request heads verbatim into its messages (an unparsable head is quoted
//! after `buf:`), and those heads may carry an API key or the admin token. Every Pingora record
//! therefore goes through [`redact`] before it is written: the quoted head, and anything after a
//! credential header name or a `Bearer` scheme, is replaced by `[withheld]`. Records about a
//! client that went away, timed out or sent garbage are client behaviour, not gateway faults, so
//! they are written at debug level rather than as errors.

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
        match record.level() {
            log::Level::Error | log::Level::Warn if client_noise(&msg) => {
                tracing::debug!(target: "pingora", origin, "{msg}")
            }
            log::Level::Error => tracing::error!(target: "pingora", origin, "{msg}"),
            log::Level::Warn => tracing::warn!(target: "pingora", origin, "{msg}"),
            log::Level::Info => tracing::info!(target: "pingora", origin, "{msg}"),
            log::Level::Debug => tracing::debug!(target: "pingora", origin, "{msg}"),
            log::Level::Trace => tracing::trace!(target: "pingora", origin, "{msg}"),
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
    }
}
