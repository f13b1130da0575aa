//! Tests of the collector: pgoutput messages in, committed changes out.

use super::super::pgoutput::decode;
use super::super::pgoutput::tests::{Msg, relation};
use super::*;

fn t(name: &str) -> TableRef {
    TableRef {
        schema: "public".into(),
        name: name.into(),
    }
}

fn keys(name: &str, ks: &[&str]) -> Change {
    Change::Rows {
        table: t(name),
        keys: Some(ks.iter().map(|k| k.to_string()).collect()),
    }
}

/// Rows of `public.name` changed, which ones unknown.
fn unknown_rows(name: &str) -> Change {
    Change::Rows {
        table: t(name),
        keys: None,
    }
}

/// Feed raw messages through the decoder; return the changes of each commit.
fn run(c: &mut Collector, msgs: &[bytes::Bytes]) -> Vec<Committed> {
    msgs.iter()
        .filter_map(|m| c.handle(decode(m).expect("decodes")).expect("in order"))
        .collect()
}

fn begin() -> bytes::Bytes {
    Msg::new(b'B').u64(0x100).u64(0).u32(7).bytes()
}

fn commit(end: u64, time: u64) -> bytes::Bytes {
    Msg::new(b'C').u8(0).u64(0x100).u64(end).u64(time).bytes()
}

fn insert(rel: u32, cols: &[Option<&str>]) -> bytes::Bytes {
    Msg::new(b'I').u32(rel).u8(b'N').tuple(cols).bytes()
}

fn pk_table() -> bytes::Bytes {
    relation(1, "t", b'd', &[("id", true), ("v", false)])
}

#[test]
fn a_commit_reports_every_changed_key_with_its_time_and_position() {
    let mut c = Collector::new(100, true);
    let out = run(
        &mut c,
        &[
            begin(),
            pk_table(),
            insert(1, &[Some("1"), Some("10")]),
            insert(1, &[Some("2"), None]),
            insert(1, &[Some("1"), Some("11")]),
            commit(0x200, 1_000_000),
        ],
    );
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].changes, [keys("t", &["1", "2"])]);
    assert_eq!(out[0].end_lsn, Some(Lsn(0x200)));
    assert_eq!(
        out[0].committed_at,
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(946_684_801))
    );
    assert!(c.is_idle());
}

#[test]
fn an_update_changing_the_key_reports_old_and_new_key() {
    let mut c = Collector::new(100, true);
    let update = Msg::new(b'U')
        .u32(1)
        .u8(b'K')
        .tuple(&[Some("5"), None])
        .u8(b'N')
        .tuple(&[Some("50"), Some("\u{1}")])
        .bytes();
    let same_key = Msg::new(b'U')
        .u32(1)
        .u8(b'N')
        .tuple(&[Some("7"), Some("1")])
        .bytes();
    let out = run(
        &mut c,
        &[begin(), pk_table(), update, same_key, commit(0x200, 0)],
    );
    assert_eq!(out[0].changes, [keys("t", &["5", "50", "7"])]);
}

#[test]
fn a_delete_reports_the_old_key() {
    let mut c = Collector::new(100, true);
    let delete = Msg::new(b'D')
        .u32(1)
        .u8(b'K')
        .tuple(&[Some("9"), None])
        .bytes();
    let out = run(&mut c, &[begin(), pk_table(), delete, commit(0x200, 0)]);
    assert_eq!(out[0].changes, [keys("t", &["9"])]);
}

#[test]
fn rows_without_a_usable_single_column_key_are_unknown() {
    let mut c = Collector::new(100, true);
    let no_key = relation(2, "nokey", b'd', &[("a", false), ("b", false)]);
    let two_keys = relation(3, "pair", b'd', &[("a", true), ("b", true)]);
    // REPLICA IDENTITY FULL flags every column; a lone column is still not the PK.
    let full = relation(4, "full", b'f', &[("a", true)]);
    let full_delete = Msg::new(b'D').u32(4).u8(b'O').tuple(&[Some("3")]).bytes();
    // REPLICA IDENTITY USING INDEX: a unique index, not the primary key.
    let by_index = relation(5, "byidx", b'i', &[("id", false), ("code", true)]);
    let out = run(
        &mut c,
        &[
            begin(),
            no_key,
            two_keys,
            full,
            by_index,
            insert(2, &[Some("1"), Some("2")]),
            insert(3, &[Some("1"), Some("2")]),
            full_delete,
            insert(5, &[Some("1"), Some("c")]),
            commit(0x200, 0),
        ],
    );
    assert_eq!(
        out[0].changes,
        [
            unknown_rows("nokey"),
            unknown_rows("pair"),
            unknown_rows("full"),
            unknown_rows("byidx")
        ]
    );
}

#[test]
fn a_key_the_change_does_not_carry_makes_the_rows_unknown() {
    // An unchanged TOASTed key and a null key cannot name the row.
    for key in [Some("\u{1}"), None] {
        let mut c = Collector::new(100, true);
        let update = Msg::new(b'U')
            .u32(1)
            .u8(b'N')
            .tuple(&[key, Some("1")])
            .bytes();
        let out = run(
            &mut c,
            &[
                begin(),
                pk_table(),
                insert(1, &[Some("1"), None]),
                update,
                insert(1, &[Some("2"), None]),
                commit(0x200, 0),
            ],
        );
        assert_eq!(out[0].changes, [unknown_rows("t")]);
    }
}

#[test]
fn non_ascii_keys_are_unknown_unless_the_server_speaks_utf8() {
    let msgs = [
        begin(),
        relation(1, "t", b'd', &[("name", true)]),
        insert(1, &[Some("zoë")]),
        commit(0x200, 0),
    ];
    assert_eq!(
        run(&mut Collector::new(9, true), &msgs)[0].changes,
        [keys("t", &["zoë"])]
    );
    assert_eq!(
        run(&mut Collector::new(9, false), &msgs)[0].changes,
        [unknown_rows("t")]
    );
}

#[test]
fn too_many_keys_in_one_transaction_degrade_to_unknown_rows() {
    let mut c = Collector::new(3, true);
    let mut msgs = vec![begin(), pk_table()];
    for i in 0..5 {
        msgs.push(insert(1, &[Some(&i.to_string()), None]));
    }
    msgs.push(commit(0x200, 0));
    assert_eq!(run(&mut c, &msgs)[0].changes, [unknown_rows("t")]);
    // The next transaction starts afresh.
    let out = run(
        &mut c,
        &[begin(), insert(1, &[Some("1"), None]), commit(0x300, 0)],
    );
    assert_eq!(out[0].changes, [keys("t", &["1"])]);
}

#[test]
fn truncate_of_several_tables_reports_each_table_whole() {
    let mut c = Collector::new(100, true);
    let out = run(
        &mut c,
        &[
            begin(),
            pk_table(),
            relation(2, "u", b'd', &[("id", true)]),
            insert(1, &[Some("1"), None]),
            Msg::new(b'T').u32(2).u8(1).u32(1).u32(2).bytes(),
            insert(1, &[Some("2"), None]),
            commit(0x200, 0),
        ],
    );
    assert_eq!(
        out[0].changes,
        [Change::Table(t("t")), Change::Table(t("u"))]
    );
}

#[test]
fn pg_catalog_relations_get_their_schema_name_back() {
    let mut c = Collector::new(100, true);
    let rel = Msg::new(b'R')
        .u32(8)
        .cstr("")
        .cstr("pg_thing")
        .u8(b'n')
        .u16(0)
        .bytes();
    let out = run(&mut c, &[begin(), rel, insert(8, &[]), commit(1, 0)]);
    assert_eq!(
        out[0].changes,
        [Change::Rows {
            table: TableRef {
                schema: "pg_catalog".into(),
                name: "pg_thing".into()
            },
            keys: None
        }]
    );
}

#[test]
fn an_empty_transaction_commits_no_changes() {
    let mut c = Collector::new(100, true);
    let out = run(&mut c, &[begin(), commit(0x200, 0)]);
    assert_eq!(out[0].changes, []);
}

fn message(transactional: bool, prefix: &str, content: &str) -> bytes::Bytes {
    let mut m = Msg::new(b'M')
        .u8(u8::from(transactional))
        .u64(0x150)
        .cstr(prefix)
        .u32(content.len() as u32);
    m.0.extend_from_slice(content.as_bytes());
    m.bytes()
}

fn hook(kind: &str, table: &str) -> String {
    format!(
        r#"{{"v" : 1, "kind" : "{kind}", "op" : "ALTER TABLE", "schema" : "public", "table" : "{table}", "ts" : 1.5, "xid" : "7"}}"#
    )
}

#[test]
fn ddl_messages_join_their_transaction_and_make_the_table_whole() {
    let mut c = Collector::new(100, true);
    let out = run(
        &mut c,
        &[
            begin(),
            pk_table(),
            insert(1, &[Some("1"), None]),
            message(true, MESSAGE_PREFIX, &hook("table", "t")),
            insert(1, &[Some("2"), None]),
            message(true, MESSAGE_PREFIX, &hook("table", "mv")),
            // Someone else's messages are none of our business.
            message(true, "other", "whatever"),
            commit(0x200, 0),
        ],
    );
    assert_eq!(
        out,
        [Committed {
            end_lsn: Some(Lsn(0x200)),
            committed_at: pg_time(0),
            changes: vec![Change::Table(t("t")), Change::Table(t("mv"))],
            uninstalled: false,
            echoes: vec![],
        }]
    );
}

#[test]
fn a_database_message_or_an_unreadable_one_means_everything() {
    for content in [
        r#"{"v":1,"kind":"database","op":"GRANT","schema":null,"table":null,"ts":1.0,"xid":"7"}"#,
        "not json",
        r#"{"v":9,"kind":"table"}"#,
    ] {
        let mut c = Collector::new(100, true);
        let out = run(
            &mut c,
            &[
                begin(),
                pk_table(),
                insert(1, &[Some("1"), None]),
                message(true, MESSAGE_PREFIX, content),
                commit(0x200, 0),
            ],
        );
        assert_eq!(out[0].changes, [Change::Database], "{content}");
    }
    let mut c = Collector::new(100, true);
    let mut bad_utf8 = message(true, MESSAGE_PREFIX, "x").to_vec();
    *bad_utf8.last_mut().expect("content") = 0xff;
    let out = run(&mut c, &[begin(), bad_utf8.into(), commit(0x200, 0)]);
    assert_eq!(out[0].changes, [Change::Database]);
}

#[test]
fn an_uninstalled_message_marks_its_transaction() {
    let mut c = Collector::new(100, true);
    let gone = r#"{"v":1,"kind":"uninstalled","op":"pgstash migrate down","schema":null,"table":null,"ts":1.0,"xid":"9"}"#;
    let out = run(
        &mut c,
        &[
            begin(),
            message(true, MESSAGE_PREFIX, gone),
            commit(0x200, 0),
        ],
    );
    assert_eq!(out[0].changes, [Change::Database]);
    assert!(out[0].uninstalled);
    // Not tied to a commit that removed anything: it only invalidates.
    let out = run(&mut c, &[message(false, MESSAGE_PREFIX, gone)]);
    assert_eq!(out[0].changes, [Change::Database]);
    assert!(!out[0].uninstalled);
}

#[test]
fn a_non_transactional_message_is_handed_out_at_once_with_nothing_to_confirm() {
    let mut c = Collector::new(100, true);
    let out = run(
        &mut c,
        &[message(false, MESSAGE_PREFIX, &hook("table", "t"))],
    );
    assert_eq!(
        out,
        [Committed {
            end_lsn: None,
            committed_at: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1500)),
            changes: vec![Change::Table(t("t"))],
            uninstalled: false,
            echoes: vec![],
        }]
    );
    assert!(c.is_idle());
    assert!(run(&mut c, &[message(false, "other", "x")]).is_empty());
    let dec = |b: bytes::Bytes| decode(&b).expect("decodes");
    assert_eq!(
        c.handle(dec(message(true, MESSAGE_PREFIX, &hook("table", "t")))),
        Err(StreamError::OutOfOrder(
            "transactional message outside a transaction"
        ))
    );
}

#[test]
fn messages_out_of_order_are_errors() {
    let mut c = Collector::new(100, true);
    let dec = |b: bytes::Bytes| decode(&b).expect("decodes");
    assert!(c.handle(dec(commit(1, 0))).is_err());
    assert!(c.handle(dec(pk_table())).is_ok());
    assert!(c.handle(dec(insert(1, &[Some("1"), None]))).is_err());
    assert!(c.handle(dec(begin())).is_ok());
    assert!(c.handle(dec(begin())).is_err());
    assert_eq!(
        c.handle(dec(insert(99, &[Some("1")]))),
        Err(StreamError::UnknownRelation(99))
    );
}

#[test]
fn echoes_are_told_with_the_commit_that_carries_them_after_the_commits_before() {
    let mut c = Collector::new(100, true);
    let out = run(
        &mut c,
        &[
            begin(),
            pk_table(),
            insert(1, &[Some("1"), None]),
            commit(0x100, 0),
            begin(),
            message(true, ECHO_PREFIX, "echo 1f 3"),
            commit(0x200, 0),
            // Not pgstash's way, but any role may send one outside a transaction.
            message(false, ECHO_PREFIX, "echo 2e 4"),
        ],
    );
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(out[0].changes, [keys("t", &["1"])]);
    assert!(out[0].echoes.is_empty());
    assert_eq!(out[1].end_lsn, Some(Lsn(0x200)));
    assert!(out[1].changes.is_empty());
    assert_eq!(out[1].echoes, ["echo 1f 3"]);
    assert_eq!(out[2].end_lsn, None);
    assert_eq!(out[2].echoes, ["echo 2e 4"]);
}
