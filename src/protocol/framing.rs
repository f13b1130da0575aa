//! Splitting a byte stream into typed-by-tag messages, with a bound on message size.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// One protocol message after the startup phase: `raw` holds tag, length and body exactly as
/// they came off the wire, so relaying it is a memcpy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    raw: Bytes,
}

impl Message {
    /// Wrap bytes that already form one whole message (tag + length + body).
    pub fn from_raw(raw: Bytes) -> Self {
        debug_assert!(raw.len() >= 5);
        Message { raw }
    }

    pub fn tag(&self) -> u8 {
        self.raw[0]
    }

    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }

    pub fn raw(&self) -> &Bytes {
        &self.raw
    }

    pub fn into_raw(self) -> Bytes {
        self.raw
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid message length {len} for message type {tag:?}")]
    BadLength { tag: char, len: i64 },
    #[error("message of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("connection closed in the middle of a message")]
    TruncatedMessage,
    #[error("invalid frontend message type {0}")]
    UnexpectedMessage(u8),
    #[error("invalid startup packet: {0}")]
    BadStartup(String),
}

impl ProtocolError {
    /// The peer closed or reset the connection: not worth a log line above debug.
    pub fn is_disconnect(&self) -> bool {
        match self {
            ProtocolError::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionAborted
            ),
            ProtocolError::TruncatedMessage => true,
            _ => false,
        }
    }
}

/// Buffers one direction of a connection and yields whole messages.
///
/// `read_message` is cancel-safe: bytes read but not yet forming a message stay in the buffer,
/// which is what lets the relay `select!` over both directions.
pub struct MessageReader<R> {
    inner: R,
    buf: BytesMut,
    max_message_size: usize,
}

const READ_CHUNK: usize = 16 * 1024;

impl<R: AsyncRead + Unpin> MessageReader<R> {
    pub fn new(inner: R, max_message_size: usize) -> Self {
        Self::with_buffer(inner, BytesMut::with_capacity(READ_CHUNK), max_message_size)
    }

    /// Start from bytes a previous reader already pulled off the socket.
    pub fn with_buffer(inner: R, buf: BytesMut, max_message_size: usize) -> Self {
        MessageReader {
            inner,
            buf,
            max_message_size,
        }
    }

    /// A message already complete in the buffer, without touching the socket.
    pub fn next_buffered(&mut self) -> Result<Option<Message>, ProtocolError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let tag = self.buf[0];
        let len = i32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        if len < 4 {
            return Err(ProtocolError::BadLength {
                tag: tag as char,
                len: len.into(),
            });
        }
        let total = len as usize + 1;
        if total > self.max_message_size {
            return Err(ProtocolError::TooLarge {
                len: total,
                max: self.max_message_size,
            });
        }
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        Ok(Some(Message::from_raw(self.buf.split_to(total).freeze())))
    }

    /// Next whole message, or `None` when the peer closed cleanly between messages.
    pub async fn read_message(&mut self) -> Result<Option<Message>, ProtocolError> {
        loop {
            if let Some(msg) = self.next_buffered()? {
                return Ok(Some(msg));
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(READ_CHUNK);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(ProtocolError::TruncatedMessage)
                };
            }
        }
    }

    /// Bytes received but not yet handed out as a message.
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    pub fn into_parts(self) -> (R, BytesMut) {
        (self.inner, self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn splits_pipelined_messages_and_keeps_raw_bytes() {
        let mut wire = Vec::new();
        wire.extend_from_slice(b"Q\0\0\0\x0dSELECT 1\0");
        wire.extend_from_slice(b"S\0\0\0\x04");
        let mut r = MessageReader::new(&wire[..], 1 << 20);
        let q = r.read_message().await.unwrap().unwrap();
        assert_eq!(q.tag(), b'Q');
        assert_eq!(q.body(), b"SELECT 1\0");
        assert_eq!(q.raw().len(), 14);
        let s = r.read_message().await.unwrap().unwrap();
        assert_eq!(s.tag(), b'S');
        assert!(r.read_message().await.unwrap().is_none());
    }

    #[tokio::test]
    async fn lying_length_below_four_is_an_error() {
        let wire = b"Q\0\0\0\x02".to_vec();
        let mut r = MessageReader::new(&wire[..], 1 << 20);
        assert!(matches!(
            r.read_message().await,
            Err(ProtocolError::BadLength { .. })
        ));
    }

    #[tokio::test]
    async fn message_above_maximum_is_refused_before_buffering() {
        let wire = b"Q\x7f\0\0\0".to_vec();
        let mut r = MessageReader::new(&wire[..], 1 << 20);
        assert!(matches!(
            r.read_message().await,
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[tokio::test]
    async fn eof_inside_a_message_is_truncation() {
        let wire = b"Q\0\0\0\x0dSEL".to_vec();
        let mut r = MessageReader::new(&wire[..], 1 << 20);
        assert!(matches!(
            r.read_message().await,
            Err(ProtocolError::TruncatedMessage)
        ));
    }
}
