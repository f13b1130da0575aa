//! CancelRequest routing. Clients get a BackendKeyData invented by pgstash; a cancel carrying
//! it is forwarded to whichever server connection that client holds *at that moment*.
//!
//! The slot's lock is held while the cancel goes out, and the relay takes the same lock to
//! hand a server connection back: so a cancel can never reach a connection that has meanwhile
//! moved to another client.

use crate::upstream::BackendKey;
use bytes::{BufMut, BytesMut};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Default)]
pub struct CancelSlot {
    current: tokio::sync::Mutex<Option<(Arc<str>, BackendKey)>>,
}

impl CancelSlot {
    /// The client now holds the server connection at `addr` with `key` (or none).
    pub async fn set(&self, target: Option<(Arc<str>, BackendKey)>) {
        *self.current.lock().await = target;
    }
}

#[derive(Default)]
pub struct CancelRegistry {
    slots: Mutex<HashMap<(i32, i32), Arc<CancelSlot>>>,
    next_pid: Mutex<i32>,
}

/// Removes the client's entry when its session ends.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    pub pid: i32,
    pub secret: i32,
    pub slot: Arc<CancelSlot>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut slots = self
            .registry
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        slots.remove(&(self.pid, self.secret));
    }
}

impl CancelRegistry {
    pub fn register(self: &Arc<Self>) -> Registration {
        let pid = {
            let mut n = self.next_pid.lock().unwrap_or_else(|p| p.into_inner());
            // Stay positive and away from real backend pids in small numbers; wrap safely.
            *n = if *n >= i32::MAX - 1 { 1 } else { *n + 1 };
            *n
        };
        let secret: i32 = rand::random();
        let slot = Arc::new(CancelSlot::default());
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((pid, secret), slot.clone());
        Registration {
            registry: self.clone(),
            pid,
            secret,
            slot,
        }
    }

    /// Forward a client's CancelRequest. Unknown keys are ignored, as Postgres does.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        let slot = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.get(&(pid, secret)).cloned()
        };
        let Some(slot) = slot else {
            tracing::debug!(pid, "cancel request with an unknown key ignored");
            return;
        };
        let guard = slot.current.lock().await;
        if let Some((addr, key)) = guard.as_ref()
            && let Err(e) = send_cancel(addr, *key).await
        {
            tracing::warn!(error = %e, "could not forward a cancel request to {addr}");
        }
    }
}

async fn send_cancel(addr: &str, key: BackendKey) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let mut b = BytesMut::with_capacity(16);
    b.put_i32(16);
    b.put_i32(80877102);
    b.put_i32(key.pid);
    b.put_i32(key.secret);
    s.write_all(&b).await?;
    // Postgres closes the socket once it has signalled the backend; waiting for that keeps
    // the connection from being handed to another client before the signal lands.
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut sink)).await;
    Ok(())
}
