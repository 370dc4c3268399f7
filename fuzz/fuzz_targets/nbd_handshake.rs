//! The NBD server's option haggling and then, if the client got as far,
//! its transmission phase: the input is everything a client sends on one
//! connection, served from a writable export of a real disk.
//!
//! Checks: the server never panics and never waits (the input ends with
//! end of stream, which must end the connection).

#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};
use vubd_backend::nbd::handshake::negotiate;
use vubd_backend::nbd::transmission::serve;
use vubd_fuzz::{nbd_exports, ClientBytes};

fuzz_target!(|input: &[u8]| {
    let exports = nbd_exports();
    let mut client = ClientBytes(input);
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    if let Ok(Some(n)) = negotiate(&mut client, &mut out, exports, deadline, &|_| true) {
        let _ = serve(&mut client, &mut out, &n, Duration::from_secs(60));
    }
});
