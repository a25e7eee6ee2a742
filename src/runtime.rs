//! The swappable runtime snapshot: one validated config plus the directory built from it and
//! from the tenants and keys the store manages.
//!
//! Requests load the current `Arc<Runtime>` once, at their start, and use it to the end; a
//! reload or a directory change swaps in a new one without affecting requests in flight.

use crate::config::Config;
use crate::directory::Directory;
use arc_swap::ArcSwap;
use std::sync::Arc;

pub struct Runtime {
    /// The config, without its tenants: they live in the directory only (a config of a million
    /// keys would otherwise be held twice).
    pub config: Arc<Config>,
    pub directory: Directory,
}

impl Runtime {
    /// A runtime with only the config's tenants.
    pub fn new(mut config: Config) -> Runtime {
        let directory = Directory::from_config(&mut config);
        config.tenants = Vec::new();
        Runtime { config: Arc::new(config), directory }
    }
}

/// The handle everything that serves requests holds.
pub type SharedRuntime = Arc<ArcSwap<Runtime>>;

pub fn shared(rt: Runtime) -> SharedRuntime {
    Arc::new(ArcSwap::from_pointee(rt))
}
