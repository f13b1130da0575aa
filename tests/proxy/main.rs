//! Integration tests: pgstash in front of a real, throwaway PostgreSQL started by `support`.

mod support;

mod fixture;

mod auth;
mod cache;
mod clients;
mod frontdoor;
mod harness;
mod migrate;
mod notify;
mod pgbench;
mod pool;
mod psql;
mod python;
mod recorder;
mod resilience;
mod session_state;
mod shared_tier;
mod sources;
mod unsynced;
mod wal;
mod wrong_client;
