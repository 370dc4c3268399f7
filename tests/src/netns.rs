//! Two network namespaces joined by a veth pair, for migration tests that
//! need a real network between a source and a destination daemon, and the
//! kernel's fault injection on it: the link taken down and up, queueing
//! disciplines (`tc`), random packet loss (nftables), per-namespace TCP
//! settings.
//!
//! Each [`Link`] has its own namespaces (unique names, so tests run in
//! parallel); inside them the interfaces are both `eth0` and the addresses
//! are always [`SOURCE_ADDR`] and [`DESTINATION_ADDR`]. Dropping the link
//! deletes both namespaces, which destroys the veth pair; this also runs
//! while a failed test unwinds. Processes still running inside keep their
//! namespace alive, so drop daemons first (declare the link before them).

use anyhow::{bail, ensure, Context, Result};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};

/// The source end's address.
pub const SOURCE_ADDR: &str = "10.77.0.1";
/// The destination end's address.
pub const DESTINATION_ADDR: &str = "10.77.0.2";
/// The veth interface's name in both namespaces.
pub const IFACE: &str = "eth0";
/// The nftables table [`Link::set_loss`] adds in a namespace.
const LOSS_TABLE: &str = "vubd_loss";

/// One end of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Where the mirror's source runs.
    Source,
    /// Where the destination's NBD server runs.
    Destination,
}

/// Why a queueing discipline could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum QdiscError {
    /// The running kernel has no such qdisc (e.g. no sch_netem module).
    #[error("this kernel has no '{0}' qdisc")]
    Unavailable(String),
    /// `tc` failed for another reason.
    #[error("tc failed: {0}")]
    Failed(String),
}

/// Byte counters of one end's interface.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
}

/// Two namespaces and the veth pair between them; deleted on drop.
pub struct Link {
    source: String,
    destination: String,
}

fn check(what: &str, out: std::io::Result<Output>) -> Result<Output> {
    let out = out.with_context(|| format!("cannot run {what}"))?;
    ensure!(
        out.status.success(),
        "{what}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(out)
}

fn ip(args: &[&str]) -> Result<Output> {
    check(
        &format!("ip {}", args.join(" ")),
        Command::new("ip").args(args).output(),
    )
}

impl Link {
    /// Creates the namespaces (named after `tag`), the veth pair, the
    /// addresses, and brings every interface up.
    pub fn new(tag: &str) -> Result<Link> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let base = format!("vubd-{tag}-{}-{n}", std::process::id());
        let link = Link {
            source: format!("{base}-src"),
            destination: format!("{base}-dst"),
        };
        // Created one by one so that drop (which deletes both) has
        // something to clean up whichever step fails.
        ip(&["netns", "add", &link.source])?;
        let dst = ip(&["netns", "add", &link.destination]);
        if let Err(e) = dst {
            let _ = ip(&["netns", "del", &link.source]);
            return Err(e);
        }
        ip(&[
            "link",
            "add",
            IFACE,
            "netns",
            &link.source,
            "type",
            "veth",
            "peer",
            "name",
            IFACE,
            "netns",
            &link.destination,
        ])?;
        for (ns, addr) in [
            (&link.source, SOURCE_ADDR),
            (&link.destination, DESTINATION_ADDR),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", IFACE])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&["-n", ns, "link", "set", IFACE, "up"])?;
        }
        Ok(link)
    }

    /// The namespace of `side`.
    pub fn netns(&self, side: Side) -> &str {
        match side {
            Side::Source => &self.source,
            Side::Destination => &self.destination,
        }
    }

    /// The address of `side`.
    pub fn addr(side: Side) -> &'static str {
        match side {
            Side::Source => SOURCE_ADDR,
            Side::Destination => DESTINATION_ADDR,
        }
    }

    /// A command that runs `program` inside `side`'s namespace.
    pub fn command(&self, side: Side, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", self.netns(side), program]);
        c
    }

    /// Runs `program args` inside `side`'s namespace; requires success and
    /// returns its stdout.
    pub fn run(&self, side: Side, program: &str, args: &[&str]) -> Result<String> {
        let out = check(
            &format!("{program} {} (in {})", args.join(" "), self.netns(side)),
            self.command(side, program).args(args).output(),
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Takes `side`'s interface down (`up == false`) or up again: its peer
    /// loses its carrier, and packets sent meanwhile are lost, as when a
    /// cable is pulled. Connections stay open until TCP gives up on them
    /// (see [`Link::set_tcp_retries`]).
    pub fn set_link(&self, side: Side, up: bool) -> Result<()> {
        let state = if up { "up" } else { "down" };
        ip(&["-n", self.netns(side), "link", "set", IFACE, state])?;
        Ok(())
    }

    /// Sets `net.ipv4.tcp_retries2` in `side`'s namespace: how many
    /// retransmissions TCP makes before it drops a connection whose peer
    /// stopped answering (15, about 15 minutes, by default; 3 is about 3 s).
    pub fn set_tcp_retries(&self, side: Side, retries: u32) -> Result<()> {
        self.run(
            side,
            "sysctl",
            &["-q", "-w", &format!("net.ipv4.tcp_retries2={retries}")],
        )?;
        Ok(())
    }

    /// Replaces the root qdisc of `side`'s interface with `kind args`,
    /// e.g. `("netem", &["delay", "1ms"])` or `("tbf", &["rate", "1gbit",
    /// "burst", "256kb", "latency", "10ms"])`.
    pub fn set_qdisc(&self, side: Side, kind: &str, args: &[&str]) -> Result<(), QdiscError> {
        let mut c = self.command(side, "tc");
        c.args(["qdisc", "replace", "dev", IFACE, "root", kind])
            .args(args);
        let out = c
            .output()
            .map_err(|e| QdiscError::Failed(format!("cannot run tc: {e}")))?;
        if out.status.success() {
            return Ok(());
        }
        let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if err.contains("qdisc kind is unknown") {
            Err(QdiscError::Unavailable(kind.to_string()))
        } else {
            Err(QdiscError::Failed(err))
        }
    }

    /// Removes what [`Link::set_qdisc`] installed (back to the default).
    pub fn clear_qdisc(&self, side: Side) -> Result<()> {
        self.run(side, "tc", &["qdisc", "del", "dev", IFACE, "root"])?;
        Ok(())
    }

    /// Drops `percent` of the packets `side` receives and of those it
    /// sends, at random (nftables' `numgen random`; this stands in for
    /// netem's `loss`, which kernels without `sch_netem` lack). 100 makes
    /// a black hole with the link still up; [`Link::clear_loss`] ends it.
    pub fn set_loss(&self, side: Side, percent: u32) -> Result<()> {
        let _ = self.clear_loss(side);
        let matches = if percent >= 100 {
            String::new()
        } else {
            format!("numgen random mod 100 < {percent} ")
        };
        let rule = |chain: &str, hook: &str| {
            format!(
                "add chain inet {LOSS_TABLE} {chain} {{ type filter hook {hook} priority 0 ; }} ; \
                 add rule inet {LOSS_TABLE} {chain} {matches}counter drop"
            )
        };
        let script = format!(
            "add table inet {LOSS_TABLE} ; {} ; {}",
            rule("lossin", "input"),
            rule("lossout", "output")
        );
        self.run(side, "nft", &[&script])?;
        Ok(())
    }

    /// Packets [`Link::set_loss`] has dropped in `side` so far.
    pub fn dropped(&self, side: Side) -> Result<u64> {
        let out = self.run(side, "nft", &["list", "table", "inet", LOSS_TABLE])?;
        let mut total = 0;
        for line in out.lines() {
            let mut words = line.split_whitespace();
            while let Some(w) = words.next() {
                if w == "packets" {
                    total += words
                        .next()
                        .context("nft: no count after 'packets'")?
                        .parse::<u64>()?;
                }
            }
        }
        Ok(total)
    }

    /// Removes what [`Link::set_loss`] installed.
    pub fn clear_loss(&self, side: Side) -> Result<()> {
        self.run(side, "nft", &["delete", "table", "inet", LOSS_TABLE])?;
        Ok(())
    }

    /// The byte counters of `side`'s interface.
    pub fn counters(&self, side: Side) -> Result<Counters> {
        let dir = format!("/sys/class/net/{IFACE}/statistics");
        // `ip netns exec` mounts the namespace's own sysfs for the command.
        let out = self.run(
            side,
            "cat",
            &[&format!("{dir}/rx_bytes"), &format!("{dir}/tx_bytes")],
        )?;
        let mut n = out.split_whitespace().map(str::parse::<u64>);
        match (n.next(), n.next()) {
            (Some(Ok(rx_bytes)), Some(Ok(tx_bytes))) => Ok(Counters { rx_bytes, tx_bytes }),
            _ => bail!("unreadable interface counters: {out:?}"),
        }
    }

    /// How many established TCP connections in `side`'s namespace have
    /// `port` at either end (from its /proc/net/tcp).
    pub fn established(&self, side: Side, port: u16) -> Result<usize> {
        let table = self.run(side, "cat", &["/proc/net/tcp"])?;
        let port = format!(":{port:04X}");
        Ok(table
            .lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                // local, remote, state ("01" is ESTABLISHED)
                f.len() > 3 && f[3] == "01" && (f[1].ends_with(&port) || f[2].ends_with(&port))
            })
            .count())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.source]);
        let _ = ip(&["netns", "del", &self.destination]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Needs root (CAP_NET_ADMIN), as the migration tests do.
    #[test]
    fn link_carries_tcp_and_goes_down_and_away() -> Result<()> {
        let link = Link::new("selftest")?;
        let src = link.netns(Side::Source).to_string();
        let before = link.counters(Side::Source)?;
        // A TCP round trip across the link: a listener in the destination.
        let mut server = link
            .command(Side::Destination, "nbdkit")
            .args(["-f", "-i", DESTINATION_ADDR, "-p", "10809", "memory", "1M"])
            .spawn()?;
        let probe = || {
            link.run(
                Side::Source,
                "nbdinfo",
                &["--size", &format!("nbd://{DESTINATION_ADDR}:10809")],
            )
        };
        let mut size = probe();
        for _ in 0..200 {
            if size.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
            size = probe();
        }
        let size = size?;
        assert_eq!(size.trim(), "1048576");
        assert!(link.counters(Side::Source)?.tx_bytes > before.tx_bytes);
        // The peer of a downed end loses its carrier (a flag the kernel
        // sets at once; operstate follows later).
        let carrier = || -> Result<bool> {
            let l = link.run(Side::Source, "ip", &["-o", "link", "show", IFACE])?;
            Ok(!l.contains("NO-CARRIER"))
        };
        link.set_link(Side::Destination, false)?;
        assert!(!carrier()?);
        link.set_link(Side::Destination, true)?;
        assert!(carrier()?);
        let _ = server.kill();
        let _ = server.wait();
        drop(link);
        let list =
            String::from_utf8_lossy(&Command::new("ip").args(["netns", "list"]).output()?.stdout)
                .into_owned();
        assert!(!list.contains(&src), "namespace {src} left behind");
        Ok(())
    }
}
