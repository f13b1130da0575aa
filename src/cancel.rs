//! CancelRequest routing. Clients get a BackendKeyData invented by pgstash; a cancel carrying
//! it is forwarded to whichever server connection that client holds *at that moment*.
//!
//! While a cancel goes out, the relay cannot hand its server connection back (it waits in
//! [`CancelSlot::set`]): so a cancel can never reach a connection that has meanwhile moved
//! to another client. The relay sets its slot twice per transaction in transaction mode and
//! a cancel is rare, so setting takes a plain lock and waits only when a cancel is in
//! flight (an async mutex cost a semaphore acquire and release each time).

use crate::upstream::BackendKey;
use bytes::{BufMut, BytesMut};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

type Target = Option<(Arc<str>, BackendKey)>;

#[derive(Default)]
pub struct CancelSlot {
    state: Mutex<SlotState>,
    /// Woken when a cancel has gone out.
    cancel_done: Notify,
    /// Cancels of one client go out one at a time.
    one_cancel: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct SlotState {
    target: Target,
    /// A cancel to `target` is in flight: `target` must stay until it has gone out.
    cancelling: bool,
}

impl CancelSlot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The client now holds the server connection at `addr` with `key` (or none). Waits
    /// while a cancel to the connection it held is in flight.
    pub async fn set(&self, target: Target) {
        loop {
            {
                let mut s = self.lock();
                if !s.cancelling {
                    s.target = target;
                    return;
                }
            }
            // Created before the second look, so the wake-up of a cancel that ends in
            // between is not lost.
            let done = self.cancel_done.notified();
            if !self.lock().cancelling {
                continue;
            }
            done.await;
        }
    }

    /// Forward a CancelRequest to the connection the client holds now, if any.
    async fn cancel(&self) {
        let _one = self.one_cancel.lock().await;
        let target = {
            let mut s = self.lock();
            s.cancelling = s.target.is_some();
            s.target.clone()
        };
        let Some((addr, key)) = target else {
            return;
        };
        // Ends the cancel on every path out of here, a dropped future included.
        let _done = CancelDone(self);
        if let Err(e) = send_cancel(&addr, key).await {
            tracing::warn!(error = %e, "could not forward a cancel request to {addr}");
        }
    }
}

struct CancelDone<'a>(&'a CancelSlot);

impl Drop for CancelDone<'_> {
    fn drop(&mut self) {
        self.0.lock().cancelling = false;
        self.0.cancel_done.notify_waiters();
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
        slot.cancel().await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_connection_is_not_handed_back_while_a_cancel_to_it_is_in_flight() {
        // Stands in for Postgres' port: it takes the CancelRequest and closes the socket
        // when the test says the backend has been signalled.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr: Arc<str> = listener.local_addr().expect("addr").to_string().into();
        let slot = Arc::new(CancelSlot::default());
        slot.set(Some((addr, BackendKey { pid: 7, secret: 8 })))
            .await;
        let cancel = tokio::spawn({
            let slot = Arc::clone(&slot);
            async move { slot.cancel().await }
        });
        let (mut postgres, _) = listener.accept().await.expect("the cancel connects");
        let mut request = [0u8; 16];
        postgres.read_exact(&mut request).await.expect("request");
        assert_eq!(
            request[8..],
            [0, 0, 0, 7, 0, 0, 0, 8],
            "the held connection's key"
        );
        let handed_back = tokio::spawn({
            let slot = Arc::clone(&slot);
            async move { slot.set(None).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !handed_back.is_finished(),
            "the connection was handed back while the cancel to it was in flight"
        );
        drop(postgres);
        tokio::time::timeout(Duration::from_secs(5), handed_back)
            .await
            .expect("handed back once the cancel went out")
            .expect("join");
        cancel.await.expect("join");
        assert!(slot.lock().target.is_none());
        assert!(!slot.lock().cancelling);
    }

    #[tokio::test]
    async fn a_client_without_a_server_connection_cancels_nothing_and_blocks_nothing() {
        let slot = CancelSlot::default();
        slot.cancel().await;
        assert!(!slot.lock().cancelling);
        tokio::time::timeout(Duration::from_secs(5), slot.set(None))
            .await
            .expect("set does not wait");
    }
}
