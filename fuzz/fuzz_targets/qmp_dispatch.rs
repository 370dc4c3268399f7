//! The QMP command layer as a client reaches it: the input is a client's
//! byte stream, split into messages and run one by one through the
//! dispatcher of the daemon's standard commands (queries, dirty bitmaps,
//! `transaction`, `quit`) on a real disk over a tmpfs image, with
//! persistent bitmaps in an in-memory sidecar. Commands that name files
//! (mirror, backup, blockdev-add, NBD) are not registered: a fuzzer must
//! not create files where it pleases.
//!
//! Checks: every message gets a reply that is a `return` or an `error`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use vhost_glue::management::{DaemonContext, ShutdownReason, HOLD_FIRST_TIMEOUT};
use vubd_backend::dirty::{DirtyTracker, MemStore, TrackerConfig};
use vubd_backend::qmp::json::Splitter;
use vubd_backend::qmp::{standard_dispatcher, EventBus, Session};
use vubd_backend::Disk;
use vubd_fuzz::DISK_SIZE;

struct Fixed {
    disk: Arc<Disk>,
    shutdown: mpsc::Sender<ShutdownReason>,
    /// Kept so that `quit` finds someone to tell.
    shutdown_rx: Mutex<mpsc::Receiver<ShutdownReason>>,
}

fn fixed() -> &'static Fixed {
    static F: OnceLock<Fixed> = OnceLock::new();
    F.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        Fixed {
            disk: vubd_fuzz::disk("qmp"),
            shutdown: tx,
            shutdown_rx: Mutex::new(rx),
        }
    })
}

fuzz_target!(|input: &[u8]| {
    let f = fixed();
    // Bitmaps are per run: what one input adds must not shape the next.
    let mut cfg = TrackerConfig::new(DISK_SIZE);
    cfg.sidecar = Some(Arc::new(MemStore::new()));
    let tracker = Arc::new(DirtyTracker::open(cfg).expect("tracker on an empty sidecar"));
    let ctx = Arc::new(DaemonContext {
        node_name: "disk0".into(),
        disk: f.disk.clone(),
        direct: false,
        bitmaps: Some(tracker.clone()),
        shutdown: Mutex::new(f.shutdown.clone()),
        hold_first_timeout: HOLD_FIRST_TIMEOUT,
    });
    let events = EventBus::new();
    let dispatcher = standard_dispatcher(ctx, events);
    let mut session = Session::new();
    let mut splitter = Splitter::default();
    let mut frames = Vec::new();
    splitter.feed(input, &mut frames);
    for frame in frames {
        let response = dispatcher.handle(&mut session, frame);
        let reply = response
            .message
            .as_object()
            .expect("a reply is a JSON object");
        assert!(
            reply.contains_key("return") ^ reply.contains_key("error"),
            "neither return nor error: {reply:?}"
        );
        for after in response.after_reply {
            after();
        }
    }
    // Drain what `quit` sent.
    if let Ok(rx) = f.shutdown_rx.lock() {
        while rx.try_recv().is_ok() {}
    }
});
