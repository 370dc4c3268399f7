//! What a daemon holds, read from /proc: tests of hostile clients check
//! that threads and descriptors return to where they were once the
//! clients are gone.

use anyhow::{bail, Result};
use std::time::{Duration, Instant};

/// Threads and open descriptors of process `pid`.
pub fn threads_and_fds(pid: u32) -> Result<(usize, usize)> {
    let count = |what: &str| -> Result<usize> {
        Ok(std::fs::read_dir(format!("/proc/{pid}/{what}"))?.count())
    };
    Ok((count("task")?, count("fd")?))
}

/// Threads and descriptors once start-up has finished opening things:
/// unchanged over five readings 100 ms apart.
pub fn settled(pid: u32) -> Result<(usize, usize)> {
    let mut last = threads_and_fds(pid)?;
    let mut same = 0;
    while same < 5 {
        std::thread::sleep(Duration::from_millis(100));
        let now = threads_and_fds(pid)?;
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    Ok(last)
}

/// Waits until `pid` is back to `base` threads and descriptors; `timeout`
/// only guards against a hang (clients' threads end asynchronously).
pub fn wait_back_to(pid: u32, base: (usize, usize), timeout: Duration, after: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        let now = threads_and_fds(pid)?;
        if now == base {
            return Ok(());
        }
        if start.elapsed() > timeout {
            bail!("after {after}: (threads, fds) {now:?}, before {base:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
