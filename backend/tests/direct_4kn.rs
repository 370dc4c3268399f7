//! O_DIRECT on a disk with 4096-byte logical blocks (a loop device with
//! `--sector-size 4096`): the alignment comes from the kernel (statx
//! STATX_DIOALIGN), so buffers that suit a 512-byte disk but not this one
//! go through the bounce buffer instead of failing with EINVAL.
//!
//! Needs root (losetup); without it the test says it skipped.

use std::path::PathBuf;
use std::process::Command;
use vubd_backend::{Disk, IoBuf, RawImage, RawImageOptions};

/// A 4Kn loop device over a file in the temp directory.
struct Loop4k {
    dev: PathBuf,
    backing: PathBuf,
}

impl Loop4k {
    fn new() -> Option<Loop4k> {
        let backing = std::env::temp_dir().join(format!("vubd-4kn-{}", std::process::id()));
        std::fs::File::create(&backing)
            .and_then(|f| f.set_len(1 << 20))
            .ok()?;
        let out = Command::new("losetup")
            .args(["--sector-size", "4096", "-f", "--show"])
            .arg(&backing)
            .output()
            .ok()
            .filter(|o| o.status.success());
        let Some(out) = out else {
            eprintln!("SKIPPED: cannot set up a loop device (needs root and losetup)");
            let _ = std::fs::remove_file(&backing);
            return None;
        };
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(Loop4k { dev, backing })
    }
}

impl Drop for Loop4k {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        let _ = std::fs::remove_file(&self.backing);
    }
}

/// A page-aligned heap buffer of `len` bytes.
fn page_buf(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len + 4096];
    let skip = v.as_ptr().align_offset(4096);
    v.drain(..skip);
    v.truncate(len);
    v
}

#[test]
fn a_4kn_disk_gets_its_alignment_from_the_kernel() {
    let Some(lo) = Loop4k::new() else {
        return;
    };
    let opts = RawImageOptions {
        read_only: false,
        direct: true,
    };
    let img = RawImage::open(&lo.dev, opts).expect("open the loop device with O_DIRECT");
    let (mem, off) = img.direct_io_alignment();
    assert_eq!(off, 4096, "offset alignment {off} on a 4Kn disk");
    assert!(
        mem.is_power_of_two() && mem <= 4096,
        "memory alignment {mem}"
    );
    let disk = Disk::new(Box::new(img), false);

    // 512-aligned pieces of 2048 and 6144 bytes: fine for a 512-byte disk,
    // not for this one (each iovec must span whole 4096-byte blocks).
    let mut data = page_buf(8192);
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i % 253) as u8;
    }
    let expect = data.clone();
    let (a, b) = data.split_at_mut(2048);
    disk.write(4096, &[IoBuf::from_slice(a), IoBuf::from_slice(b)])
        .expect("write of 512-aligned pieces on a 4Kn disk");
    let mut back = page_buf(8192);
    let (a, b) = back.split_at_mut(2048);
    disk.read(4096, &[IoBuf::from_slice(a), IoBuf::from_slice(b)])
        .expect("read of 512-aligned pieces on a 4Kn disk");
    assert!(back == expect, "data differs after the round trip");
}
