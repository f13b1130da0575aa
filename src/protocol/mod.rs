//! Wire-protocol framing: bytes in, whole messages out, and builders for the few messages
//! pgstash writes itself.
//!
//! The data path relays what Postgres sends byte for byte, so a [`Message`] keeps its raw bytes
//! (tag, length and body) and exposes the body only for the parts the proxy must read. Nothing
//! here knows about sessions, pools or caching.

mod builders;
mod framing;
mod startup;

pub use builders::*;
pub use framing::{Message, MessageReader, ProtocolError};
pub use startup::{Startup, StartupParams, read_startup};

/// Read a NUL-terminated string starting at `pos`, returning it and the position after the NUL.
pub fn cstr_at(buf: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(pos..)?;
    // memchr's vectorised search: every simple Query's text is scanned for its NUL here.
    let end = memchr::memchr(0, rest)?;
    Some((&rest[..end], pos + end + 1))
}
