//! The byte-level side of QMP: splitting the client's byte stream into JSON
//! messages, and writing messages the way QEMU does.
//!
//! QMP has no framing besides JSON itself: QEMU's clients send objects with
//! or without newlines between them (qemu.qmp sends none), possibly several
//! in one write or one split over many. [`Splitter`] therefore tracks the
//! JSON structure (strings, escapes, bracket nesting) incrementally, in O(n),
//! and hands every complete top-level value to serde_json. Unlike QEMU,
//! which waits forever on `{bad json` because its streamer only counts
//! braces, the splitter also rejects bytes that can never appear outside a
//! JSON string as soon as they arrive, so an interactive user gets an error
//! at once; it then skips to the end of that line to resynchronise. A 0xFF
//! byte resets the parser, as in QEMU.
//!
//! Limits, as QEMU 7.2's `json-streamer.c` sets them: nesting deeper than
//! [`MAX_NESTING`] (1024 open brackets, the outer object included) gets
//! `JSON nesting depth limit exceeded`, a message over the size limit gets
//! `JSON token size limit exceeded`, both as soon as the limit is crossed.
//! QEMU then resets and parses the rest of the refused message as new input
//! (one `expecting value` error per leftover closing bracket); the splitter
//! instead skips the rest of the refused value, counting brackets only, so
//! the client gets one error per refused message and memory stays bounded
//! however deep the input goes. Either way the next message is answered.
//! The size limit is smaller than QEMU's 64 MiB (see [`DEFAULT_MAX_MESSAGE`]);
//! QEMU's 2M-token limit can therefore never be reached.
//!
//! Output follows QEMU's own formatter byte for byte where it matters to
//! picky clients: `", "` and `": "` separators, non-ASCII and control
//! characters as `\uXXXX` escapes, and `\r\n` after every message.

use serde_json::ser::{CharEscape, Formatter};
use serde_json::Value;
use std::io;

/// Default limit on the size of one incoming message, in bytes. QMP
/// commands are small; QEMU allows 64 MiB, but a parsed message costs
/// tens of bytes of memory per input byte and every client may send one at
/// once, so vubd keeps each client's share at a few tens of MiB.
pub const DEFAULT_MAX_MESSAGE: usize = 1 << 20;

/// Deepest accepted nesting of arrays and objects, QEMU's `MAX_NESTING`.
pub const MAX_NESTING: usize = 1024;

/// One unit the splitter produces.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A complete, well-formed JSON value (not necessarily an object).
    Value(Value),
    /// Input that is not JSON (or too large); `String` is the error `desc`.
    Error(String),
}

/// Incremental splitter of a byte stream into JSON values.
#[derive(Debug)]
pub struct Splitter {
    max: usize,
    buf: Vec<u8>,
    /// Open brackets of the value being read (`{` or `[`).
    stack: Vec<u8>,
    in_string: bool,
    escape: bool,
    /// Inside a top-level number or keyword (`5`, `true`).
    in_scalar: bool,
    /// The current value exceeded `max`: its bytes are dropped, not stored.
    oversize: bool,
    /// The current value was refused (too large or too deep); its rest is
    /// skipped. Holds the open bracket count, as the stack is not kept.
    discard: Option<u64>,
    /// After a lexical error: drop input up to and including the next newline.
    skip_line: bool,
}

impl Default for Splitter {
    fn default() -> Self {
        Splitter::new(DEFAULT_MAX_MESSAGE)
    }
}

fn is_scalar_byte(b: u8) -> bool {
    // Digits, number punctuation and the letters of true/false/null.
    matches!(
        b,
        b'0'..=b'9'
            | b'-'
            | b'+'
            | b'.'
            | b'e'
            | b'E'
            | b't'
            | b'r'
            | b'u'
            | b'f'
            | b'a'
            | b'l'
            | b's'
            | b'n'
    )
}

fn describe_byte(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", b as char)
    } else {
        format!("byte 0x{b:02X}")
    }
}

impl Splitter {
    /// A splitter that refuses values larger than `max` bytes.
    pub fn new(max: usize) -> Splitter {
        Splitter {
            max,
            buf: Vec::new(),
            stack: Vec::new(),
            in_string: false,
            escape: false,
            in_scalar: false,
            oversize: false,
            discard: None,
            skip_line: false,
        }
    }

    /// True when a value has started but not ended (what a client that
    /// vanishes mid-message leaves behind).
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
            || self.oversize
            || self.discard.is_some()
            || !self.stack.is_empty()
            || self.in_scalar
    }

    fn reset(&mut self) {
        self.buf.clear();
        self.stack.clear();
        self.in_string = false;
        self.escape = false;
        self.in_scalar = false;
        self.oversize = false;
        self.discard = None;
    }

    fn push(&mut self, b: u8) {
        if self.oversize {
            return;
        }
        if self.buf.len() >= self.max {
            self.oversize = true;
            self.buf = Vec::new();
            return;
        }
        self.buf.push(b);
    }

    fn complete(&mut self, out: &mut Vec<Frame>) {
        let frame = if self.oversize {
            Frame::Error(SIZE_ERROR.into())
        } else {
            match parse(&self.buf) {
                Ok(v) => Frame::Value(v),
                Err(e) => Frame::Error(format!("JSON parse error, {e}")),
            }
        };
        out.push(frame);
        self.reset();
    }

    /// Refuses the value being read and skips its rest; `depth` is its
    /// count of open brackets.
    fn refuse(&mut self, desc: &str, depth: usize, out: &mut Vec<Frame>) {
        out.push(Frame::Error(desc.into()));
        self.buf = Vec::new();
        self.stack.clear();
        self.oversize = false;
        self.discard = Some(depth as u64);
    }

    /// Skips one byte of a refused value, tracking only strings and
    /// bracket depth so that the value's end is found.
    fn discard_byte(&mut self, depth: u64, b: u8, out: &mut Vec<Frame>) {
        if self.in_string {
            if self.escape {
                self.escape = false;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
                if depth == 0 {
                    self.reset();
                }
            }
            return;
        }
        if self.in_scalar {
            if !is_scalar_byte(b) {
                // The top-level scalar ends; the byte is the next input's.
                self.reset();
                self.feed_byte(b, out);
            }
            return;
        }
        let depth = match b {
            b'"' => {
                self.in_string = true;
                depth
            }
            b'{' | b'[' => depth + 1,
            b'}' | b']' => depth.saturating_sub(1),
            _ => depth,
        };
        self.discard = Some(depth);
        if depth == 0 && !self.in_string {
            self.reset();
        }
    }

    fn lexical_error(&mut self, b: u8, out: &mut Vec<Frame>) {
        out.push(Frame::Error(format!(
            "JSON parse error, stray {}",
            describe_byte(b)
        )));
        self.reset();
        self.skip_line = b != b'\n';
    }

    /// Feeds bytes; complete values and errors are appended to `out` in order.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Frame>) {
        for &b in data {
            self.feed_byte(b, out);
            if self.oversize {
                // Still inside the value that outgrew the limit.
                self.refuse(SIZE_ERROR, self.stack.len(), out);
            }
        }
    }

    fn feed_byte(&mut self, b: u8, out: &mut Vec<Frame>) {
        if b == 0xFF {
            // QEMU's documented way for a client to reset the parser.
            if self.has_partial() {
                out.push(Frame::Error("JSON parse error, stray byte 0xFF".into()));
            }
            self.reset();
            self.skip_line = false;
            return;
        }
        if self.skip_line {
            if b == b'\n' {
                self.skip_line = false;
            }
            return;
        }
        if let Some(depth) = self.discard {
            self.discard_byte(depth, b, out);
            return;
        }
        if self.in_string {
            self.push(b);
            if self.escape {
                self.escape = false;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.stack.is_empty() {
                    self.complete(out);
                }
            }
            return;
        }
        if self.in_scalar {
            if is_scalar_byte(b) {
                self.push(b);
                return;
            }
            // Any other byte ends a top-level number or keyword; it is then
            // looked at in its own right below.
            self.in_scalar = false;
            self.complete(out);
        }
        match b {
            b' ' | b'\t' | b'\r' | b'\n' => {
                if !self.stack.is_empty() {
                    self.push(b);
                }
            }
            b'{' | b'[' => {
                if self.stack.len() >= MAX_NESTING {
                    self.refuse(DEPTH_ERROR, self.stack.len() + 1, out);
                    return;
                }
                self.stack.push(b);
                self.push(b);
            }
            b'}' | b']' => {
                let open = if b == b'}' { b'{' } else { b'[' };
                if self.stack.last() != Some(&open) {
                    self.lexical_error(b, out);
                    return;
                }
                self.stack.pop();
                self.push(b);
                if self.stack.is_empty() {
                    self.complete(out);
                }
            }
            b'"' => {
                self.in_string = true;
                self.push(b);
            }
            b',' | b':' => {
                if self.stack.is_empty() {
                    self.lexical_error(b, out);
                    return;
                }
                self.push(b);
            }
            _ if is_scalar_byte(b) => {
                if self.stack.is_empty() {
                    self.in_scalar = true;
                }
                self.push(b);
            }
            _ => self.lexical_error(b, out),
        }
    }
}

const SIZE_ERROR: &str = "JSON token size limit exceeded";
const DEPTH_ERROR: &str = "JSON nesting depth limit exceeded";

/// Parses one complete value. The splitter has already bounded its nesting
/// by [`MAX_NESTING`], so serde_json's own limit (128, lower than QEMU's)
/// is lifted; client threads get a stack sized for that depth.
fn parse(bytes: &[u8]) -> serde_json::Result<Value> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    de.disable_recursion_limit();
    let v = serde::Deserialize::deserialize(&mut de)?;
    de.end()?;
    Ok(v)
}

/// serde_json formatter producing QEMU's layout: `{"a": 1, "b": [1, 2]}`,
/// with every non-ASCII character escaped as `\uXXXX` (uppercase hex,
/// UTF-16 surrogate pairs beyond the BMP).
struct QemuFormatter;

impl Formatter for QemuFormatter {
    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        if fragment.is_ascii() && !fragment.contains('\x7f') {
            return w.write_all(fragment.as_bytes());
        }
        let mut units = [0u16; 2];
        for c in fragment.chars() {
            if c.is_ascii() && c != '\x7f' {
                let mut b = [0u8; 4];
                w.write_all(c.encode_utf8(&mut b).as_bytes())?;
            } else {
                for unit in c.encode_utf16(&mut units) {
                    write!(w, "\\u{:04X}", unit)?;
                }
            }
        }
        Ok(())
    }

    fn write_char_escape<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        escape: CharEscape,
    ) -> io::Result<()> {
        let s: &[u8] = match escape {
            CharEscape::Quote => b"\\\"",
            CharEscape::ReverseSolidus => b"\\\\",
            CharEscape::Solidus => b"\\/",
            CharEscape::Backspace => b"\\b",
            CharEscape::FormFeed => b"\\f",
            CharEscape::LineFeed => b"\\n",
            CharEscape::CarriageReturn => b"\\r",
            CharEscape::Tab => b"\\t",
            CharEscape::AsciiControl(byte) => return write!(w, "\\u{:04X}", byte),
        };
        w.write_all(s)
    }
}

/// Serialises `value` as one QMP wire message, `\r\n` included.
pub fn to_wire(value: &Value) -> String {
    let mut out = Vec::with_capacity(128);
    let mut ser = serde_json::Serializer::with_formatter(&mut out, QemuFormatter);
    // Serialising a Value into a Vec cannot fail: no I/O errors, and
    // serde_json::Value maps only have string keys.
    if serde::Serialize::serialize(value, &mut ser).is_err() {
        out.clear();
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\r\n");
    // The formatter writes only ASCII (everything else is escaped).
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A number with more digits than an f64 holds is rounded correctly
    /// (as QEMU's strtod does), so that what `to_wire` writes reads back
    /// as the same value (found by the qmp_json fuzz target).
    #[test]
    fn long_numbers_round_correctly_and_survive_to_wire() {
        let digits = "2".repeat(115);
        let mut out = Vec::new();
        Splitter::default().feed(format!("{digits} ").as_bytes(), &mut out);
        let Some(Frame::Value(v)) = out.first() else {
            panic!("no value: {out:?}");
        };
        let exact: f64 = digits.parse().expect("std parses it");
        assert_eq!(v.as_f64(), Some(exact));
        let back: Value = serde_json::from_str(&to_wire(v)).expect("valid JSON");
        assert_eq!(&back, v);
    }
    use serde_json::json;

    fn split(chunks: &[&[u8]]) -> Vec<Frame> {
        let mut s = Splitter::new(64);
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, &mut out);
        }
        out
    }

    #[test]
    fn values_without_newlines_and_split_anywhere() {
        let input = br#"{"execute":"a","id":"x}{"}[1,{"b":"\"]"}] "s" 12 true{"c":1}"#;
        let whole = split(&[input]);
        let bytewise: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(whole, split(&bytewise));
        assert_eq!(
            whole,
            vec![
                Frame::Value(json!({"execute": "a", "id": "x}{"})),
                Frame::Value(json!([1, {"b": "\"]"}])),
                Frame::Value(json!("s")),
                Frame::Value(json!(12)),
                Frame::Value(json!(true)),
                Frame::Value(json!({"c": 1})),
            ]
        );
    }

    #[test]
    fn stray_bytes_error_at_once_and_resync_on_newline() {
        let out = split(&[b"{bad json\n", br#"{"ok":1}"#]);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(matches!(&out[0], Frame::Error(e) if e.contains("stray 'b'")));
        assert_eq!(out[1], Frame::Value(json!({"ok": 1})));
        let out = split(&[b"]\n{\"a\":1]\n"]);
        assert!(matches!(&out[0], Frame::Error(_)));
        assert!(matches!(&out[1], Frame::Error(e) if e.contains("']'")));
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn syntax_errors_inside_balanced_values() {
        let out = split(&[br#"{"a":1,}{"a":nul}{"a":2}"#]);
        assert!(matches!(&out[0], Frame::Error(e) if e.starts_with("JSON parse error")));
        assert!(matches!(&out[1], Frame::Error(_)));
        assert_eq!(out[2], Frame::Value(json!({"a": 2})));
    }

    #[test]
    fn oversize_values_are_dropped_with_one_error() {
        let big = format!("{{\"a\":\"{}\"}}{{\"b\":1}}", "x".repeat(500));
        let out = split(&[big.as_bytes()]);
        assert_eq!(out.len(), 2);
        assert_eq!(
            out[0],
            Frame::Error("JSON token size limit exceeded".into())
        );
        assert_eq!(out[1], Frame::Value(json!({"b": 1})));
        // The error comes as soon as the limit is crossed, as in QEMU, and
        // the rest of the value (brackets inside strings included) is skipped.
        let mut s = Splitter::new(64);
        let mut out = Vec::new();
        s.feed(
            format!("[{{\"a\":[\"]]\\\"{}", "x".repeat(100)).as_bytes(),
            &mut out,
        );
        assert_eq!(out.len(), 1);
        s.feed(b"\"]}] 7 ", &mut out);
        assert_eq!(
            out,
            vec![Frame::Error(SIZE_ERROR.into()), Frame::Value(json!(7))]
        );
        let out = split(&[format!("\"{}\" 8 ", "y".repeat(100)).as_bytes()]);
        assert_eq!(
            out,
            vec![Frame::Error(SIZE_ERROR.into()), Frame::Value(json!(8))]
        );
        let out = split(&[format!("{} [8]", "9".repeat(100)).as_bytes()]);
        assert_eq!(
            out,
            vec![Frame::Error(SIZE_ERROR.into()), Frame::Value(json!([8]))]
        );
    }

    fn nested(depth: usize) -> String {
        // The outer object counts as one level, as in QEMU.
        format!(
            "{{\"id\":{}{}}}",
            "[".repeat(depth - 1),
            "]".repeat(depth - 1)
        )
    }

    #[test]
    fn nesting_is_capped_at_qemus_depth() {
        let mut s = Splitter::default();
        let mut out = Vec::new();
        // serde_json alone stops at 128; QEMU takes up to 1024.
        for depth in [129, 200, MAX_NESTING] {
            s.feed(nested(depth).as_bytes(), &mut out);
            assert!(matches!(out.pop(), Some(Frame::Value(_))), "{depth}");
        }
        s.feed(nested(MAX_NESTING + 1).as_bytes(), &mut out);
        s.feed(br#"{"after":1}"#, &mut out);
        assert_eq!(
            out,
            vec![
                Frame::Error("JSON nesting depth limit exceeded".into()),
                Frame::Value(json!({"after": 1})),
            ]
        );
    }

    #[test]
    fn endless_brackets_use_bounded_memory() {
        // 100k open brackets, well within the size limit.
        let mut s = Splitter::default();
        let mut out = Vec::new();
        for _ in 0..100 {
            s.feed(&[b'['; 1000], &mut out);
        }
        assert!(s.stack.capacity() <= MAX_NESTING, "{}", s.stack.capacity());
        assert!(s.buf.capacity() <= 2 * MAX_NESTING, "{}", s.buf.capacity());
        assert_eq!(out, vec![Frame::Error(DEPTH_ERROR.into())]);
        // The same past the size limit.
        let mut s = Splitter::new(1000);
        let mut out = Vec::new();
        for _ in 0..100 {
            s.feed(&[b'['; 1000], &mut out);
            s.feed(br#"{"a":"]}"#, &mut out);
        }
        assert!(s.stack.capacity() <= MAX_NESTING, "{}", s.stack.capacity());
        assert!(s.buf.capacity() <= 1000, "{}", s.buf.capacity());
        assert_eq!(out, vec![Frame::Error(SIZE_ERROR.into())]);
        assert!(s.has_partial());
        s.feed(b"\xff{}", &mut out);
        assert_eq!(out[2], Frame::Value(json!({})));
    }

    #[test]
    fn ff_resets() {
        let out = split(&[b"{\"a\":\xff{\"b\":2}"]);
        assert!(matches!(&out[0], Frame::Error(_)));
        assert_eq!(out[1], Frame::Value(json!({"b": 2})));
    }

    #[test]
    fn partial_input_is_visible() {
        let mut s = Splitter::default();
        let mut out = Vec::new();
        s.feed(b"{\"exec", &mut out);
        assert!(out.is_empty());
        assert!(s.has_partial());
    }

    #[test]
    fn wire_format_matches_qemu() {
        let v = json!({"return": {"a": [1, 2], "s": "\u{e9}\u{1F600}\t\u{1}/"}, "id": null});
        assert_eq!(
            to_wire(&v),
            "{\"return\": {\"a\": [1, 2], \"s\": \"\\u00E9\\uD83D\\uDE00\\t\\u0001/\"}, \"id\": null}\r\n"
        );
    }
}
