//! Connections to Postgres on the data path: a raw wire-protocol client (startup and password
//! authentication) whose messages the relay forwards untouched, and the pool that holds them.

mod connect;
pub mod pool;
pub mod prepared;

pub use connect::{BackendKey, ConnectParams, ServerConn, UpstreamError, connect, connect_with};
