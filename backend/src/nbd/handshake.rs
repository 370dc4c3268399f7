//! The fixed newstyle handshake: option haggling up to `NBD_OPT_GO` (or
//! `NBD_OPT_EXPORT_NAME`), with structured replies and metadata contexts
//! answered as QEMU 7.2 answers them (the prefix queries `base:`, `qemu:`
//! and `qemu:dirty-bitmap:` list everything under them, and select nothing
//! in `NBD_OPT_SET_META_CONTEXT`).
//!
//! Every length a client sends is checked before anything is allocated:
//! an option payload is at most [`MAX_OPTION`] bytes, names and queries
//! at most [`MAX_STRING`]; a malformed option gets an error reply, a
//! client that does not speak the protocol is disconnected.

use super::export::{Export, Exports};
use super::proto::*;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Instant;

/// Largest option payload read (a few names and queries fit many times).
pub const MAX_OPTION: u32 = 64 << 10;

/// Context id of `base:allocation` (QEMU's numbering).
pub const ID_BASE_ALLOCATION: u32 = 0;
/// Context id of `qemu:allocation-depth`.
pub const ID_ALLOCATION_DEPTH: u32 = 1;
/// Context id of the first `qemu:dirty-bitmap:`; bitmap i has this + i.
pub const ID_FIRST_BITMAP: u32 = 2;

/// A metadata context of an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// `base:allocation`.
    BaseAllocation,
    /// `qemu:allocation-depth`.
    AllocationDepth,
    /// `qemu:dirty-bitmap:NAME` of the export's bitmap at this index.
    Bitmap(usize),
}

impl Context {
    /// The id used on the wire.
    pub fn id(self) -> u32 {
        match self {
            Context::BaseAllocation => ID_BASE_ALLOCATION,
            Context::AllocationDepth => ID_ALLOCATION_DEPTH,
            Context::Bitmap(i) => ID_FIRST_BITMAP.saturating_add(i as u32),
        }
    }

    fn name(self, export: &Export) -> String {
        match self {
            Context::BaseAllocation => "base:allocation".into(),
            Context::AllocationDepth => "qemu:allocation-depth".into(),
            Context::Bitmap(i) => format!(
                "qemu:dirty-bitmap:{}",
                export.config.bitmaps.get(i).map_or("", |b| b.name.as_str())
            ),
        }
    }
}

/// What the client negotiated for its transmission phase.
pub struct Negotiated {
    /// The export it opened.
    pub export: Arc<Export>,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// The selected metadata contexts, in id order.
    pub contexts: Vec<Context>,
}

/// Every context an export offers, in QEMU's order.
fn all_contexts(export: &Export) -> Vec<Context> {
    let mut v = vec![Context::BaseAllocation];
    if export.config.allocation_depth {
        v.push(Context::AllocationDepth);
    }
    v.extend((0..export.config.bitmaps.len()).map(Context::Bitmap));
    v
}

/// The contexts a query selects (`list`: prefixes match everything under
/// them), as QEMU 7.2's `nbd_meta_base_query` / `nbd_meta_qemu_query`.
fn query_contexts(export: &Export, query: &[u8], list: bool) -> Vec<Context> {
    let Ok(q) = std::str::from_utf8(query) else {
        return Vec::new();
    };
    if let Some(rest) = q.strip_prefix("base:") {
        return if rest == "allocation" || (rest.is_empty() && list) {
            vec![Context::BaseAllocation]
        } else {
            Vec::new()
        };
    }
    let Some(rest) = q.strip_prefix("qemu:") else {
        return Vec::new();
    };
    let bitmaps = export.config.bitmaps.iter().enumerate();
    if rest.is_empty() {
        return if list {
            all_contexts(export)
                .into_iter()
                .filter(|c| *c != Context::BaseAllocation)
                .collect()
        } else {
            Vec::new()
        };
    }
    if rest == "allocation-depth" {
        return if export.config.allocation_depth {
            vec![Context::AllocationDepth]
        } else {
            Vec::new()
        };
    }
    let Some(name) = rest.strip_prefix("dirty-bitmap:") else {
        return Vec::new();
    };
    if name.is_empty() {
        return if list {
            bitmaps.map(|(i, _)| Context::Bitmap(i)).collect()
        } else {
            Vec::new()
        };
    }
    bitmaps
        .filter(|(_, b)| b.name == name)
        .map(|(i, _)| Context::Bitmap(i))
        .collect()
}

/// The transmission flags of `export` for this client.
pub fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_CAN_MULTI_CONN | TF_SEND_CACHE;
    if export.config.writable {
        f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
    } else {
        f |= TF_READ_ONLY;
    }
    if structured {
        f |= TF_SEND_DF;
    }
    f
}

/// How a negotiation step ended.
enum Step {
    /// Go on with the next option.
    Next,
    /// Enter transmission on this export.
    Go(Arc<Export>),
    /// Close the connection (abort, or a client that broke the protocol).
    Close,
}

struct Haggle<'a, R, W> {
    r: R,
    w: W,
    exports: &'a Exports,
    attach: &'a dyn Fn(&Arc<Export>) -> bool,
    structured: bool,
    /// The export and contexts chosen by the last SET_META_CONTEXT: the
    /// export itself, since the contexts are indices into its bitmaps and
    /// one re-added under the same name may have others.
    meta: Option<(Arc<Export>, Vec<Context>)>,
    no_zeroes: bool,
}

/// Runs the handshake on a new connection. `Ok(None)`: the client left,
/// aborted, timed out (`deadline`) or broke the protocol; the caller
/// closes the connection. `attach` registers the client with the export
/// it opens, before the client is told it may use it (false: the export
/// is being removed).
pub fn negotiate<R: Read, W: Write>(
    r: R,
    w: W,
    exports: &Exports,
    deadline: Instant,
    attach: &dyn Fn(&Arc<Export>) -> bool,
) -> io::Result<Option<Negotiated>> {
    let mut h = Haggle {
        r,
        w,
        exports,
        attach,
        structured: false,
        meta: None,
        no_zeroes: false,
    };
    h.w.write_all(&NBD_MAGIC.to_be_bytes())?;
    h.w.write_all(&IHAVEOPT.to_be_bytes())?;
    h.w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    h.w.flush()?;
    let mut flags = [0u8; 4];
    h.r.read_exact(&mut flags)?;
    let flags = u32::from_be_bytes(flags);
    if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        log::info!("NBD: unknown client flags {flags:#x}");
        return Ok(None);
    }
    h.no_zeroes = flags & CLIENT_NO_ZEROES != 0;
    loop {
        if Instant::now() > deadline {
            log::info!("NBD: handshake took too long");
            return Ok(None);
        }
        match h.option()? {
            Step::Next => {}
            Step::Close => return Ok(None),
            Step::Go(export) => {
                // The NBD spec: contexts set for another export are void.
                let contexts = match h.meta.take() {
                    Some((e, c)) if Arc::ptr_eq(&e, &export) => c,
                    _ => Vec::new(),
                };
                return Ok(Some(Negotiated {
                    export,
                    structured: h.structured,
                    contexts,
                }));
            }
        }
    }
}

impl<R: Read, W: Write> Haggle<'_, R, W> {
    fn reply(&mut self, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| io::ErrorKind::InvalidData)?;
        self.w.write_all(&option_reply(opt, kind, len))?;
        self.w.write_all(data)
    }

    fn error(&mut self, opt: u32, kind: u32, msg: &str) -> io::Result<Step> {
        log::info!("NBD option {}: {msg}", opt_name(opt));
        self.reply(opt, kind, msg.as_bytes())?;
        self.w.flush()?;
        Ok(Step::Next)
    }

    fn ack(&mut self, opt: u32) -> io::Result<Step> {
        self.reply(opt, REP_ACK, &[])?;
        self.w.flush()?;
        Ok(Step::Next)
    }

    fn option(&mut self) -> io::Result<Step> {
        let mut head = [0u8; 16];
        self.r.read_exact(&mut head)?;
        if be64(&head[0..8]) != IHAVEOPT {
            log::info!("NBD: bad option magic");
            return Ok(Step::Close);
        }
        let opt = be32(&head[8..12]);
        let len = be32(&head[12..16]);
        if len > MAX_OPTION {
            // Skipping gigabytes a client claims to send is not worth it.
            self.error(opt, REP_ERR_TOO_BIG, "option too large")?;
            return Ok(Step::Close);
        }
        let mut data = vec![0u8; len as usize];
        self.r.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => self.export_name(&data),
            OPT_ABORT => {
                // The client may close without reading this.
                let _ = self.ack(opt);
                Ok(Step::Close)
            }
            OPT_LIST => self.list(&data),
            OPT_STARTTLS => self.error(opt, REP_ERR_POLICY, "TLS not configured"),
            OPT_INFO | OPT_GO => self.info(opt, &data),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return self.error(
                        opt,
                        REP_ERR_INVALID,
                        "option 'structured reply' should have zero length",
                    );
                }
                if self.structured {
                    return self.error(opt, REP_ERR_INVALID, "structured reply already negotiated");
                }
                self.structured = true;
                self.ack(opt)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta(opt, &data),
            _ => self.error(
                opt,
                REP_ERR_UNSUP,
                &format!("Unsupported option {opt:#x} ({})", opt_name(opt)),
            ),
        }
    }

    fn export_name(&mut self, data: &[u8]) -> io::Result<Step> {
        // No reply is possible for this option: a bad name ends the session.
        let Some(export) = std::str::from_utf8(data)
            .ok()
            .and_then(|n| self.exports.by_name(n))
        else {
            log::info!(
                "NBD: export name {:?} not found",
                String::from_utf8_lossy(data)
            );
            return Ok(Step::Close);
        };
        if !(self.attach)(&export) {
            return Ok(Step::Close);
        }
        self.w
            .write_all(&export.config.source.size().to_be_bytes())?;
        self.w
            .write_all(&transmission_flags(&export, self.structured).to_be_bytes())?;
        if !self.no_zeroes {
            self.w.write_all(&[0u8; 124])?;
        }
        self.w.flush()?;
        Ok(Step::Go(export))
    }

    fn list(&mut self, data: &[u8]) -> io::Result<Step> {
        if !data.is_empty() {
            return self.error(
                OPT_LIST,
                REP_ERR_INVALID,
                "option 'list' should have zero length",
            );
        }
        for e in self.exports.all().iter().filter(|e| !e.shutting_down()) {
            let name = e.config.name.as_bytes();
            let mut v = Vec::with_capacity(4 + name.len());
            v.extend_from_slice(&(name.len() as u32).to_be_bytes());
            v.extend_from_slice(name);
            v.extend_from_slice(e.config.description.as_deref().unwrap_or("").as_bytes());
            self.reply(OPT_LIST, REP_SERVER, &v)?;
        }
        self.ack(OPT_LIST)
    }

    fn info(&mut self, opt: u32, data: &[u8]) -> io::Result<Step> {
        let mut c = Cursor::new(data);
        let parsed = (|| {
            let name = c.string().filter(|n| n.len() <= MAX_STRING)?;
            let n = c.u16()?;
            let items: Option<Vec<u16>> = (0..n).map(|_| c.u16()).collect();
            Some((name, items?))
        })();
        let Some((name, items)) = parsed.filter(|_| c.is_empty()) else {
            return self.error(opt, REP_ERR_INVALID, "request data length mismatch");
        };
        let name = String::from_utf8_lossy(name).into_owned();
        let Some(export) = self.exports.by_name(&name) else {
            return self.error(
                opt,
                REP_ERR_UNKNOWN,
                &format!("export '{name}' not present"),
            );
        };
        // Attached before the final ACK: once the client may use the
        // export, a `safe` removal must see it.
        if opt == OPT_GO && !(self.attach)(&export) {
            return self.error(
                opt,
                REP_ERR_UNKNOWN,
                &format!("export '{name}' not present"),
            );
        }
        if items.contains(&INFO_NAME) {
            let mut v = INFO_NAME.to_be_bytes().to_vec();
            v.extend_from_slice(export.config.name.as_bytes());
            self.reply(opt, REP_INFO, &v)?;
        }
        if let Some(d) = export.config.description.as_deref() {
            if items.contains(&INFO_DESCRIPTION) {
                let mut v = INFO_DESCRIPTION.to_be_bytes().to_vec();
                v.extend_from_slice(d.as_bytes());
                self.reply(opt, REP_INFO, &v)?;
            }
        }
        // Minimum 1: any alignment is served (the disk bounces what
        // O_DIRECT cannot take); preferred and maximum as QEMU sends them.
        let mut v = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
        for n in [1u32, 4096, MAX_PAYLOAD] {
            v.extend_from_slice(&n.to_be_bytes());
        }
        self.reply(opt, REP_INFO, &v)?;
        let mut v = INFO_EXPORT.to_be_bytes().to_vec();
        v.extend_from_slice(&export.config.source.size().to_be_bytes());
        v.extend_from_slice(&transmission_flags(&export, self.structured).to_be_bytes());
        self.reply(opt, REP_INFO, &v)?;
        self.ack(opt)?;
        Ok(if opt == OPT_GO {
            Step::Go(export)
        } else {
            Step::Next
        })
    }

    fn meta(&mut self, opt: u32, data: &[u8]) -> io::Result<Step> {
        if !self.structured {
            return self.error(
                opt,
                REP_ERR_INVALID,
                &format!(
                    "request option '{}' when structured reply is not negotiated",
                    opt_name(opt)
                ),
            );
        }
        let list = opt == OPT_LIST_META_CONTEXT;
        let mut c = Cursor::new(data);
        let Some(name) = c.string().filter(|n| n.len() <= MAX_STRING) else {
            return self.error(opt, REP_ERR_INVALID, "request data length mismatch");
        };
        let name = String::from_utf8_lossy(name).into_owned();
        let Some(export) = self.exports.by_name(&name) else {
            return self.error(
                opt,
                REP_ERR_UNKNOWN,
                &format!("export '{name}' not present"),
            );
        };
        let Some(n) = c.u32() else {
            return self.error(opt, REP_ERR_INVALID, "request data length mismatch");
        };
        let mut chosen = if list && n == 0 {
            all_contexts(&export)
        } else {
            Vec::new()
        };
        for _ in 0..n {
            let Some(q) = c.string() else {
                return self.error(opt, REP_ERR_INVALID, "request data length mismatch");
            };
            // QEMU ignores over-long queries rather than failing the option.
            if q.len() <= MAX_STRING {
                for ctx in query_contexts(&export, q, list) {
                    if !chosen.contains(&ctx) {
                        chosen.push(ctx);
                    }
                }
            }
        }
        if !c.is_empty() {
            return self.error(opt, REP_ERR_INVALID, "request data length mismatch");
        }
        chosen.sort_by_key(|c| c.id());
        for ctx in &chosen {
            let id = if list { 0 } else { ctx.id() };
            let mut v = id.to_be_bytes().to_vec();
            v.extend_from_slice(ctx.name(&export).as_bytes());
            self.reply(opt, REP_META_CONTEXT, &v)?;
        }
        if !list {
            self.meta = Some((export, chosen));
        }
        self.ack(opt)
    }
}
