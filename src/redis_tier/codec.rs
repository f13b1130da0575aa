//! What pgstash stores in and sends through Redis, as bytes: the names of generation keys,
//! L2 values (generations seen + response), and invalidation messages on the channel.
//! Pure functions, so the formats are tested without a Redis.

use crate::cache::{Dependency, Invalidation, TableId};
use bytes::Bytes;

/// Generation keys are hex: short, printable (`redis-cli` friendly), and fixed-width.
pub fn all_key(prefix: &str) -> String {
    format!("{prefix}g:all")
}

pub fn clock_key(prefix: &str) -> String {
    format!("{prefix}clock")
}

pub fn any_key(prefix: &str, t: TableId) -> String {
    format!("{prefix}g:{:016x}:any", t.0)
}

pub fn wide_key(prefix: &str, t: TableId) -> String {
    format!("{prefix}g:{:016x}:wide", t.0)
}

pub fn row_key(prefix: &str, t: TableId, k: u64) -> String {
    format!("{prefix}g:{:016x}:k:{k:016x}", t.0)
}

pub fn value_key(prefix: &str, key: u128) -> String {
    format!("{prefix}v:{key:032x}")
}

pub fn channel(prefix: &str) -> String {
    format!("{prefix}invalidate")
}

/// Where the instance reading a change source passes on the echoes other instances sent
/// through it (see `invalidation::catch_up`): `<echo>\n<database>`.
pub fn echo_channel(prefix: &str) -> String {
    format!("{prefix}echo")
}

/// Where instances confirm they applied an invalidation (see `RedisTier::publish`).
pub fn ack_channel(prefix: &str) -> String {
    format!("{prefix}applied")
}

/// Who sent a message, and its number among that sender's messages.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct MessageId {
    pub sender: u64,
    pub seq: u64,
}

pub fn encode_ack(id: MessageId) -> String {
    format!("{:016x}/{:x}", id.sender, id.seq)
}

pub fn decode_ack(m: &str) -> Option<MessageId> {
    let (sender, seq) = m.split_once('/')?;
    Some(MessageId {
        sender: u64::from_str_radix(sender, 16).ok()?,
        seq: u64::from_str_radix(seq, 16).ok()?,
    })
}

/// The generation keys a read depends on in Redis, in a fixed order (the order the stored
/// generations are compared in). Every value also depends on the global `g:all`.
pub fn dependency_keys(prefix: &str, deps: &[Dependency]) -> Vec<String> {
    let mut keys = vec![all_key(prefix)];
    for d in deps {
        match *d {
            Dependency::AnyOf(t) => keys.push(any_key(prefix, t)),
            Dependency::Key(t, k) => {
                keys.push(wide_key(prefix, t));
                keys.push(row_key(prefix, t, k));
            }
        }
    }
    keys
}

/// The generation keys a committed invalidation sets, split into table-level keys (kept
/// forever) and row keys (given a lifetime, or they would pile up one per row ever written).
pub fn bumped_keys(prefix: &str, inv: &Invalidation) -> (Vec<String>, Vec<String>) {
    match inv {
        Invalidation::Keys(t, ks) => (
            vec![any_key(prefix, *t)],
            ks.iter().map(|k| row_key(prefix, *t, *k)).collect(),
        ),
        Invalidation::Wide(t) => (vec![any_key(prefix, *t), wide_key(prefix, *t)], vec![]),
        Invalidation::All => (vec![all_key(prefix)], vec![]),
    }
}

/// An L2 value: the generations its reader saw (one per dependency key, 0 for a key that did
/// not exist), the row count, then the raw response messages.
pub fn encode_value(gens: &[u64], rows: u64, response: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + 8 * gens.len() + 8 + response.len());
    v.extend_from_slice(&(gens.len() as u32).to_le_bytes());
    for g in gens {
        v.extend_from_slice(&g.to_le_bytes());
    }
    v.extend_from_slice(&rows.to_le_bytes());
    v.extend_from_slice(response);
    v
}

pub struct StoredValue {
    pub gens: Vec<u64>,
    pub rows: u64,
    pub response: Bytes,
}

/// `None` for anything malformed (another version's format, a foreign key): a miss.
pub fn decode_value(v: &[u8]) -> Option<StoredValue> {
    let n = u32::from_le_bytes(v.get(..4)?.try_into().ok()?) as usize;
    let gens_end = 4usize.checked_add(n.checked_mul(8)?)?;
    let gens = v
        .get(4..gens_end)?
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect();
    let rows = u64::from_le_bytes(v.get(gens_end..gens_end + 8)?.try_into().ok()?);
    let response = Bytes::copy_from_slice(v.get(gens_end + 8..)?);
    if response.is_empty() {
        return None;
    }
    Some(StoredValue {
        gens,
        rows,
        response,
    })
}

/// A channel message: `<sender hex>/<seq hex> <item>;<item>...`, items `K <t> <k> <k>...`,
/// `W <t>` or `A`.
pub fn encode_message(id: MessageId, invs: &[Invalidation]) -> String {
    let mut m = format!("{} ", encode_ack(id));
    for (i, inv) in invs.iter().enumerate() {
        if i > 0 {
            m.push(';');
        }
        match inv {
            Invalidation::Keys(t, ks) => {
                m.push_str(&format!("K {:016x}", t.0));
                for k in ks {
                    m.push_str(&format!(" {k:016x}"));
                }
            }
            Invalidation::Wide(t) => m.push_str(&format!("W {:016x}", t.0)),
            Invalidation::All => m.push('A'),
        }
    }
    m
}

/// The sender and what to invalidate. A message that does not parse invalidates everything:
/// when in doubt, wider.
pub fn decode_message(m: &str) -> (Option<MessageId>, Vec<Invalidation>) {
    let Some((sender, items)) = m.split_once(' ') else {
        return (None, vec![Invalidation::All]);
    };
    let sender = decode_ack(sender);
    let hex = |s: &str| u64::from_str_radix(s, 16).ok();
    let parsed: Option<Vec<Invalidation>> = items
        .split(';')
        .map(|item| {
            let mut words = item.split(' ');
            match words.next()? {
                "K" => {
                    let t = TableId(hex(words.next()?)?);
                    let keys: Option<Vec<u64>> = words.map(hex).collect();
                    Some(Invalidation::Keys(t, keys?))
                }
                "W" => Some(Invalidation::Wide(TableId(hex(words.next()?)?))),
                "A" => Some(Invalidation::All),
                _ => None,
            }
        })
        .collect();
    (sender, parsed.unwrap_or_else(|| vec![Invalidation::All]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let invs = vec![
            Invalidation::Keys(TableId(7), vec![1, u64::MAX]),
            Invalidation::Wide(TableId(0xabc)),
            Invalidation::All,
        ];
        let id = MessageId { sender: 42, seq: 7 };
        let m = encode_message(id, &invs);
        assert_eq!(decode_message(&m), (Some(id), invs));
        assert_eq!(decode_ack(&encode_ack(id)), Some(id));
    }

    #[test]
    fn a_garbled_message_invalidates_everything() {
        assert_eq!(decode_message("nonsense").1, vec![Invalidation::All]);
        assert_eq!(
            decode_message("000000000000002a/1 K zz").1,
            vec![Invalidation::All]
        );
        assert_eq!(
            decode_message("000000000000002a/1 X").1,
            vec![Invalidation::All]
        );
    }

    #[test]
    fn values_round_trip_and_reject_truncation() {
        let v = encode_value(&[3, 0, 9], 2, b"response");
        let d = decode_value(&v).expect("decodes");
        assert_eq!(
            (d.gens, d.rows, &d.response[..]),
            (vec![3, 0, 9], 2, &b"response"[..])
        );
        for cut in 0..v.len() - b"response".len() {
            assert!(decode_value(&v[..cut]).is_none(), "cut at {cut}");
        }
        assert!(decode_value(&[0xff, 0xff, 0xff, 0xff]).is_none());
    }

    #[test]
    fn point_reads_depend_on_wide_and_row_keys_and_everything_on_all() {
        let keys = dependency_keys("p:", &[Dependency::Key(TableId(1), 2)]);
        assert_eq!(
            keys,
            vec![
                "p:g:all".to_string(),
                "p:g:0000000000000001:wide".into(),
                "p:g:0000000000000001:k:0000000000000002".into()
            ]
        );
        // A keyed write bumps what a point read of that key watches, and `any` for the rest.
        let (table, rows) = bumped_keys("p:", &Invalidation::Keys(TableId(1), vec![2]));
        assert_eq!(table, vec!["p:g:0000000000000001:any".to_string()]);
        assert_eq!(rows, vec![keys[2].clone()]);
        // A wide write bumps what both kinds of reads watch.
        let (table, _) = bumped_keys("p:", &Invalidation::Wide(TableId(1)));
        assert!(table.contains(&keys[1]));
        assert!(table.contains(&any_key("p:", TableId(1))));
    }
}
