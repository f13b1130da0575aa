//! The messages pgstash composes itself (everything else is relayed as received).

use bytes::{BufMut, Bytes, BytesMut};

/// Start a tagged message; `finish` patches in the length.
fn begin(tag: u8, cap: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(cap + 5);
    b.put_u8(tag);
    b.put_i32(0);
    b
}

fn finish(mut b: BytesMut) -> Bytes {
    let len = (b.len() - 1) as i32;
    b[1..5].copy_from_slice(&len.to_be_bytes());
    b.freeze()
}

fn put_cstr(b: &mut BytesMut, s: &[u8]) {
    b.put_slice(s);
    b.put_u8(0);
}

/// Severity of an error pgstash raises itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An ErrorResponse carrying the fields clients look at (severity, code, message).
pub fn error_response(severity: Severity, code: &str, message: &str) -> Bytes {
    let mut b = begin(b'E', message.len() + 32);
    for (field, value) in [
        (b'S', severity.as_str()),
        (b'V', severity.as_str()),
        (b'C', code),
        (b'M', message),
    ] {
        b.put_u8(field);
        put_cstr(&mut b, value.as_bytes());
    }
    b.put_u8(0);
    finish(b)
}

/// Re-severity an ErrorResponse body from Postgres (used when a FATAL during a pooled login
/// must reach the client). Fields other than severity are kept as they were.
pub fn error_fields(body: &[u8]) -> Vec<(u8, String)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < body.len() && body[pos] != 0 {
        let field = body[pos];
        let Some((value, next)) = super::cstr_at(body, pos + 1) else {
            break;
        };
        out.push((field, String::from_utf8_lossy(value).into_owned()));
        pos = next;
    }
    out
}

/// Build an ErrorResponse from fields.
pub fn error_from_fields(fields: &[(u8, String)]) -> Bytes {
    let mut b = begin(b'E', 128);
    for (f, v) in fields {
        b.put_u8(*f);
        put_cstr(&mut b, v.as_bytes());
    }
    b.put_u8(0);
    finish(b)
}

pub fn ready_for_query(status: u8) -> Bytes {
    // Every cache hit ends with one: the three statuses are constants, not allocations.
    match status {
        b'I' => Bytes::from_static(b"Z\0\0\0\x05I"),
        b'T' => Bytes::from_static(b"Z\0\0\0\x05T"),
        b'E' => Bytes::from_static(b"Z\0\0\0\x05E"),
        other => {
            let mut b = begin(b'Z', 1);
            b.put_u8(other);
            finish(b)
        }
    }
}

pub fn parameter_status(key: &str, value: &str) -> Bytes {
    let mut b = begin(b'S', key.len() + value.len() + 2);
    put_cstr(&mut b, key.as_bytes());
    put_cstr(&mut b, value.as_bytes());
    finish(b)
}

pub fn backend_key_data(pid: i32, secret: i32) -> Bytes {
    let mut b = begin(b'K', 8);
    b.put_i32(pid);
    b.put_i32(secret);
    finish(b)
}

/// Authentication request: 0 ok, 3 cleartext, 5 md5 (with salt), 10 SASL, 11 continue, 12 final.
pub fn authentication(code: i32, payload: &[u8]) -> Bytes {
    let mut b = begin(b'R', 4 + payload.len());
    b.put_i32(code);
    b.put_slice(payload);
    finish(b)
}

pub fn auth_sasl_mechanisms() -> Bytes {
    authentication(10, b"SCRAM-SHA-256\0\0")
}

pub fn negotiate_protocol_version(minor: u16, unsupported: &[String]) -> Bytes {
    let mut b = begin(b'v', 64);
    b.put_i32(minor as i32 | (3 << 16));
    b.put_i32(unsupported.len() as i32);
    for o in unsupported {
        put_cstr(&mut b, o.as_bytes());
    }
    finish(b)
}

pub fn parse_complete() -> Bytes {
    Bytes::from_static(b"1\0\0\0\x04")
}

pub fn close_complete() -> Bytes {
    Bytes::from_static(b"3\0\0\0\x04")
}

/// A CommandComplete with this command tag (`SELECT 0`).
pub fn command_complete(tag: &str) -> Bytes {
    let mut b = begin(b'C', tag.len() + 1);
    put_cstr(&mut b, tag.as_bytes());
    finish(b)
}

/// A simple Query message.
pub fn query(sql: &str) -> Bytes {
    let mut b = begin(b'Q', sql.len() + 1);
    put_cstr(&mut b, sql.as_bytes());
    finish(b)
}

pub fn terminate() -> Bytes {
    Bytes::from_static(b"X\0\0\0\x04")
}

pub fn flush() -> Bytes {
    Bytes::from_static(b"H\0\0\0\x04")
}

/// A Parse message for `name` with the given query text and parameter type OIDs.
pub fn parse(name: &str, sql: &[u8], param_types: &[u8]) -> Bytes {
    let mut b = begin(b'P', name.len() + sql.len() + param_types.len() + 4);
    put_cstr(&mut b, name.as_bytes());
    put_cstr(&mut b, sql);
    b.put_slice(param_types);
    finish(b)
}

/// Replace the statement name of a Bind (portal, stmt, rest...) or Describe/Close('S', name).
pub fn with_statement_name(tag: u8, prefix: &[u8], name: &str, rest: &[u8]) -> Bytes {
    let mut b = begin(tag, prefix.len() + name.len() + rest.len() + 1);
    b.put_slice(prefix);
    put_cstr(&mut b, name.as_bytes());
    b.put_slice(rest);
    finish(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_for_query_constants_are_the_built_messages() {
        for status in [b'I', b'T', b'E', b'X'] {
            let mut b = begin(b'Z', 1);
            b.put_u8(status);
            assert_eq!(ready_for_query(status), finish(b), "{}", status as char);
        }
        assert_eq!(&ready_for_query(b'T')[..], b"Z\0\0\0\x05T");
    }

    #[test]
    fn error_response_fields_roundtrip() {
        let e = error_response(Severity::Fatal, "53300", "too many");
        assert_eq!(e[0], b'E');
        assert_eq!(
            i32::from_be_bytes([e[1], e[2], e[3], e[4]]) as usize,
            e.len() - 1
        );
        let fields = error_fields(&e[5..]);
        assert!(fields.contains(&(b'C', "53300".into())));
        assert!(fields.contains(&(b'S', "FATAL".into())));
        assert_eq!(error_from_fields(&fields), e);
    }
}
