//! Tollgate: a multi-tenant API gateway on Pingora.
//!
//! Every request is resolved to a tenant, authenticated by a hashed API key, authorized by
//! declarative rules, and forwarded to the tenant tier's upstream pool. See `docs/` for the
//! operator manual and [`pipeline`] for the request path.

pub mod admin;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod directory;
pub mod echo;
pub mod edge;
pub mod error;
pub mod fasthash;
pub mod guard;
pub mod jobs;
pub mod jwks;
pub mod jwt;
pub mod keys;
pub mod limits;
pub mod logging;
pub mod metering;
pub mod metrics;
pub mod pipeline;
pub mod policy;
pub mod rules;
pub mod runtime;
pub mod scan;
pub mod schema;
pub mod store;
pub mod upstream;
