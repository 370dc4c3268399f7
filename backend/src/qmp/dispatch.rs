//! The command layer, independent of the transport: a registry of named
//! commands, capabilities negotiation, validation of the request envelope
//! with QEMU's wording, and reply construction with `id` echo.
//!
//! Commands are registered by name at start (the standard set in
//! `commands.rs`; block-job commands can be added the same way) and run
//! one at a time under a command lock, as QEMU runs them under its big
//! lock, so that a multi-step command never interleaves with another
//! client's. A handler that needs something to happen after its reply
//! is on its way (e.g. `quit`) registers it with [`Call::after_reply`].

use super::args::{value_enum, Args};
use super::error::{ErrorClass, QmpError};
use super::events::EventBus;
use super::json::Frame;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// What QMP clients see as the server's version. vubd speaks QEMU 7.2's
/// dialect of QMP, so that is the QEMU version it reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    /// QEMU major version reported.
    pub major: u32,
    /// QEMU minor version reported.
    pub minor: u32,
    /// QEMU micro version reported.
    pub micro: u32,
    /// The `package` string, e.g. `vubd 0.1.0`.
    pub package: String,
}

impl Default for VersionInfo {
    fn default() -> Self {
        VersionInfo {
            major: 7,
            minor: 2,
            micro: 0,
            package: format!("vubd {}", env!("CARGO_PKG_VERSION")),
        }
    }
}

impl VersionInfo {
    /// The `query-version` return value (and the greeting's `version`).
    pub fn to_json(&self) -> Value {
        json!({
            "qemu": {"major": self.major, "minor": self.minor, "micro": self.micro},
            "package": self.package,
        })
    }
}

/// Work to run after a reply has been queued to its client.
pub type AfterReply = Box<dyn FnOnce() + Send>;

/// One invocation of a command, handed to its handler.
pub struct Call<'a> {
    /// The command's arguments; take members in schema order, then call
    /// [`Args::finish`] before acting, so that a bad request changes nothing.
    pub args: Args,
    /// The event bus, for commands that emit events.
    pub events: &'a EventBus,
    after: Vec<AfterReply>,
}

impl Call<'_> {
    /// Runs `f` once the reply to this command has been queued to the
    /// client (e.g. `quit`: the daemon must not exit before that).
    pub fn after_reply(&mut self, f: impl FnOnce() + Send + 'static) {
        self.after.push(Box::new(f));
    }
}

/// A command handler: arguments in, `return` value or error out.
pub type Handler = Arc<dyn Fn(&mut Call<'_>) -> Result<Value, QmpError> + Send + Sync>;

/// Per-connection protocol state.
#[derive(Debug, Default)]
pub struct Session {
    negotiated: bool,
}

impl Session {
    /// A connection that has just received the greeting.
    pub fn new() -> Session {
        Session::default()
    }

    /// True once `qmp_capabilities` has succeeded (events flow from then on).
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }
}

/// The outcome of one incoming message.
pub struct Response {
    /// The reply message (`return` or `error`, with `id` if one was given).
    pub message: Value,
    /// True if this message completed capabilities negotiation: the
    /// transport should start delivering events to this client.
    pub negotiated_now: bool,
    /// Actions to run after `message` has been queued.
    pub after_reply: Vec<AfterReply>,
}

impl std::fmt::Debug for Response {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("message", &self.message)
            .field("negotiated_now", &self.negotiated_now)
            .field("after_reply", &self.after_reply.len())
            .finish()
    }
}

const CAPS: &str = "qmp_capabilities";

/// The command registry and dispatcher.
pub struct Dispatcher {
    commands: RwLock<BTreeMap<String, Handler>>,
    events: EventBus,
    version: VersionInfo,
    command_lock: Mutex<()>,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("commands", &self.command_names())
            .field("version", &self.version)
            .finish()
    }
}

fn return_message(value: Value, id: Option<Value>) -> Value {
    let mut m = Map::new();
    m.insert("return".into(), value);
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    Value::Object(m)
}

fn error_message(err: &QmpError, id: Option<Value>) -> Value {
    let mut m = Map::new();
    if let Some(id) = id {
        m.insert("id".into(), id);
    }
    m.insert("error".into(), err.to_json());
    Value::Object(m)
}

impl Dispatcher {
    /// A dispatcher with only the protocol commands (`qmp_capabilities`,
    /// `query-version`, `query-commands`); see
    /// [`super::commands::register_standard`] for the disk commands.
    pub fn new(events: EventBus, version: VersionInfo) -> Arc<Dispatcher> {
        let d = Arc::new(Dispatcher {
            commands: RwLock::new(BTreeMap::new()),
            events,
            version,
            command_lock: Mutex::new(()),
        });
        d.register(CAPS, |_call: &mut Call<'_>| {
            // Reached only after negotiation (before it, handle() answers
            // qmp_capabilities itself); QEMU refuses a second negotiation.
            Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            ))
        });
        let version = d.version.to_json();
        d.register("query-version", move |call: &mut Call<'_>| {
            std::mem::take(&mut call.args).finish()?;
            Ok(version.clone())
        });
        let weak = Arc::downgrade(&d);
        d.register("query-commands", move |call: &mut Call<'_>| {
            std::mem::take(&mut call.args).finish()?;
            let names = weak
                .upgrade()
                .map(|d| d.command_names())
                .unwrap_or_default();
            Ok(Value::Array(
                names.into_iter().map(|n| json!({ "name": n })).collect(),
            ))
        });
        d
    }

    /// Adds (or replaces) command `name`.
    pub fn register(
        &self,
        name: &str,
        handler: impl Fn(&mut Call<'_>) -> Result<Value, QmpError> + Send + Sync + 'static,
    ) {
        self.commands
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), Arc::new(handler));
    }

    /// The names of all commands, sorted.
    pub fn command_names(&self) -> Vec<String> {
        self.commands
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// The event bus commands and the transport share.
    pub fn events(&self) -> &EventBus {
        &self.events
    }

    /// The version reported in the greeting and by `query-version`.
    pub fn version(&self) -> &VersionInfo {
        &self.version
    }

    /// The greeting sent to every new connection.
    pub fn greeting(&self) -> Value {
        json!({"QMP": {"version": self.version.to_json(), "capabilities": []}})
    }

    /// Runs command `name` in-process, as if a negotiated client sent it;
    /// after-reply actions run before this returns.
    pub fn execute(&self, name: &str, arguments: Map<String, Value>) -> Result<Value, QmpError> {
        let (result, after) = self.run(name, arguments);
        for f in after {
            f();
        }
        result
    }

    fn run(
        &self,
        name: &str,
        arguments: Map<String, Value>,
    ) -> (Result<Value, QmpError>, Vec<AfterReply>) {
        let handler = self
            .commands
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned();
        let Some(handler) = handler else {
            return (Err(QmpError::command_not_found(name)), Vec::new());
        };
        let mut call = Call {
            args: Args::new(arguments),
            events: &self.events,
            after: Vec::new(),
        };
        let result = {
            let _serial = self.command_lock.lock().unwrap_or_else(|e| e.into_inner());
            handler(&mut call)
        };
        match &result {
            Ok(_) => log::debug!("QMP {name}: ok"),
            Err(e) => log::info!("QMP {name}: {}", e.desc),
        }
        (result, call.after)
    }

    /// Handles one frame from a client.
    pub fn handle(&self, session: &mut Session, frame: Frame) -> Response {
        let mut response = Response {
            message: Value::Null,
            negotiated_now: false,
            after_reply: Vec::new(),
        };
        let request = match frame {
            Frame::Error(desc) => {
                response.message = error_message(&QmpError::generic(desc), None);
                return response;
            }
            Frame::Value(Value::Object(m)) => m,
            Frame::Value(_) => {
                response.message =
                    error_message(&QmpError::generic("QMP input must be a JSON object"), None);
                return response;
            }
        };
        let id = request.get("id").cloned();
        match self.parse_envelope(request) {
            Err(e) => response.message = error_message(&e, id),
            Ok((name, arguments)) => {
                let result = if !session.negotiated {
                    if name == CAPS {
                        let r = negotiate(arguments);
                        if r.is_ok() {
                            session.negotiated = true;
                            response.negotiated_now = true;
                        }
                        r
                    } else {
                        Err(QmpError::new(
                            ErrorClass::CommandNotFound,
                            "Expecting capabilities negotiation with 'qmp_capabilities'",
                        ))
                    }
                } else {
                    let (r, after) = self.run(&name, arguments);
                    response.after_reply = after;
                    r
                };
                response.message = match result {
                    Ok(v) => return_message(v, id),
                    Err(e) => error_message(&e, id),
                };
            }
        }
        response
    }

    /// Checks the request envelope as QEMU's `qmp_dispatch_check_obj` does.
    fn parse_envelope(
        &self,
        request: Map<String, Value>,
    ) -> Result<(String, Map<String, Value>), QmpError> {
        let mut name = None;
        let mut arguments = Map::new();
        for (key, value) in request {
            match key.as_str() {
                "execute" => match value {
                    Value::String(s) => name = Some(s),
                    _ => {
                        return Err(QmpError::generic(
                            "QMP input member 'execute' must be a string",
                        ))
                    }
                },
                "arguments" => match value {
                    Value::Object(m) => arguments = m,
                    _ => {
                        return Err(QmpError::generic(
                            "QMP input member 'arguments' must be an object",
                        ))
                    }
                },
                "id" => {}
                // vubd offers no out-of-band capability, so QEMU's answer
                // for exec-oob without the 'oob' capability applies.
                _ => {
                    return Err(QmpError::generic(format!(
                        "QMP input member '{key}' is unexpected"
                    )))
                }
            }
        }
        let name = name.ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))?;
        Ok((name, arguments))
    }
}

fn negotiate(arguments: Map<String, Value>) -> Result<Value, QmpError> {
    let mut args = Args::new(arguments);
    let enable = args.opt_list("enable")?;
    args.finish()?;
    let mut caps = Vec::new();
    for (path, v) in enable.unwrap_or_default() {
        caps.push(value_enum(&path, v, &["oob"])?);
    }
    // The greeting offers no capability (vubd runs every command in
    // order), so any requested one is unavailable, worded as QEMU.
    if let Some(cap) = caps.first() {
        return Err(QmpError::generic(format!("Capability {cap} not available")));
    }
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(s: &str) -> Frame {
        Frame::Value(serde_json::from_str(s).unwrap())
    }

    fn reply(d: &Dispatcher, s: &mut Session, msg: &str) -> Value {
        d.handle(s, frame(msg)).message
    }

    #[test]
    fn negotiation_and_envelope() {
        let d = Dispatcher::new(EventBus::new(), VersionInfo::default());
        let mut s = Session::new();
        let r = reply(&d, &mut s, r#"{"execute":"query-version","id":5}"#);
        assert_eq!(r["id"], 5);
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert_eq!(
            r["error"]["desc"],
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        );
        let r = reply(
            &d,
            &mut s,
            r#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}"#,
        );
        assert_eq!(r["error"]["desc"], "Capability oob not available");
        let r = reply(
            &d,
            &mut s,
            r#"{"execute":"qmp_capabilities","arguments":{"enable":["x"]}}"#,
        );
        assert_eq!(
            r["error"]["desc"],
            "Parameter 'enable[0]' does not accept value 'x'"
        );
        assert!(!s.negotiated());
        let resp = d.handle(
            &mut s,
            frame(r#"{"execute":"qmp_capabilities","id":{"a":[1]}}"#),
        );
        assert!(resp.negotiated_now);
        assert_eq!(resp.message, json!({"return": {}, "id": {"a": [1]}}));
        let r = reply(&d, &mut s, r#"{"execute":"qmp_capabilities"}"#);
        assert_eq!(
            r["error"]["desc"],
            "Capabilities negotiation is already complete, command ignored"
        );
        let r = reply(&d, &mut s, r#"{"execute":"query-version","id":null}"#);
        assert_eq!(r["return"]["qemu"]["major"], 7);
        assert!(r.as_object().unwrap().contains_key("id"));
        for (msg, desc) in [
            (
                r#"{"execute":1}"#,
                "QMP input member 'execute' must be a string",
            ),
            (
                r#"{"execute":"query-version","arguments":[]}"#,
                "QMP input member 'arguments' must be an object",
            ),
            (
                r#"{"exec-oob":"query-version"}"#,
                "QMP input member 'exec-oob' is unexpected",
            ),
            (
                r#"{"execute":"query-version","foo":1}"#,
                "QMP input member 'foo' is unexpected",
            ),
            (r#"{"id":1}"#, "QMP input lacks member 'execute'"),
            (r#"[1]"#, "QMP input must be a JSON object"),
            (
                r#"{"execute":"query-version","arguments":{"x":1}}"#,
                "Parameter 'x' is unexpected",
            ),
        ] {
            let r = reply(&d, &mut s, msg);
            assert_eq!(r["error"]["desc"], desc, "{msg}");
            assert_eq!(r["error"]["class"], "GenericError", "{msg}");
        }
        let r = reply(&d, &mut s, r#"{"execute":"nope","id":"i"}"#);
        assert_eq!(
            r,
            json!({"id": "i", "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}})
        );
        let r = reply(&d, &mut s, r#"{"execute":"query-commands"}"#);
        let names: Vec<&str> = r["return"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["qmp_capabilities", "query-commands", "query-version"]
        );
    }
}
