//! Error text for the control-plane connections (tokio-postgres) that says what went wrong.
//!
//! `tokio_postgres::Error` displays as just "db error" or "error connecting to server"; what
//! the server or the OS said is in its source chain. Messages meant for operators need both.

use std::error::Error as _;

/// `e` followed by each error in its source chain: "db error: ERROR: permission denied ...".
pub fn describe(e: &tokio_postgres::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
