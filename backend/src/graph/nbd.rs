//! `blockdev-add driver=nbd`: a node on a remote NBD export, with QEMU
//! 7.2's arguments (`server` as a `SocketAddress` of type `inet` or
//! `unix`, `export`, `reconnect-delay`) and texts, plus vubd's
//! `x-request-timeout`; the URIs `drive-mirror` takes as a target name the
//! same exports.

use super::node::{Driver, Node, NodeOptions};
use crate::nbd::client::{ClientError, ClientOptions, NbdImage, ServerAddress};
use crate::qmp::{Args, QmpError};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What a `blockdev-add driver=nbd` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdSpec {
    /// The server.
    pub addr: ServerAddress,
    /// The export name (QEMU's default: the empty name).
    pub export: String,
    /// Seconds requests wait for a lost connection.
    pub reconnect_delay: u32,
    /// Seconds requests may wait with nothing moving on the connection
    /// before it counts as lost (vubd's `x-request-timeout`; 0: for ever).
    pub request_timeout: u32,
}

/// `x-request-timeout` when not given: far above any healthy server's
/// pause (Linux's own NBD client gives up after 30 s too), short enough
/// that a hung server fails a job by its policy instead of holding it and a
/// write-blocking mirror's guest writes for ever.
pub const DEFAULT_REQUEST_TIMEOUT: u32 = 30;

/// `reconnect-delay` as QEMU 7.2 checks it (through its option parser:
/// hence the unusual texts).
fn reconnect_delay(args: &mut Args) -> Result<u32, QmpError> {
    let Some(v) = args.take("reconnect-delay") else {
        return Ok(0);
    };
    let text = |t: &str| QmpError::generic(format!("Parameter 'reconnect-delay' expects {t}"));
    if let Some(u) = v.as_u64() {
        return u32::try_from(u).map_err(|_| text("uint32_t"));
    }
    if v.as_i64().is_some() {
        return Err(text("uint32_t"));
    }
    Err(text("uint64"))
}

/// Parses the members of `BlockdevOptionsNbd`, in schema order.
pub fn parse(args: &mut Args) -> Result<NbdSpec, QmpError> {
    let path = args.path("server");
    let mut server = Args::nested(&path, args.required("server")?)?;
    let addr = match server
        .req_enum("type", &["inet", "unix", "vsock", "fd"])?
        .as_str()
    {
        "inet" => {
            let host = server.req_str("host")?;
            let port = server.req_str("port")?;
            for b in ["numeric", "ipv4", "ipv6", "keep-alive"] {
                let _ = server.opt_bool(b)?;
            }
            let _ = server.opt_u32("to")?;
            ServerAddress::Inet { host, port }
        }
        "unix" => {
            let p = server.req_str("path")?;
            if server.opt_bool("abstract")?.unwrap_or(false) {
                return Err(QmpError::generic(
                    "vubd does not support abstract unix sockets",
                ));
            }
            let _ = server.opt_bool("tight")?;
            ServerAddress::Unix(PathBuf::from(p))
        }
        t => {
            return Err(QmpError::generic(format!(
                "vubd's NBD client connects to 'inet' and 'unix' servers only, not '{t}'"
            )))
        }
    };
    server.finish()?;
    let export = args.opt_str("export")?.unwrap_or_default();
    if args.opt_str("tls-creds")?.is_some() || args.opt_str("tls-hostname")?.is_some() {
        return Err(QmpError::generic("vubd's NBD client does not support TLS"));
    }
    if args.opt_str("x-dirty-bitmap")?.is_some() {
        return Err(QmpError::generic(
            "vubd's NBD client does not support x-dirty-bitmap",
        ));
    }
    let reconnect_delay = reconnect_delay(args)?;
    let _open_timeout = args.opt_u32("open-timeout")?;
    let request_timeout = args
        .opt_u32("x-request-timeout")?
        .unwrap_or(DEFAULT_REQUEST_TIMEOUT);
    Ok(NbdSpec {
        addr,
        export,
        reconnect_delay,
        request_timeout,
    })
}

/// Parses an NBD URI or QEMU's legacy `nbd:` file name, as `drive-mirror`
/// takes a target: `nbd://HOST[:PORT]/NAME`, `nbd+unix:///NAME?socket=P`,
/// `nbd:unix:PATH[:exportname=NAME]`, `nbd:HOST:PORT[:exportname=NAME]`.
/// `None`: not an NBD name at all.
pub fn parse_target(name: &str) -> Option<Result<NbdSpec, QmpError>> {
    let bad = || QmpError::generic(format!("Could not open '{name}': invalid NBD URI"));
    let spec = |addr, export: &str| NbdSpec {
        addr,
        export: export.to_string(),
        reconnect_delay: 0,
        request_timeout: DEFAULT_REQUEST_TIMEOUT,
    };
    if let Some(rest) = name.strip_prefix("nbd+unix://") {
        let parsed = rest
            .strip_prefix('/')
            .and_then(|r| r.split_once("?socket="));
        return Some(match parsed {
            Some((export, sock)) if !sock.is_empty() && !export.contains('?') => {
                Ok(spec(ServerAddress::Unix(PathBuf::from(sock)), export))
            }
            _ => Err(bad()),
        });
    }
    if let Some(rest) = name.strip_prefix("nbd://") {
        let (hostport, export) = rest.split_once('/').unwrap_or((rest, ""));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, p),
            _ => (hostport, "10809"),
        };
        if host.is_empty() || export.contains('?') {
            return Some(Err(bad()));
        }
        let addr = ServerAddress::Inet {
            host: host.to_string(),
            port: port.to_string(),
        };
        return Some(Ok(spec(addr, export)));
    }
    let rest = name.strip_prefix("nbd:")?;
    let (addr_part, export) = match rest.split_once(":exportname=") {
        Some((a, e)) => (a, e),
        None => (rest, ""),
    };
    let addr = match addr_part.strip_prefix("unix:") {
        Some(p) if !p.is_empty() => ServerAddress::Unix(PathBuf::from(p)),
        Some(_) => return Some(Err(bad())),
        None => match addr_part.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() && !p.is_empty() => ServerAddress::Inet {
                host: h.to_string(),
                port: p.to_string(),
            },
            _ => return Some(Err(bad())),
        },
    };
    Some(Ok(spec(addr, export)))
}

/// Connects a node to the export; the error is QEMU's text.
pub fn open(name: &str, spec: &NbdSpec, read_only: bool) -> Result<Node, QmpError> {
    let image = NbdImage::connect(ClientOptions {
        addr: spec.addr.clone(),
        export: spec.export.clone(),
        reconnect_delay: Duration::from_secs(u64::from(spec.reconnect_delay)),
        request_timeout: (spec.request_timeout > 0)
            .then(|| Duration::from_secs(u64::from(spec.request_timeout))),
    })
    .map_err(|e: ClientError| QmpError::generic(e.to_string()))?;
    let read_only = read_only || image.client().info().has(crate::nbd::proto::TF_READ_ONLY);
    let options = NodeOptions {
        read_only,
        ..NodeOptions::default()
    };
    Ok(Node::new(
        name,
        Driver::Nbd,
        Arc::new(image),
        options,
        None,
        true,
    ))
}

/// `reconnect-delay` of a lone value, or the error text.
#[cfg(test)]
fn delay_of(v: serde_json::Value) -> Result<u32, String> {
    let mut m = serde_json::Map::new();
    m.insert("reconnect-delay".into(), v);
    reconnect_delay(&mut Args::new(m)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reconnect_delay_texts_are_qemus() {
        assert_eq!(delay_of(json!(5)), Ok(5));
        assert_eq!(
            delay_of(json!(-1)),
            Err("Parameter 'reconnect-delay' expects uint32_t".into())
        );
        assert_eq!(
            delay_of(json!(1u64 << 32)),
            Err("Parameter 'reconnect-delay' expects uint32_t".into())
        );
        assert_eq!(
            delay_of(json!("x")),
            Err("Parameter 'reconnect-delay' expects uint64".into())
        );
    }

    #[test]
    fn drive_mirror_target_names() {
        let t = |s: &str| parse_target(s).map(|r| r.map(|s| s.addr.uri(&s.export)));
        assert_eq!(t("/var/x.img"), None);
        assert_eq!(
            t("nbd://127.0.0.1:1234/e").unwrap().unwrap(),
            "nbd://127.0.0.1:1234/e"
        );
        assert_eq!(t("nbd://h/e").unwrap().unwrap(), "nbd://h:10809/e");
        assert_eq!(
            t("nbd+unix:///e?socket=/r/s").unwrap().unwrap(),
            "nbd+unix:///e?socket=/r/s"
        );
        assert_eq!(
            t("nbd:unix:/r/s:exportname=e").unwrap().unwrap(),
            "nbd+unix:///e?socket=/r/s"
        );
        assert_eq!(t("nbd:h:99:exportname=e").unwrap().unwrap(), "nbd://h:99/e");
        assert!(t("nbd+unix:///e").unwrap().is_err());
        assert!(t("nbd:unix:").unwrap().is_err());
    }
}
