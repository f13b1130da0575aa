//! The migrations compiled into pgstash: `migrations/NNNN_name.{up,down}.sql`, registered by
//! hand below (a test checks the list against the directory, so none is forgotten).

use sha2::{Digest, Sha256};

/// One versioned change to a database, with the SQL that reverts it.
#[derive(Debug, PartialEq, Eq)]
pub struct Migration {
    pub version: i32,
    pub name: &'static str,
    pub up: &'static str,
    pub down: &'static str,
}

impl Migration {
    /// Hex SHA-256 of the up SQL: what the database records when it applies the migration,
    /// so that an applied migration edited afterwards is noticed.
    pub fn checksum(&self) -> String {
        Sha256::digest(self.up.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// `0002_notify_triggers`, as the files are named.
    pub fn file_stem(&self) -> String {
        format!("{:04}_{}", self.version, self.name)
    }
}

/// Every migration, in the order they apply (versions strictly increasing).
pub static MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "schema",
        up: include_str!("../../migrations/0001_schema.up.sql"),
        down: include_str!("../../migrations/0001_schema.down.sql"),
    },
    Migration {
        version: 2,
        name: "notify_triggers",
        up: include_str!("../../migrations/0002_notify_triggers.up.sql"),
        down: include_str!("../../migrations/0002_notify_triggers.down.sql"),
    },
    Migration {
        version: 3,
        name: "wal_source",
        up: include_str!("../../migrations/0003_wal_source.up.sql"),
        down: include_str!("../../migrations/0003_wal_source.down.sql"),
    },
    Migration {
        version: 4,
        name: "lean_row_trigger",
        up: include_str!("../../migrations/0004_lean_row_trigger.up.sql"),
        down: include_str!("../../migrations/0004_lean_row_trigger.down.sql"),
    },
    Migration {
        version: 5,
        name: "concat_notify_payload",
        up: include_str!("../../migrations/0005_concat_notify_payload.up.sql"),
        down: include_str!("../../migrations/0005_concat_notify_payload.down.sql"),
    },
    Migration {
        version: 6,
        name: "compact_notify_payload",
        up: include_str!("../../migrations/0006_compact_notify_payload.up.sql"),
        down: include_str!("../../migrations/0006_compact_notify_payload.down.sql"),
    },
];

/// The embedded migration with this version.
pub fn find(version: i32) -> Option<&'static Migration> {
    MIGRATIONS.iter().find(|m| m.version == version)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::Path;

    #[test]
    fn the_list_registers_every_migration_file_and_nothing_else() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
        // File stem → (up, down) contents as found on disk.
        let mut on_disk: BTreeMap<String, (Option<String>, Option<String>)> = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).expect("reading migrations/") {
            let path = entry.expect("a directory entry").path();
            let file = path
                .file_name()
                .and_then(|f| f.to_str())
                .expect("a UTF-8 file name")
                .to_owned();
            let text = std::fs::read_to_string(&path).expect("reading a migration file");
            if let Some(stem) = file.strip_suffix(".up.sql") {
                on_disk.entry(stem.to_owned()).or_default().0 = Some(text);
            } else if let Some(stem) = file.strip_suffix(".down.sql") {
                on_disk.entry(stem.to_owned()).or_default().1 = Some(text);
            } else {
                panic!("migrations/{file} is neither NNNN_name.up.sql nor NNNN_name.down.sql");
            }
        }
        let registered: BTreeMap<String, (Option<String>, Option<String>)> = MIGRATIONS
            .iter()
            .map(|m| {
                (
                    m.file_stem(),
                    (Some(m.up.to_owned()), Some(m.down.to_owned())),
                )
            })
            .collect();
        let disk_stems: Vec<&String> = on_disk.keys().collect();
        let listed_stems: Vec<&String> = registered.keys().collect();
        assert_eq!(
            disk_stems, listed_stems,
            "migrations/ and MIGRATIONS in src/migrate/embedded.rs disagree: register new files there"
        );
        for (stem, (up, down)) in &on_disk {
            assert!(up.is_some(), "migrations/{stem}.up.sql is missing");
            assert!(down.is_some(), "migrations/{stem}.down.sql is missing");
            assert_eq!(
                (up, down),
                (&registered[stem].0, &registered[stem].1),
                "{stem}: MIGRATIONS embeds another file's SQL"
            );
        }
    }

    #[test]
    fn versions_strictly_increase_and_names_are_file_name_safe() {
        for pair in MIGRATIONS.windows(2) {
            assert!(
                pair[0].version < pair[1].version,
                "{} must come after {}",
                pair[1].file_stem(),
                pair[0].file_stem()
            );
        }
        for m in MIGRATIONS {
            assert!(m.version > 0 && m.version <= 9999, "{}", m.file_stem());
            assert!(
                !m.name.is_empty()
                    && m.name
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}: names are lower_snake_case",
                m.file_stem()
            );
        }
    }

    #[test]
    fn checksum_is_the_hex_sha256_of_the_up_sql() {
        let m = Migration {
            version: 9,
            name: "x",
            up: "abc",
            down: "",
        };
        assert_eq!(
            m.checksum(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
