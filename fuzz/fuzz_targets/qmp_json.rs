//! The QMP byte-stream splitter, fed the input in pieces (as a socket
//! delivers it), and QEMU-style output of what it parsed.
//!
//! Input: one byte choosing the piece size, then the stream.
//! Checks: whatever the split, the same frames come out; every parsed value
//! written with `to_wire` reads back as the same value.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vubd_backend::qmp::json::{to_wire, Frame, Splitter};

/// A small cap, so that the oversize path is reached by small inputs.
const MAX: usize = 4096;

fn split(data: &[u8], piece: usize) -> (Vec<Frame>, bool) {
    let mut s = Splitter::new(MAX);
    let mut out = Vec::new();
    for chunk in data.chunks(piece.max(1)) {
        s.feed(chunk, &mut out);
    }
    (out, s.has_partial())
}

fuzz_target!(|input: &[u8]| {
    let Some((&piece, data)) = input.split_first() else {
        return;
    };
    let whole = split(data, data.len());
    let pieces = split(data, usize::from(piece % 17));
    assert_eq!(whole, pieces, "frames depend on how the stream was split");
    for frame in &whole.0 {
        if let Frame::Value(v) = frame {
            let wire = to_wire(v);
            let back: serde_json::Value =
                serde_json::from_str(&wire).expect("to_wire wrote invalid JSON");
            assert_eq!(&back, v, "to_wire changed the value: {wire}");
        }
    }
});
