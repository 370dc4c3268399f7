//! The client side of the fixed newstyle handshake: structured replies,
//! `base:allocation` selected for BLOCK_STATUS, then `NBD_OPT_GO` on the
//! export with its size, transmission flags and block size limits.
//!
//! Option replies longer than [`MAX_REPLY`] are refused before anything is
//! allocated for them.

use super::{ClientError, Stream};
use crate::nbd::proto::*;
use std::io::{Read, Write};

/// Longest option reply read (a name, a description, a context).
pub const MAX_REPLY: u32 = 64 << 10;

/// What the server told about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags (`TF_*`).
    pub flags: u16,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The id of `base:allocation`, if the server offers it.
    pub base_allocation: Option<u32>,
    /// Largest READ/WRITE payload the server takes.
    pub max_block: u32,
}

impl ExportInfo {
    /// True if the server announced `flag` (a `TF_*` bit).
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

fn protocol(msg: impl Into<String>) -> ClientError {
    ClientError::Protocol(msg.into())
}

/// Sends one option with its payload.
fn send_option(s: &mut Stream, opt: u32, payload: &[u8]) -> Result<(), ClientError> {
    let mut b = Vec::with_capacity(16 + payload.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    s.write_all(&b)?;
    Ok(())
}

/// Reads one option reply to `opt`: (reply type, payload).
fn read_reply(s: &mut Stream, opt: u32) -> Result<(u32, Vec<u8>), ClientError> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    if be64(&h[0..8]) != REPLY_MAGIC {
        return Err(protocol("Unexpected option reply magic"));
    }
    if be32(&h[8..12]) != opt {
        return Err(protocol("Unexpected option in reply"));
    }
    let len = be32(&h[16..20]);
    if len > MAX_REPLY {
        return Err(protocol(format!("option reply too long: {len}")));
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)?;
    Ok((be32(&h[12..16]), payload))
}

/// The server's message in an error reply, for the error text.
fn server_error(opt: u32, kind: u32, payload: &[u8]) -> ClientError {
    if kind == REP_ERR_UNKNOWN && opt == OPT_GO {
        return ClientError::NoExport;
    }
    let msg = String::from_utf8_lossy(payload);
    protocol(format!(
        "server reported error {kind:#x} to option {}: {msg}",
        opt_name(opt)
    ))
}

/// Runs the handshake for `export` on a connected socket.
pub fn negotiate(s: &mut Stream, export: &str) -> Result<ExportInfo, ClientError> {
    if export.len() > MAX_STRING {
        return Err(protocol("export name too long"));
    }
    let mut g = [0u8; 18];
    s.read_exact(&mut g)?;
    if be64(&g[0..8]) != NBD_MAGIC {
        return Err(protocol("Bad initial magic received"));
    }
    if be64(&g[8..16]) != IHAVEOPT {
        return Err(protocol(
            "Server does not support the fixed newstyle protocol",
        ));
    }
    let gflags = be16(&g[16..18]);
    if gflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol(
            "Server does not support the fixed newstyle protocol",
        ));
    }
    let mut cflags = CLIENT_FIXED_NEWSTYLE;
    if gflags & FLAG_NO_ZEROES != 0 {
        cflags |= CLIENT_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())?;

    send_option(s, OPT_STRUCTURED_REPLY, &[])?;
    let (kind, _) = read_reply(s, OPT_STRUCTURED_REPLY)?;
    let structured = kind == REP_ACK;
    if !structured && kind & (1 << 31) == 0 {
        return Err(protocol("unexpected reply to structured reply"));
    }

    let mut base_allocation = None;
    if structured {
        let query = b"base:allocation";
        let mut p = Vec::new();
        p.extend_from_slice(&(export.len() as u32).to_be_bytes());
        p.extend_from_slice(export.as_bytes());
        p.extend_from_slice(&1u32.to_be_bytes());
        p.extend_from_slice(&(query.len() as u32).to_be_bytes());
        p.extend_from_slice(query);
        send_option(s, OPT_SET_META_CONTEXT, &p)?;
        loop {
            let (kind, payload) = read_reply(s, OPT_SET_META_CONTEXT)?;
            match kind {
                REP_META_CONTEXT => {
                    let mut c = Cursor::new(&payload);
                    let id = c
                        .u32()
                        .ok_or_else(|| protocol("short meta context reply"))?;
                    if c.bytes(payload.len() - 4) != Some(&query[..]) {
                        return Err(protocol("server selected a context we did not ask for"));
                    }
                    base_allocation = Some(id);
                }
                REP_ACK => break,
                // No metadata contexts (an old server): allocation unknown.
                k if k & (1 << 31) != 0 => break,
                _ => return Err(protocol("unexpected reply to set meta context")),
            }
        }
    }

    let mut p = Vec::new();
    p.extend_from_slice(&(export.len() as u32).to_be_bytes());
    p.extend_from_slice(export.as_bytes());
    p.extend_from_slice(&1u16.to_be_bytes());
    p.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &p)?;
    let mut export_info = None;
    let mut max_block = MAX_PAYLOAD;
    loop {
        let (kind, payload) = read_reply(s, OPT_GO)?;
        match kind {
            REP_INFO => {
                let mut c = Cursor::new(&payload);
                match c.u16() {
                    Some(INFO_EXPORT) => {
                        let size = c.bytes(8).map(be64);
                        let flags = c.u16();
                        match (size, flags, c.is_empty()) {
                            (Some(size), Some(flags), true) => export_info = Some((size, flags)),
                            _ => return Err(protocol("malformed export info")),
                        }
                    }
                    Some(INFO_BLOCK_SIZE) => {
                        let (min, _pref, max) = (c.u32(), c.u32(), c.u32());
                        match (min, max) {
                            (Some(_), Some(max)) if max >= 512 => {
                                max_block = max.min(MAX_PAYLOAD);
                            }
                            _ => return Err(protocol("malformed block size info")),
                        }
                    }
                    Some(_) => {}
                    None => return Err(protocol("empty info reply")),
                }
            }
            REP_ACK => break,
            k if k & (1 << 31) != 0 => return Err(server_error(OPT_GO, k, &payload)),
            _ => return Err(protocol("unexpected reply to go")),
        }
    }
    let (size, flags) = export_info.ok_or_else(|| protocol("server sent no export info"))?;
    if size > i64::MAX as u64 {
        return Err(protocol("export size too large"));
    }
    Ok(ExportInfo {
        size,
        flags,
        structured,
        base_allocation,
        max_block,
    })
}
