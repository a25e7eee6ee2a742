//! The swappable runtime snapshot: one validated config plus the directory built from it.
//!
//! Requests load the current `Arc<Runtime>` once, at their start, and use it to the end; a
//! reload swaps in a new one without affecting requests in flight.

use crate::config::Config;
use crate::directory::Directory;
use arc_swap::ArcSwap;
use std::sync::Arc;

pub struct Runtime {
    pub config: Arc<Config>,
    pub directory: Directory,
}

impl Runtime {
    pub fn new(config: Config) -> Runtime {
        let directory = Directory::from_config(&config);
        Runtime { config: Arc::new(config), directory }
    }
}

/// The handle everything that serves requests holds.
pub type SharedRuntime = Arc<ArcSwap<Runtime>>;

pub fn shared(rt: Runtime) -> SharedRuntime {
    Arc::new(ArcSwap::from_pointee(rt))
}
