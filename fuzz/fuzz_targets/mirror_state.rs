//! The mirror state file loader (`IMAGE.vubd-mirror`), as a restart runs
//! it: the input is the file's content, written to tmpfs and opened.
//!
//! The header carries a checksum that random bytes never match: when the
//! first input byte is odd, the target writes the right checksum over the
//! header's last 8 bytes (FNV-1a of the 4088 before), so that the fuzzer
//! reaches the fields behind it.
//!
//! Checks: opening never panics; an opened file's bitmap covers the disk
//! the header names.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vubd_backend::mirror::state_file::StateFile;

const HEADER: usize = 4096;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, content)) = input.split_first() else {
        return;
    };
    let mut content = content.to_vec();
    if mode & 1 == 1 && content.len() >= HEADER {
        let sum = fnv1a(&content[..HEADER - 8]);
        content[HEADER - 8..HEADER].copy_from_slice(&sum.to_le_bytes());
    }
    let path = vubd_fuzz::scratch_dir().join("state.vubd-mirror");
    std::fs::write(&path, &content).expect("cannot write the state file");
    if let Ok(Some(state)) = StateFile::open(&path) {
        let h = state.header();
        assert_eq!(state.bits().len(), h.disk_size.div_ceil(h.granularity));
        let _ = state.bits().count();
    }
    let _ = std::fs::remove_file(&path);
});
