//! pgstash: a caching proxy for PostgreSQL.
//!
//! The data path, one module per stage:
//! - [`server`] accepts clients and holds what they share;
//! - [`login`] negotiates the startup phase and authenticates ([`auth`]);
//! - [`protocol`] frames bytes into messages and builds the few pgstash writes itself;
//! - [`relay`] moves messages between a client and a pooled server connection, keeping the
//!   order of answers and prepared statements right across connections;
//! - [`session`] tracks what must follow a client between server connections (settings) or
//!   keep it on one (pinning);
//! - [`upstream`] opens and pools server connections;
//! - [`cancel`] routes CancelRequests to the right server connection.
//!
//! Beside the data path: [`migrate`] installs what pgstash needs inside a database (the
//! NOTIFY triggers that [`invalidation`] listens to).

pub mod analysis;
pub mod auth;
pub mod cache;
pub mod cancel;
pub mod catalog;
pub mod config;
pub mod huge_pages;
pub mod invalidation;
pub mod login;
pub mod metrics;
pub mod migrate;
pub mod pg_error;
pub mod protocol;
pub mod redis_tier;
pub mod relay;
pub mod server;
pub mod session;
pub mod upstream;
