//! A small blocking QMP client for tests and benchmarks: connects to a QMP
//! unix socket (vubd's `--qmp`, or qemu-storage-daemon's monitor),
//! negotiates capabilities, runs commands and collects the events that
//! arrive meanwhile, so a test can wait for e.g. BLOCK_JOB_READY.
//!
//! A reader thread turns the byte stream into messages; replies and events
//! come out in the order the server sent them.

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

/// An error reply (`{"error": {"class", "desc"}}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpErrorReply {
    /// QEMU's error class, e.g. `GenericError`.
    pub class: String,
    /// The description.
    pub desc: String,
}

impl std::fmt::Display for QmpErrorReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.class, self.desc)
    }
}

/// A negotiated QMP connection.
pub struct QmpClient {
    stream: UnixStream,
    rx: Receiver<Result<Value, String>>,
    events: VecDeque<Value>,
    history: Vec<Value>,
    timeout: Duration,
    /// The greeting the server sent.
    pub greeting: Value,
}

/// Waits until `path` exists (a daemon creates its QMP socket at start).
pub fn wait_for_socket(path: &Path, timeout: Duration) -> Result<()> {
    let t0 = Instant::now();
    while !path.exists() {
        ensure!(
            t0.elapsed() < timeout,
            "{} did not appear within {timeout:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

impl QmpClient {
    /// Connects to `path` (waiting up to `timeout` for it to appear) and
    /// negotiates capabilities; `timeout` also bounds every later wait.
    pub fn connect(path: &Path, timeout: Duration) -> Result<QmpClient> {
        let deadline = std::time::Instant::now() + timeout;
        // A socket file left by a daemon that was killed refuses until its
        // restarted successor replaces it.
        let stream = loop {
            wait_for_socket(path, timeout)?;
            match UnixStream::connect(path) {
                Err(e)
                    if e.kind() == std::io::ErrorKind::ConnectionRefused
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => break other.with_context(|| format!("connect {}", path.display()))?,
            }
        };
        let reader = BufReader::new(stream.try_clone()?);
        let (tx, rx) = channel();
        std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || {
                for line in reader.lines() {
                    let msg = match line {
                        Ok(l) => serde_json::from_str::<Value>(&l)
                            .map_err(|e| format!("bad JSON {l:?}: {e}")),
                        Err(e) => Err(format!("read: {e}")),
                    };
                    let stop = msg.is_err();
                    if tx.send(msg).is_err() || stop {
                        return;
                    }
                }
                let _ = tx.send(Err("QMP connection closed".into()));
            })
            .context("cannot start the QMP reader thread")?;
        let mut c = QmpClient {
            stream,
            rx,
            events: VecDeque::new(),
            history: Vec::new(),
            timeout,
            greeting: Value::Null,
        };
        c.greeting = c.next(timeout)?;
        ensure!(
            c.greeting.get("QMP").is_some(),
            "not a QMP greeting: {}",
            c.greeting
        );
        c.ok("qmp_capabilities", json!({}))?;
        Ok(c)
    }

    fn queue_event(&mut self, v: Value) {
        self.history.push(v.clone());
        self.events.push_back(v);
    }

    /// Every event received on this connection, oldest first.
    pub fn history(&self) -> &[Value] {
        &self.history
    }

    /// Names of every event received (JOB_STATUS_CHANGE shown as its
    /// status, BLOCK_JOB_ERROR as `ERROR:operation:action`), for comparing
    /// sequences.
    pub fn history_names(&self) -> Vec<String> {
        self.history.iter().map(event_label).collect()
    }

    /// Forgets the event history (e.g. between phases of a test).
    pub fn clear_history(&mut self) {
        self.history.clear();
    }

    fn next(&mut self, timeout: Duration) -> Result<Value> {
        match self.rx.recv_timeout(timeout) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => bail!("{e}"),
            Err(RecvTimeoutError::Timeout) => bail!("no QMP message within {timeout:?}"),
            Err(RecvTimeoutError::Disconnected) => bail!("QMP connection closed"),
        }
    }

    /// Runs a command: `Ok(Ok(return))`, `Ok(Err(error reply))`, or `Err`
    /// if the connection failed.
    pub fn execute(
        &mut self,
        name: &str,
        args: Value,
    ) -> Result<std::result::Result<Value, QmpErrorReply>> {
        let mut msg = json!({"execute": name});
        if args.as_object().is_some_and(|m| !m.is_empty()) {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.stream
            .write_all(line.as_bytes())
            .context("write to QMP")?;
        loop {
            let v = self.next(self.timeout)?;
            if v.get("event").is_some() {
                self.queue_event(v);
                continue;
            }
            if let Some(r) = v.get("return") {
                return Ok(Ok(r.clone()));
            }
            if let Some(e) = v.get("error") {
                return Ok(Err(QmpErrorReply {
                    class: e["class"].as_str().unwrap_or("").to_string(),
                    desc: e["desc"].as_str().unwrap_or("").to_string(),
                }));
            }
            bail!("unexpected QMP message {v}");
        }
    }

    /// Runs a command that must succeed; returns its `return` value.
    pub fn ok(&mut self, name: &str, args: Value) -> Result<Value> {
        match self.execute(name, args.clone())? {
            Ok(v) => Ok(v),
            Err(e) => bail!("{name} {args}: {e}"),
        }
    }

    /// Runs a command that must fail; returns the error.
    pub fn err(&mut self, name: &str, args: Value) -> Result<QmpErrorReply> {
        match self.execute(name, args.clone())? {
            Ok(v) => bail!("{name} {args}: expected an error, got {v}"),
            Err(e) => Ok(e),
        }
    }

    fn pump(&mut self, wait: Duration) -> Result<bool> {
        match self.rx.recv_timeout(wait) {
            Ok(Ok(v)) => {
                if v.get("event").is_some() {
                    self.queue_event(v);
                }
                Ok(true)
            }
            Ok(Err(e)) => bail!("{e}"),
            Err(RecvTimeoutError::Timeout) => Ok(false),
            Err(RecvTimeoutError::Disconnected) => bail!("QMP connection closed"),
        }
    }

    /// Waits for the next event called `name` whose `data` satisfies `pred`;
    /// earlier events stay queued (see [`QmpClient::take_events`]).
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| e["event"] == name && pred(&e["data"]))
            {
                // Events before it are consumed too: they happened earlier.
                let e = self.events.remove(i).context("event vanished")?;
                self.events.drain(..i);
                return Ok(e);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "no {name} event within {timeout:?}; queued: {:?}",
                    self.events
                        .iter()
                        .map(|e| e["event"].clone())
                        .collect::<Vec<_>>()
                );
            }
            self.pump(left.min(Duration::from_millis(50)))?;
        }
    }

    /// Every event received so far that no wait consumed, oldest first,
    /// after collecting those already on the wire.
    pub fn take_events(&mut self) -> Result<Vec<Value>> {
        while self.pump(Duration::from_millis(20))? {}
        Ok(self.events.drain(..).collect())
    }
}

/// A short label for an event: its name, JOB_STATUS_CHANGE as its status,
/// BLOCK_JOB_ERROR as `ERROR:operation:action`.
pub fn event_label(e: &Value) -> String {
    let d = &e["data"];
    match e["event"].as_str().unwrap_or("?") {
        "JOB_STATUS_CHANGE" => d["status"].as_str().unwrap_or("?").to_string(),
        "BLOCK_JOB_ERROR" => format!(
            "ERROR:{}:{}",
            d["operation"].as_str().unwrap_or("?"),
            d["action"].as_str().unwrap_or("?")
        ),
        n => n.to_string(),
    }
}
