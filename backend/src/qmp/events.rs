//! The event bus: how any part of the daemon (the quit path, bitmap code,
//! block jobs) sends a QMP event to every negotiated client.
//!
//! An event is serialised once, with QEMU's wall-clock timestamp, and
//! handed to each subscriber's sink, which queues it without blocking, so
//! that an emitter (a job thread, a queue thread) never waits for a slow
//! client. The QMP server's sink closes a connection whose queue is full:
//! that client has stopped reading, and silently losing e.g.
//! BLOCK_JOB_COMPLETED would be worse for it than a disconnect it can
//! notice and recover from (by reconnecting and querying state).

use super::json::to_wire;
use serde_json::{Map, Value};
use std::sync::mpsc::{sync_channel, Receiver, TrySendError};
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
        msg.insert(
            "timestamp".into(),
            serde_json::json!({"seconds": seconds, "microseconds": microseconds}),
        );
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

/// What a subscriber's sink reports for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued; keep the subscription.
    Queued,
    /// The subscriber is gone (or gave up); drop the subscription.
    Gone,
}

/// A subscriber: queues the event without blocking and says whether to
/// keep it subscribed.
pub type Sink = Box<dyn FnMut(&Arc<Event>) -> Delivery + Send>;

struct Subscriber {
    id: u64,
    sink: Sink,
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
    /// or `bus.emit("STOP", None)`. Never blocks on a client.
    pub fn emit(&self, name: &str, data: impl Into<Option<Value>>) {
        let event = Arc::new(Event::now(name, data.into()));
        log::debug!("QMP event {}", event.wire.trim_end());
        self.lock()
            .subs
            .retain_mut(|s| (s.sink)(&event) == Delivery::Queued);
    }

    /// Subscribes a sink. The sink runs under the bus lock: it must only
    /// queue (never block, never emit).
    pub fn subscribe(&self, sink: Sink) -> SubscriptionId {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id += 1;
        inner.subs.push(Subscriber { id, sink });
        SubscriptionId(id)
    }

    /// Runs `first` under the bus lock and, if it returns true, subscribes
    /// the sink before the lock is released, so that no event can slip in
    /// before whatever `first` queued (the server queues the reply to
    /// `qmp_capabilities` this way: events only ever follow it). `first`
    /// must not block or emit.
    pub fn subscribe_after(
        &self,
        sink: Sink,
        first: impl FnOnce() -> bool,
    ) -> Option<SubscriptionId> {
        let mut inner = self.lock();
        if !first() {
            return None;
        }
        let id = inner.next_id;
        inner.next_id += 1;
        inner.subs.push(Subscriber { id, sink });
        Some(SubscriptionId(id))
    }

    /// Subscribes a fresh channel of `capacity` events (for in-process
    /// listeners and tests). A full channel loses its subscription (and is
    /// told so by the channel closing once drained), rather than blocking
    /// the emitter.
    pub fn subscribe_channel(&self, capacity: usize) -> (SubscriptionId, Receiver<Arc<Event>>) {
        let (tx, rx) = sync_channel(capacity);
        let id = self.subscribe(Box::new(move |e| match tx.try_send(e.clone()) {
            Ok(()) => Delivery::Queued,
            Err(TrySendError::Full(_)) => {
                log::warn!("QMP event listener is not keeping up; unsubscribing it");
                Delivery::Gone
            }
            Err(TrySendError::Disconnected(_)) => Delivery::Gone,
        }));
        (id, rx)
    }

    /// Removes a subscription (no-op if already gone). Once this returns,
    /// the sink has been dropped.
    pub fn unsubscribe(&self, id: SubscriptionId) {
        let removed: Vec<Subscriber> = {
            let mut inner = self.lock();
            let (gone, keep) = std::mem::take(&mut inner.subs)
                .into_iter()
                .partition(|s| s.id == id.0);
            inner.subs = keep;
            gone
        };
        drop(removed);
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

    #[test]
    fn broadcast_format_and_overflow() {
        let bus = EventBus::new();
        let (_a, rx_a) = bus.subscribe_channel(8);
        let (_b, rx_b) = bus.subscribe_channel(1);
        bus.emit(
            "SHUTDOWN",
            json!({"guest": false, "reason": "host-qmp-quit"}),
        );
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
        assert!(rx_b.recv().is_err(), "b overflowed on STOP and was dropped");
        assert_eq!(bus.subscribers(), 1);
        let (c, rx_c) = bus.subscribe_channel(4);
        bus.unsubscribe(c);
        assert!(rx_c.recv().is_err());
    }
}
