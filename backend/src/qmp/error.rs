//! QMP error replies: QEMU's error classes and the typed error a command
//! returns. The wording of every `desc` follows QEMU 7.2 so that scripts
//! that match on QEMU's messages keep working against vubd.

use serde_json::{json, Value};

/// QEMU's `QapiErrorClass`. Almost everything is `GenericError`; QEMU keeps
/// the others for backward compatibility and clients test for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Any error without a more specific class.
    GenericError,
    /// The command does not exist (or is not allowed in this state, e.g.
    /// before capabilities negotiation).
    CommandNotFound,
    /// A device exists but has no active state (QEMU: e.g. no block job).
    DeviceNotActive,
    /// The named device does not exist.
    DeviceNotFound,
}

impl ErrorClass {
    /// The class name as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
        }
    }
}

/// An error reply: `{"error": {"class": CLASS, "desc": DESC}}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// The human-readable description.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError` with the given description.
    pub fn generic(desc: impl Into<String>) -> QmpError {
        QmpError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    /// An error of the given class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> QmpError {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// QEMU's reply to an unknown command.
    pub fn command_not_found(name: &str) -> QmpError {
        QmpError::new(
            ErrorClass::CommandNotFound,
            format!("The command {name} has not been found"),
        )
    }

    /// The `"error"` member of a reply.
    pub fn to_json(&self) -> Value {
        json!({"class": self.class.as_str(), "desc": self.desc})
    }
}
