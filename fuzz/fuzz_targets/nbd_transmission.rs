//! The NBD transmission phase on its own (the handshake target reaches it
//! only through a valid negotiation): the input is the request stream of
//! a client that negotiated what the first byte says.
//!
//! Input: byte 0: bit 0 structured replies; bits 1-3 which metadata
//! contexts (base:allocation, qemu:allocation-depth, qemu:dirty-bitmap:b0);
//! then the requests.
//!
//! Checks: the server never panics, and answers until the stream ends.

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::Duration;
use vubd_backend::nbd::handshake::{Context, Negotiated};
use vubd_backend::nbd::transmission::serve;
use vubd_fuzz::{nbd_exports, ClientBytes};

fuzz_target!(|input: &[u8]| {
    let Some((&mode, requests)) = input.split_first() else {
        return;
    };
    let Some(export) = nbd_exports().by_name("disk0") else {
        return;
    };
    let structured = mode & 1 != 0;
    let contexts = [
        Context::BaseAllocation,
        Context::AllocationDepth,
        Context::Bitmap(0),
    ]
    .into_iter()
    .enumerate()
    .filter(|(i, _)| structured && mode & (2 << i) != 0)
    .map(|(_, c)| c)
    .collect();
    let n = Negotiated {
        export,
        structured,
        contexts,
    };
    let mut out = Vec::new();
    let _ = serve(
        &mut ClientBytes(requests),
        &mut out,
        &n,
        Duration::from_secs(60),
    );
});
