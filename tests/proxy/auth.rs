//! Client authentication: against Postgres itself (no users configured) and against users in
//! the config, with the SQLSTATEs Postgres gives.

use crate::fixture::Proxy;
use crate::support::shared_pg;
use pgstash::config::{AuthMethod, UserConfig};
use tokio_postgres::error::SqlState;

async fn login_code(proxy: &Proxy, user: &str, password: &str, db: &str) -> Option<SqlState> {
    match proxy.try_connect(user, password, db).await {
        Ok(c) => {
            let v: i32 = c
                .query_one("SELECT 7", &[])
                .await
                .expect("query after login")
                .get(0);
            assert_eq!(v, 7);
            None
        }
        Err(e) => Some(
            e.code()
                .unwrap_or_else(|| panic!("login error without SQLSTATE: {e}"))
                .clone(),
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_checks_passwords_with_postgres_and_relays_its_codes() {
    let proxy = Proxy::start(shared_pg(), |_| {});
    assert_eq!(
        login_code(&proxy, "md5user", "md5pass", "postgres").await,
        None
    );
    assert_eq!(
        login_code(&proxy, "scramuser", "scrampass", "postgres").await,
        None
    );
    // A second login reuses the proven password; a wrong one must still fail.
    assert_eq!(
        login_code(&proxy, "scramuser", "scrampass", "other").await,
        None
    );
    assert_eq!(
        login_code(&proxy, "md5user", "wrong", "postgres").await,
        Some(SqlState::INVALID_PASSWORD)
    );
    assert_eq!(
        login_code(&proxy, "scramuser", "wrong", "postgres").await,
        Some(SqlState::INVALID_PASSWORD)
    );
    assert_eq!(
        login_code(&proxy, "postgres", "", "no_such_db").await,
        Some(SqlState::INVALID_CATALOG_NAME)
    );
    // The trust line for postgres only: an unknown role falls under scram and fails like it.
    let unknown = login_code(&proxy, "nobody", "x", "postgres").await;
    assert_eq!(unknown, Some(SqlState::INVALID_PASSWORD));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_follows_role_changes_made_behind_its_back() {
    let pg = shared_pg();
    pg.psql_db(
        "postgres",
        "CREATE ROLE behind LOGIN PASSWORD 'first'; GRANT CONNECT ON DATABASE postgres TO behind;",
    );
    let proxy = Proxy::start(pg, |_| {});
    // Logged in once: pgstash has a pooled connection and the proven password.
    let kept = proxy.connect("behind", "first", "postgres").await;
    assert_eq!(
        login_code(&proxy, "behind", "first", "postgres").await,
        None
    );
    // A new password, set straight in Postgres: the old one no longer logs in, the new one
    // does.
    pg.psql_db("postgres", "ALTER ROLE behind PASSWORD 'second'");
    assert_eq!(
        login_code(&proxy, "behind", "first", "postgres").await,
        Some(SqlState::INVALID_PASSWORD)
    );
    assert_eq!(
        login_code(&proxy, "behind", "second", "postgres").await,
        None
    );
    // Not allowed to log in any more: refused as Postgres refuses it.
    pg.psql_db("postgres", "ALTER ROLE behind NOLOGIN");
    assert_eq!(
        login_code(&proxy, "behind", "second", "postgres").await,
        Some(SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
    );
    // A session that began before keeps working, as in Postgres.
    let v: i32 = kept
        .query_one("SELECT 8", &[])
        .await
        .expect("open session")
        .get(0);
    assert_eq!(v, 8);
    // A password changed through pgstash works at once.
    pg.psql_db("postgres", "ALTER ROLE behind LOGIN");
    let admin = proxy.connect("postgres", "", "postgres").await;
    admin
        .batch_execute("ALTER ROLE behind PASSWORD 'third'")
        .await
        .expect("change the password through pgstash");
    assert_eq!(
        login_code(&proxy, "behind", "third", "postgres").await,
        None
    );
}

fn user(name: &str, method: AuthMethod, password: &str) -> UserConfig {
    UserConfig {
        name: name.into(),
        method,
        password: Some(password.into()),
        password_env: None,
        scram_secret: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_md5_and_scram_users_right_and_wrong_passwords() {
    let proxy = Proxy::start(shared_pg(), |c| {
        c.auth.users = vec![
            user("md5user", AuthMethod::Md5, "md5pass"),
            user("scramuser", AuthMethod::ScramSha256, "scrampass"),
            user("postgres", AuthMethod::Cleartext, "pgpass"),
        ];
    });
    assert_eq!(
        login_code(&proxy, "md5user", "md5pass", "postgres").await,
        None
    );
    assert_eq!(
        login_code(&proxy, "scramuser", "scrampass", "postgres").await,
        None
    );
    assert_eq!(
        login_code(&proxy, "postgres", "pgpass", "postgres").await,
        None
    );
    assert_eq!(
        login_code(&proxy, "md5user", "nope", "postgres").await,
        Some(SqlState::INVALID_PASSWORD)
    );
    assert_eq!(
        login_code(&proxy, "scramuser", "nope", "postgres").await,
        Some(SqlState::INVALID_PASSWORD)
    );
    assert_eq!(
        login_code(&proxy, "ghost", "x", "postgres").await,
        Some(SqlState::INVALID_AUTHORIZATION_SPECIFICATION)
    );
    assert_eq!(
        login_code(&proxy, "scramuser", "scrampass", "no_such_db").await,
        Some(SqlState::INVALID_CATALOG_NAME)
    );
}
