//! The event bus: how any part of the daemon (the quit path, bitmap code,
//! block jobs) sends a QMP event to every negotiated client.
//!
//! An event is serialised once, with QEMU's wall-clock timestamp, and
//! handed to each subscriber's bounded queue with a non-blocking send, so
//! that an emitter (a job thread, a queue thread) never waits for a slow
//! client. A subscriber whose queue is full has stopped reading; it is
//! dropped from the bus and its overflow hook runs (the server closes that
//! connection), since silently losing e.g. BLOCK_JOB_COMPLETED would be
//! worse for a client than a disconnect it can notice and recover from.

use super::json::to_wire;
use serde_json::{Map, Value};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

/// One emitted event.
#[derive(Debug, Clone)]
pub struct Event {
    /// Event name, e.g. `SHUTDOWN`.
    pub name: String,
    /// The `data` member (absent for events without data, as in QEMU).
    pub data: Option<Value>,
    /// Wall-clock seconds since the epoch.
    pub seconds: u64,
    /// Microseconds within the second.
    pub microseconds: u32,
    /// The message as written to clients, `\r\n` included.
    pub wire: String,
}

impl Event {
    /// Builds an event stamped with the current wall-clock time.
    pub fn now(name: &str, data: Option<Value>) -> Event {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let (seconds, microseconds) = (since.as_secs(), since.subsec_micros());
        let mut msg = Map::new();
        msg.insert("timestamp".into(), serde_json::json!({"seconds": seconds, "microseconds": microseconds}));
        msg.insert("event".into(), Value::String(name.to_string()));
        if let Some(d) = &data {
            msg.insert("data".into(), d.clone());
        }
        Event {
            name: name.to_string(),
            data,
            seconds,
            microseconds,
            wire: to_wire(&Value::Object(msg)),
        }
    }
}

/// Identifies a subscription for [`EventBus::unsubscribe`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionId(u64);

type OverflowHook = Box<dyn Fn() + Send>;

struct Subscriber {
    id: u64,
    tx: SyncSender<Arc<Event>>,
    on_overflow: Option<OverflowHook>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    subs: Vec<Subscriber>,
}

/// Broadcasts events to subscribers; cheap to clone (all clones share the
/// same subscribers).
#[derive(Clone, Default)]
pub struct EventBus {
    inner: Arc<Mutex<Inner>>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus")
            .field("subscribers", &self.lock().subs.len())
            .finish()
    }
}

impl EventBus {
    /// A bus with no subscribers.
    pub fn new() -> EventBus {
        EventBus::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the list half-edited
        // in a way that matters; keep serving events.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Emits event `name` with optional `data` to every subscriber, e.g.
    /// `bus.emit("SHUTDOWN", json!({"guest": false, "reason": "host-signal"}))`
    /// or `bus.emit("STOP", None)`. Never blocks.
    pub fn emit(&self, name: &str, data: impl Into<Option<Value>>) {
        let event = Arc::new(Event::now(name, data.into()));
        log::debug!("QMP event {}", event.wire.trim_end());
        let mut inner = self.lock();
        let mut overflowed = Vec::new();
        inner.subs.retain_mut(|s| match s.tx.try_send(event.clone()) {
            Ok(()) => true,
            Err(TrySendError::Disconnected(_)) => false,
            Err(TrySendError::Full(_)) => {
                overflowed.push(s.on_overflow.take());
                false
            }
        });
        drop(inner);
        for hook in overflowed.into_iter().flatten() {
            log::warn!("QMP client stopped reading its events; disconnecting it");
            hook();
        }
    }

    /// Subscribes a queue; `on_overflow` runs (once) if the queue is full
    /// when an event arrives, after which the subscription is gone.
    pub fn subscribe(
        &self,
        tx: SyncSender<Arc<Event>>,
        on_overflow: Option<Box<dyn Fn() + Send>>,
    ) -> SubscriptionId {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.subs.push(Subscriber {
            id,
            tx,
            on_overflow,
        });
        SubscriptionId(id)
    }

    /// Subscribes a fresh channel of `capacity` events (for in-process
    /// listeners and tests); an overflowing channel is unsubscribed.
    pub fn subscribe_channel(&self, capacity: usize) -> (SubscriptionId, Receiver<Arc<Event>>) {
        let (tx, rx) = sync_channel(capacity);
        (self.subscribe(tx, None), rx)
    }

    /// Removes a subscription (no-op if already gone).
    pub fn unsubscribe(&self, id: SubscriptionId) {
        self.lock().subs.retain(|s| s.id != id.0);
    }

    /// Number of current subscribers.
    pub fn subscribers(&self) -> usize {
        self.lock().subs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn broadcast_format_and_overflow() {
        let bus = EventBus::new();
        let (_a, rx_a) = bus.subscribe_channel(8);
        let (tx_b, rx_b) = sync_channel(1);
        let overflowed = Arc::new(AtomicBool::new(false));
        let flag = overflowed.clone();
        bus.subscribe(tx_b, Some(Box::new(move || flag.store(true, Ordering::SeqCst))));
        bus.emit("SHUTDOWN", json!({"guest": false, "reason": "host-qmp-quit"}));
        bus.emit("STOP", None);
        let e = rx_a.recv().unwrap();
        let v: Value = serde_json::from_str(&e.wire).unwrap();
        assert_eq!(v["event"], "SHUTDOWN");
        assert_eq!(v["data"]["reason"], "host-qmp-quit");
        assert!(v["timestamp"]["seconds"].as_u64().unwrap() > 1_600_000_000);
        assert!(v["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
        let stop: Value = serde_json::from_str(&rx_a.recv().unwrap().wire).unwrap();
        assert!(stop.get("data").is_none());
        assert_eq!(rx_b.recv().unwrap().name, "SHUTDOWN");
        assert!(overflowed.load(Ordering::SeqCst), "second event overflows b");
        assert_eq!(bus.subscribers(), 1);
    }
}
