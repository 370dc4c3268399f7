//! The NBD wire format: magic numbers, option/command/reply codes, and the
//! encoders and parsers for the fixed-size headers. Everything is
//! big-endian. Nothing here does I/O, so every parser is unit-tested on
//! byte arrays, including the ones a hostile client can send.

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: starts the newstyle handshake and every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags the server sends.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// The server omits the 124 zero bytes after NBD_OPT_EXPORT_NAME if asked.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flag: fixed newstyle.
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: no zeroes after NBD_OPT_EXPORT_NAME.
pub const CLIENT_NO_ZEROES: u32 = 2;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Ends the negotiation without entering transmission.
pub const OPT_ABORT: u32 = 2;
/// Lists the exports.
pub const OPT_LIST: u32 = 3;
/// TLS upgrade (refused: no TLS).
pub const OPT_STARTTLS: u32 = 5;
/// Describes an export.
pub const OPT_INFO: u32 = 6;
/// Describes an export and enters transmission on it.
pub const OPT_GO: u32 = 7;
/// Structured replies for READ and BLOCK_STATUS.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Lists metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Selects metadata contexts for BLOCK_STATUS.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply types.
pub const REP_ACK: u32 = 1;
/// One export of NBD_OPT_LIST.
pub const REP_SERVER: u32 = 2;
/// One information item of NBD_OPT_INFO/GO.
pub const REP_INFO: u32 = 3;
/// One metadata context.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// Unknown option.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Forbidden by policy (STARTTLS without TLS).
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// Malformed option.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// Unknown export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// Option too large to process.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// Information items of NBD_OPT_INFO/GO.
pub const INFO_EXPORT: u16 = 0;
/// The export's name.
pub const INFO_NAME: u16 = 1;
/// The export's description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1;
/// The export is read-only.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// FLUSH is supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// FUA is supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// TRIM is supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// WRITE_ZEROES is supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// The DF flag of READ is supported (structured replies only).
pub const TF_SEND_DF: u16 = 1 << 7;
/// Several connections see each other's writes and flushes.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// CACHE is supported.
pub const TF_SEND_CACHE: u16 = 1 << 10;

/// Commands.
pub const CMD_READ: u16 = 0;
/// Write.
pub const CMD_WRITE: u16 = 1;
/// Disconnect.
pub const CMD_DISC: u16 = 2;
/// Flush.
pub const CMD_FLUSH: u16 = 3;
/// Trim (discard).
pub const CMD_TRIM: u16 = 4;
/// Prefetch.
pub const CMD_CACHE: u16 = 5;
/// Write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Block status.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1;
/// WRITE_ZEROES must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// READ must come in one chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// BLOCK_STATUS: one extent per context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

/// Structured reply chunk flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1;
/// Chunk types.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// A range that reads as zeroes.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Extents of one metadata context.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// An error for the whole request.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// base:allocation: the range is not allocated.
pub const STATE_HOLE: u32 = 1;
/// base:allocation: the range reads as zeroes.
pub const STATE_ZERO: u32 = 2;
/// qemu:dirty-bitmap: the range is dirty.
pub const STATE_DIRTY: u32 = 1;

/// Error numbers on the wire (the NBD protocol's, Linux values).
pub const EPERM: u32 = 1;
/// I/O error.
pub const EIO: u32 = 5;
/// Invalid request.
pub const EINVAL: u32 = 22;
/// No space.
pub const ENOSPC: u32 = 28;

/// Largest READ/WRITE payload (QEMU's NBD_MAX_BUFFER_SIZE).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Longest export name, description or context query (NBD_MAX_STRING_SIZE).
pub const MAX_STRING: usize = 4096;

/// The name of an option, for error messages.
pub fn opt_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "export name",
        OPT_ABORT => "abort",
        OPT_LIST => "list",
        OPT_STARTTLS => "starttls",
        OPT_INFO => "info",
        OPT_GO => "go",
        OPT_STRUCTURED_REPLY => "structured reply",
        OPT_LIST_META_CONTEXT => "list meta context",
        OPT_SET_META_CONTEXT => "set meta context",
        _ => "unknown",
    }
}

/// A transmission request header (28 bytes on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Opaque handle echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u32,
}

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;

impl Request {
    /// Parses a request header; `None` if the magic is wrong (the client
    /// is not speaking NBD: the connection is dropped).
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        if be32(&b[0..4]) != REQUEST_MAGIC {
            return None;
        }
        Some(Request {
            flags: be16(&b[4..6]),
            kind: be16(&b[6..8]),
            handle: be64(&b[8..16]),
            offset: be64(&b[16..24]),
            len: be32(&b[24..28]),
        })
    }

    /// Encodes a request (for tests and clients).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.kind.to_be_bytes());
        b[8..16].copy_from_slice(&self.handle.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// A simple reply header.
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A structured reply chunk header for a payload of `len` bytes.
pub fn chunk_header(flags: u16, kind: u16, handle: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// An option reply header for a payload of `len` bytes.
pub fn option_reply(opt: u32, kind: u32, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&opt.to_be_bytes());
    b[12..16].copy_from_slice(&kind.to_be_bytes());
    b[16..20].copy_from_slice(&len.to_be_bytes());
    b
}

/// The payload of a BLOCK_STATUS chunk: context id, then (length, flags)
/// per extent.
pub fn block_status_payload(context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + 8 * extents.len());
    v.extend_from_slice(&context.to_be_bytes());
    for (len, flags) in extents {
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
    }
    v
}

/// The payload of an ERROR chunk.
pub fn error_payload(error: u32, msg: &str) -> Vec<u8> {
    let msg = &msg.as_bytes()[..msg.len().min(u16::MAX as usize)];
    let mut v = Vec::with_capacity(6 + msg.len());
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// Big-endian u16 from the first 2 bytes of `b` (callers pass exact slices).
pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// Big-endian u32 from the first 4 bytes of `b`.
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Big-endian u64 from the first 8 bytes of `b`.
pub fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Reads fields out of an option's payload, failing (not panicking) on a
/// payload shorter than its own length fields say.
#[derive(Debug)]
pub struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// Starts at the beginning of `data`.
    pub fn new(data: &'a [u8]) -> Cursor<'a> {
        Cursor { data }
    }

    /// Takes `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.data.len() {
            return None;
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Some(head)
    }

    /// Takes a big-endian u16.
    pub fn u16(&mut self) -> Option<u16> {
        self.bytes(2).map(be16)
    }

    /// Takes a big-endian u32.
    pub fn u32(&mut self) -> Option<u32> {
        self.bytes(4).map(be32)
    }

    /// Takes a string preceded by its u32 length.
    pub fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()?;
        self.bytes(usize::try_from(n).ok()?)
    }

    /// True once every byte has been taken.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            handle: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            len: 4096,
        };
        let b = r.encode();
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(Request::parse(&b), Some(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert_eq!(Request::parse(&bad), None);
    }

    #[test]
    fn reply_headers_are_laid_out_as_the_protocol_says() {
        assert_eq!(
            simple_reply(EINVAL, 7),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 7]
        );
        let c = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_HOLE, 9, 12);
        assert_eq!(&c[..8], &[0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 2]);
        assert_eq!(&c[16..], &[0, 0, 0, 12]);
        let o = option_reply(OPT_GO, REP_ERR_UNKNOWN, 3);
        assert_eq!(&o[..8], &[0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
        assert_eq!(&o[8..], &[0, 0, 0, 7, 0x80, 0, 0, 6, 0, 0, 0, 3]);
        assert_eq!(
            block_status_payload(2, &[(4096, STATE_DIRTY), (512, 0)]),
            [0, 0, 0, 2, 0, 0, 16, 0, 0, 0, 0, 1, 0, 0, 2, 0, 0, 0, 0, 0]
        );
        assert_eq!(error_payload(EIO, "ab"), [0, 0, 0, 5, 0, 2, b'a', b'b']);
    }

    #[test]
    fn cursor_refuses_lengths_beyond_the_payload() {
        let data = [0, 0, 0, 3, b'a', b'b', b'c', 0, 0, 0, 9, b'x'];
        let mut c = Cursor::new(&data);
        assert_eq!(c.string(), Some(&b"abc"[..]));
        assert_eq!(c.string(), None);
        let mut c = Cursor::new(&[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(c.string(), None);
        let mut c = Cursor::new(&[1]);
        assert_eq!(c.u16(), None);
        assert!(Cursor::new(&[]).is_empty());
    }
}
