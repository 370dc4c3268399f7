//! Landlock self-confinement: once started, vubd can reach only its image,
//! the directories beside it and its sockets, and the `--allow-dir`
//! directories, whatever a QMP client or a compromised thread asks for.
//!
//! The kernel applies a ruleset to the calling thread and to the threads it
//! starts afterwards (without TSYNC, ABI 8, not to threads already running),
//! so [`restrict`] must run before vubd starts its first thread. Network
//! access is not handled: NBD clients and servers keep using TCP.

use landlock::{
    path_beneath_rules, Access, AccessFs, CompatLevel, Compatible, RestrictionStatus, Ruleset,
    RulesetAttr, RulesetCreatedAttr, RulesetError, ABI,
};
use std::path::{Path, PathBuf};

/// Values of `--landlock`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Confine the daemon (best effort: what the kernel supports).
    Enforce,
    /// Do not confine.
    None,
}

/// The newest ABI whose rights vubd hands out. ABI 9 adds a right to
/// connect to unix sockets, which would also confine the NBD client's
/// connections; `--allow-dir` is about files, not peers.
const TARGET: ABI = ABI::V8;

/// Paths the confined daemon may still reach.
#[derive(Debug, Default, Clone)]
pub struct Reach {
    /// Everything beneath these (or, for a file, the file itself).
    pub read_write: Vec<PathBuf>,
    /// Read access beneath these.
    pub read_only: Vec<PathBuf>,
}

impl Reach {
    /// What a daemon serving `image` needs: the image's directory (its
    /// sidecars are created and renamed there) or, for a device, the device
    /// node alone; the `allow` directories; the directories of `sockets`
    /// (bound, and the vhost-user relay's private directory beside them);
    /// and what std and the kernel interfaces read.
    pub fn for_daemon(
        image: &Path,
        allow: &[PathBuf],
        sockets: &[&Path],
    ) -> std::io::Result<Reach> {
        let mut read_write: Vec<PathBuf> = allow.to_vec();
        let image = std::path::absolute(image)?;
        if std::fs::metadata(&image)?.is_file() {
            read_write.push(parent(&image));
        } else {
            // A block device: not every node beside it (all of /dev).
            read_write.push(image);
        }
        for socket in sockets {
            read_write.push(parent(&std::path::absolute(socket)?));
        }
        let read_only = ["/proc", "/sys", "/dev/null", "/dev/urandom"]
            .map(PathBuf::from)
            .to_vec();
        Ok(Reach {
            read_write,
            read_only,
        })
    }
}

fn parent(path: &Path) -> PathBuf {
    path.parent().map_or_else(|| "/".into(), Path::to_path_buf)
}

/// Confines the calling thread, and the threads it starts from now on, to
/// `reach`. Paths that do not exist are left out (nothing can be reached
/// there). Best effort: an older kernel enforces what it knows, and a
/// kernel without Landlock nothing (the returned status says so).
pub fn restrict(reach: &Reach) -> Result<RestrictionStatus, RulesetError> {
    let all = AccessFs::from_all(TARGET);
    Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)?
        .create()?
        .add_rules(path_beneath_rules(&reach.read_write, all))?
        .add_rules(path_beneath_rules(
            &reach.read_only,
            AccessFs::from_read(TARGET),
        ))?
        .restrict_self()
}

/// One line for the log: what the kernel enforces.
pub fn describe(status: &RestrictionStatus) -> String {
    match status.landlock {
        landlock::LandlockStatus::Available { effective_abi, .. } => {
            format!("Landlock {effective_abi:?}: {:?}", status.ruleset)
        }
        other => format!("Landlock not enforced ({other:?})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::io::ErrorKind;

    /// Names the directories of [`confined_child`]: allowed, then forbidden.
    const CHILD_ENV: &str = "VUBD_LANDLOCK_CHILD";

    fn fresh_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vubd-landlock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("test dir");
        d
    }

    fn write(path: &Path, create: bool) -> std::io::Result<std::fs::File> {
        OpenOptions::new().write(true).create_new(create).open(path)
    }

    /// The real kernel confines a process (this test binary, run again, so
    /// that the parent stays free) with the ruleset vubd builds for an
    /// image in A: A stays writable, B and /etc are out of reach even for
    /// root, /proc stays readable.
    #[test]
    fn confines_to_the_image_directory() {
        let (a, b) = (fresh_dir("a"), fresh_dir("b"));
        std::fs::write(b.join("victim"), b"x").expect("victim");
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["landlock::tests::confined_child", "--exact", "--ignored"])
            .args(["--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, format!("{}:{}", a.display(), b.display()))
            .output()
            .expect("run the child");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let _ = (std::fs::remove_dir_all(&a), std::fs::remove_dir_all(&b));
        if text.contains("SKIPPED") {
            eprintln!("SKIPPED: no Landlock in this kernel");
            return;
        }
        assert!(out.status.success(), "confined child failed:\n{text}");
        assert!(text.contains("1 passed"), "the child did not run:\n{text}");
    }

    /// Run by [`confines_to_the_image_directory`] only.
    #[test]
    #[ignore = "run by confines_to_the_image_directory in its own process"]
    fn confined_child() {
        let Ok(dirs) = std::env::var(CHILD_ENV) else {
            return;
        };
        let (a, b) = dirs.split_once(':').expect("two directories");
        let (a, b) = (Path::new(a), Path::new(b));
        let image = a.join("disk.img");
        std::fs::write(&image, [0u8; 512]).expect("image");
        let reach =
            Reach::for_daemon(&image, &[a.to_path_buf()], &[&a.join("vubd.sock")]).expect("reach");
        let status = restrict(&reach).expect("restrict");
        if status.ruleset == landlock::RulesetStatus::NotEnforced {
            println!("SKIPPED");
            return;
        }
        write(&a.join("new"), true).expect("create a file beside the image");
        write(&image, false).expect("write the image");
        std::fs::read_to_string("/proc/self/status").expect("read /proc");
        for (what, r) in [
            ("create in B", write(&b.join("new"), true)),
            ("write B/victim", write(&b.join("victim"), false)),
            (
                "write /etc/hostname",
                write(Path::new("/etc/hostname"), false),
            ),
        ] {
            let e = r.err().unwrap_or_else(|| panic!("{what}: allowed"));
            assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{what}: {e}");
        }
    }
}
