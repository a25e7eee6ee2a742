//! Config text through `tollgate::config::load_str`: any text must load or be refused with
//! diagnostics, never panic, and every diagnostic must render.
//!
//! The main file is placed at `<root>/config/tollgate.toml` of a scratch directory laid out like
//! the repository, so `include = ["../lua-free-rules/*.toml"]` finds the bundled rule packs.
//!
//! Loading reaches outside the process in two places, and the harness keeps both local:
//! - includes are read from disk, so an input whose includes resolve outside the scratch
//!   directory is skipped (a path such as `/proc/kmsg` blocks on read);
//! - upstream `servers` given as `name:port` are resolved through DNS. The harness moves
//!   itself into an empty network namespace when it may (as root), where a lookup fails at
//!   once; where it may not, inputs whose servers are not literal `IP:PORT` are skipped.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;
use tollgate::config::file::parse_main;
use tollgate::config::{load_str, Diagnostics, SourceFile};

const PACKS: &[(&str, &str)] = &[
    ("hardening.toml", include_str!("../../lua-free-rules/hardening.toml")),
    ("generation-api.toml", include_str!("../../lua-free-rules/generation-api.toml")),
    ("openai-compatible.toml", include_str!("../../lua-free-rules/openai-compatible.toml")),
];

/// The scratch directory: `config/` for the main file, `lua-free-rules/` with the packs.
fn root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("tollgate-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(root.join("config")).unwrap();
        std::fs::create_dir_all(root.join("lua-free-rules")).unwrap();
        for (name, text) in PACKS {
            std::fs::write(root.join("lua-free-rules").join(name), text).unwrap();
        }
        root
    })
}

/// Whether `pattern`, resolved against `base` as the loader does, stays under `root`.
fn stays_inside(root: &Path, base: &Path, pattern: &str) -> bool {
    let mut out = PathBuf::new();
    for c in base.join(pattern).components() {
        match c {
            Component::ParentDir => {
                if !out.pop() {
                    return false;
                }
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out.starts_with(root)
}

/// Whether the process now has a network namespace of its own, with no interfaces up.
fn offline() -> bool {
    static OFFLINE: OnceLock<bool> = OnceLock::new();
    *OFFLINE.get_or_init(|| {
        // SAFETY: unshare has no memory-safety preconditions; it only changes which network
        // namespace this process belongs to, before the loader opens any socket.
        let offline = unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0;
        eprintln!(
            "config_load: {}",
            if offline { "in an empty network namespace" } else { "no network namespace; screening upstream servers" }
        );
        offline
    })
}

/// Whether the input must be parsed up front to see its includes and servers. A key is only
/// `include` if the text spells `include`, or escapes it in a quoted key (`\u0069nclude`).
fn needs_screening(text: &str, offline: bool) -> bool {
    text.contains("include") || text.contains("\\u") || text.contains("\\U") || !offline
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    let root = root();
    let base = root.join("config");
    let path = base.join("tollgate.toml");
    let offline = offline();

    if needs_screening(&text, offline) {
        let mut pre = Diagnostics::default();
        let main = parse_main(&SourceFile::new(&path, text.clone()), &mut pre);
        if !main.include.iter().all(|p| stays_inside(root, &base, p.get_ref())) {
            return;
        }
        let literal = |s: &str| s.parse::<SocketAddr>().is_ok();
        if !offline && !main.upstreams.iter().all(|(_, u)| u.servers.iter().flatten().all(|s| literal(s.get_ref()))) {
            return;
        }
    }

    let mut diags = Diagnostics::default();
    let loaded = load_str(&path, text, &mut diags);
    // A refused config says why; an accepted one has no errors.
    assert_eq!(loaded.is_none(), diags.has_errors(), "{:?}", diags.items);
    for d in &diags.items {
        let _ = d.to_string();
    }
    if let Some(cfg) = loaded {
        let _ = cfg.summary();
    }
});
