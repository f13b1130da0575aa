//! Role-level changes behind pgstash's back. Roles, their memberships and their default
//! settings live in shared catalogs: no event trigger fires for `GRANT role TO`, `ALTER ROLE
//! ... BYPASSRLS | INHERIT | SET`, and logical decoding does not carry them. Yet each can
//! change what a cached read of that role returns (a privilege gained or lost through a
//! membership, row security bypassed, another search_path). So while a change source runs
//! for a database, this watch reads a fingerprint of those catalogs every second and, when
//! it moves, invalidates the whole database.

use super::{Change, ChangeSink};
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

/// How often the fingerprint is read: the staleness bound for role-level changes.
pub const EVERY: Duration = Duration::from_secs(1);

/// Everything of the shared role catalogs that can change a read's answer, hashed.
/// Readable by any role (pg_roles, not pg_authid).
const FINGERPRINT: &str = "SELECT md5(
    coalesce((SELECT string_agg(concat_ws(',', oid, rolname, rolsuper, rolinherit,
                                          rolbypassrls, rolcanlogin, rolconfig::text),
                                ';' ORDER BY oid) FROM pg_catalog.pg_roles), '')
    || '|' ||
    coalesce((SELECT string_agg(concat_ws(',', roleid, member, admin_option),
                                ';' ORDER BY roleid, member) FROM pg_catalog.pg_auth_members), '')
    || '|' ||
    coalesce((SELECT string_agg(concat_ws(',', setdatabase, setrole, setconfig::text),
                                ';' ORDER BY setdatabase, setrole)
                FROM pg_catalog.pg_db_role_setting), ''))";

/// Watch until cancelled. A lost connection is retried every [`EVERY`]; the first reading
/// after it is compared with the last one before it, so a change made meanwhile is not
/// missed.
pub async fn watch(
    conninfo: String,
    db: String,
    sink: Arc<dyn ChangeSink>,
    connect_timeout: Duration,
    cancel: CancellationToken,
) {
    let mut last: Option<String> = None;
    while !cancel.is_cancelled() {
        if let Err(e) = session(&conninfo, &db, &sink, connect_timeout, &mut last, &cancel).await {
            tracing::warn!(db = %db, error = %e, "role watch lost its connection; retrying");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

async fn session(
    conninfo: &str,
    db: &str,
    sink: &Arc<dyn ChangeSink>,
    connect_timeout: Duration,
    last: &mut Option<String>,
    cancel: &CancellationToken,
) -> Result<(), String> {
    let (client, connection) =
        tokio::time::timeout(connect_timeout, tokio_postgres::connect(conninfo, NoTls))
            .await
            .map_err(|_| format!("no answer within {connect_timeout:?}"))?
            .map_err(|e| crate::pg_error::describe(&e))?;
    let driver = tokio::spawn(connection);
    let result = async {
        let mut ticks = tokio::time::interval(EVERY);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = ticks.tick() => {}
            }
            let read = tokio::time::timeout(connect_timeout, client.query_one(FINGERPRINT, &[]))
                .await
                .map_err(|_| format!("no answer within {connect_timeout:?}"))?
                .map_err(|e| crate::pg_error::describe(&e))?;
            let now: String = read.get(0);
            if last.as_ref().is_some_and(|l| *l != now) {
                tracing::info!(
                    db,
                    "roles, memberships or role settings changed: invalidating the database"
                );
                sink.apply(db, None, &[Change::Database]);
            }
            *last = Some(now);
        }
    }
    .await;
    driver.abort();
    result
}
