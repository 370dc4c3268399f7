//! `vubd`: serves one disk image to a vhost-user frontend (QEMU,
//! cloud-hypervisor, libblkio) as a virtio-blk device.

use anyhow::{bail, Context, Result};
use clap::Parser;
use log::info;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use vhost_glue::config_space::AioEngine;
use vhost_glue::management::{DaemonContext, ShutdownReason, HOLD_FIRST_TIMEOUT};
use vhost_glue::server::{bind_socket, Server};
use vhost_glue::DeviceConfig;
use vhost_glue::{landlock, seccomp};
use vubd_backend::dirty::{sidecar_path, DirtyTracker, FileStore, MetaStore, TrackerConfig};
use vubd_backend::graph::qmp as graph_qmp;
use vubd_backend::mirror::pivot_marker;
use vubd_backend::qmp::{standard_dispatcher, EventBus, QmpServer, ServerConfig};
use vubd_backend::unix_socket::SocketOptions;
use vubd_backend::{Disk, RawImage, RawImageOptions};

/// vhost-user-blk daemon: serves a disk image to a VM over a vhost-user socket.
#[derive(Parser, Debug)]
#[command(name = "vubd", version, about, long_about = None)]
struct Options {
    /// Path of the vhost-user socket to listen on (created with
    /// --socket-mode and --socket-group).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The disk image (a raw file or block device).
    #[arg(long, value_name = "PATH")]
    image: PathBuf,
    /// Number of virtqueues.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    queues: u16,
    /// Worker threads serving the queues, at most one per queue (queue q
    /// runs on thread q mod N; default: one per queue). Fewer threads than
    /// queues leave cores to other work, at some cost in speed.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    threads: Option<u16>,
    /// Maximum virtqueue size: a power of two from 2 to 1024.
    #[arg(long, value_name = "N", default_value_t = 256, value_parser = parse_queue_size)]
    queue_size: u16,
    /// Offer a read-only disk (VIRTIO_BLK_F_RO).
    #[arg(long)]
    readonly: bool,
    /// Accept guest memory in files the frontend has not sealed against
    /// shrinking (F_SEAL_SHRINK; QEMU's memory-backend-memfd seals by
    /// default, libblkio and memory-backend-file do not). Such a frontend
    /// can kill vubd with SIGBUS by cutting its file: trusted frontends only.
    #[arg(long)]
    allow_unsealed_memory: bool,
    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    direct: bool,
    /// Serial number the guest reads with GET_ID (at most 20 bytes).
    #[arg(long, value_name = "STR", default_value = "vubd", value_parser = parse_serial)]
    serial: String,
    /// Logical block size presented to the guest.
    #[arg(long, value_name = "BYTES", default_value_t = 512, value_parser = parse_block_size)]
    logical_block_size: u32,
    /// Keep polling a queue for this many microseconds after it last had
    /// work before sleeping on its kick (lower latency, burns CPU). 0 = off.
    #[arg(long, value_name = "N", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    poll_us: u64,
    /// Path of the QMP management socket (--socket-mode and --socket-group;
    /// several clients at once).
    #[arg(long, value_name = "PATH")]
    qmp: Option<PathBuf>,
    /// Simultaneous QMP clients; a client beyond them gets an error and is
    /// disconnected. Each costs two threads and two descriptors.
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u16).range(1..=4096))]
    qmp_max_clients: u16,
    /// Seconds between lazy write-outs of persistent dirty bitmaps (the
    /// crash guarantee does not depend on it; it bounds re-copying after a crash).
    #[arg(long, value_name = "SECS", default_value_t = 5.0, value_parser = parse_interval)]
    bitmap_flush_interval: f64,
    /// I/O engine of the queue workers: io_uring (many requests of a queue
    /// at the disk at once; a lone request on the page cache runs inline),
    /// sync (one blocking call per request), or auto (io_uring where the
    /// kernel allows it, else sync; on a tmpfs image with at least as many
    /// threads as CPUs, requests run inline on the queue threads).
    #[arg(long, value_enum, value_name = "ENGINE", default_value_t = AioOpt::Auto)]
    aio: AioOpt,
    /// The disk's node name in management commands.
    #[arg(long, value_name = "NAME", default_value = "disk0", value_parser = parse_node_name)]
    node_name: String,
    /// Serve the image even though a mirror switched the disk away from it
    /// (it holds the disk as it was at that switch); removes the marker
    /// the switch left beside it.
    #[arg(long)]
    allow_stale_image: bool,
    /// Mode of the vhost-user, QMP and NBD unix sockets, in octal: owner
    /// read-write, group bits allowed, never any for other users.
    #[arg(long, value_name = "OCTAL", default_value = "0600",
          value_parser = vubd_backend::unix_socket::parse_mode)]
    socket_mode: u32,
    /// Group (name or gid) of the vhost-user, QMP and NBD unix sockets,
    /// e.g. the VMM's when it does not run as vubd's user (with
    /// --socket-mode 0660). vubd must be root or a member of it.
    #[arg(long, value_name = "NAME|GID", value_parser = vubd_backend::unix_socket::parse_group)]
    socket_group: Option<libc::gid_t>,
    /// seccomp filters, one allow-list per kind of thread: a forbidden
    /// system call kills vubd (`trap`: after naming the thread and the
    /// call on stderr; `kill`: silently), `log` only logs it (kernel audit
    /// log), `none` turns the filters off.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = seccomp::Mode::Trap)]
    seccomp: seccomp::Mode,
    /// Do not offer in-flight request tracking (INFLIGHT_SHMFD) to the
    /// frontend. Without it, a restart while the disk completes requests out
    /// of order can repeat or lose guest requests: for diagnosis only.
    #[arg(long)]
    no_inflight: bool,
    /// Directory beneath which management commands (blockdev-add,
    /// drive-mirror) may open or create files; repeatable. No symlink
    /// may lead out, only regular files, except that a directory under
    /// /dev holds block devices. Default: the directory of --image.
    #[arg(long, value_name = "DIR")]
    allow_dir: Vec<PathBuf>,
    /// `enforce`: once started, vubd can reach only its image's directory
    /// (a device: the device), the --allow-dir directories and its
    /// sockets' directories (Landlock, as far as the kernel supports it);
    /// `none`: no confinement.
    #[arg(long, value_enum, value_name = "MODE", default_value_t = landlock::Mode::Enforce)]
    landlock: landlock::Mode,
}

/// Values of --aio.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum AioOpt {
    Auto,
    Sync,
    #[value(name = "io_uring")]
    IoUring,
}

/// True if `threads` queue threads can keep every CPU vubd may run on
/// busy: then io_uring's worker threads have no idle core to copy on, and
/// tmpfs transfers are cheaper inline (`UringEngine::set_inline_memory`).
fn cores_taken(threads: u16) -> bool {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    usize::from(threads) >= cpus
}

fn parse_interval(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.01..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "'{s}' must be a number of seconds from 0.01 to 3600"
        )),
    }
}

fn parse_node_name(s: &str) -> Result<String, String> {
    // QEMU's rule for node names: a letter first, then letters, digits, '-', '.', '_'.
    let mut chars = s.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    if !first_ok || s.len() > 31 || !chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)) {
        return Err(format!(
            "'{s}': a node name starts with a letter and has at most 31 letters, digits, '-', '.', '_'"
        ));
    }
    Ok(s.to_string())
}

fn parse_queue_size(s: &str) -> Result<u16, String> {
    let n: u16 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if !(2..=1024).contains(&n) || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two from 2 to 1024"));
    }
    Ok(n)
}

fn parse_block_size(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err(format!("'{s}' must be 512 or 4096")),
    }
}

fn parse_serial(s: &str) -> Result<String, String> {
    if s.len() > 20 {
        return Err(format!("'{s}' is {} bytes; the limit is 20", s.len()));
    }
    Ok(s.to_string())
}

/// Refuses an image a mirror's pivot left (a restart with the old
/// `--image` would roll the guest back) unless `allow`; true if the image
/// is stale and allowed (its marker is then to be removed).
fn check_pivot_marker(image: &std::path::Path, allow: bool) -> Result<bool> {
    let marker = pivot_marker::marker_path(image);
    let (why, start_with) = match pivot_marker::read(image) {
        Ok(None) => return Ok(false),
        Ok(Some(m)) => (
            format!(
                "a mirror switched the disk from {} to {} ({} says so); serving {} would roll the guest back to that moment",
                image.display(),
                m.new_image.display(),
                marker.display(),
                image.display()
            ),
            format!("--image {}", m.new_image.display()),
        ),
        Err(e) => (
            format!(
                "{} is unreadable ({e}); it marks an image a mirror switched the disk away from",
                marker.display()
            ),
            "the image the disk was switched to".to_string(),
        ),
    };
    if !allow {
        bail!("{why}. Start with {start_with}, or pass --allow-stale-image to serve this image anyway");
    }
    log::warn!("--allow-stale-image: {why}; serving it anyway and removing the marker");
    Ok(true)
}

fn run(mut opts: Options) -> Result<()> {
    // Where management commands may touch files (before the image path
    // is canonicalized: /dev/vg0/lv allows /dev/vg0, not all of /dev).
    let allow = if opts.allow_dir.is_empty() {
        let image = std::path::absolute(&opts.image)?;
        vec![image
            .parent()
            .map_or_else(|| "/".into(), |d| d.to_path_buf())]
    } else {
        opts.allow_dir.clone()
    };
    let policy = vubd_backend::allowed_dirs::Policy::new(&allow).context("--allow-dir")?;
    vubd_backend::allowed_dirs::set_policy(policy);
    // Before the first thread starts: the block layer's threads confine
    // themselves as they start.
    seccomp::install(opts.seccomp)?;
    // Management queries report where the image really is.
    opts.image = std::fs::canonicalize(&opts.image)
        .with_context(|| format!("cannot open image {}", opts.image.display()))?;
    let stale = check_pivot_marker(&opts.image, opts.allow_stale_image)?;
    let image = RawImage::open(
        &opts.image,
        RawImageOptions {
            read_only: opts.readonly,
            direct: opts.direct,
        },
    )?;
    // A guest's disk, as QEMU's own devices lock one: QEMU, qemu-img and
    // another vubd see the image is in use.
    let (take, share) = vubd_backend::lock::guest_disk_perms(opts.readonly);
    lock_image_waiting(&image, take, share).with_context(|| {
        format!(
            "cannot use image {}: is another process using it?",
            opts.image.display()
        )
    })?;
    let size = vubd_backend::Image::size(&image);
    let lbs = u64::from(opts.logical_block_size);
    if size == 0 || size % lbs != 0 {
        bail!(
            "image {} is {size} bytes, not a non-zero multiple of the logical block size {lbs}",
            opts.image.display()
        );
    }
    let (_, dio_block) = image.direct_io_alignment();
    if opts.direct && dio_block as u64 > lbs {
        // The guest could issue requests O_DIRECT refuses (EINVAL): a 4Kn
        // disk needs --logical-block-size 4096.
        bail!(
            "image {} needs O_DIRECT requests aligned to {dio_block} bytes; use --logical-block-size {dio_block} (or no --direct)",
            opts.image.display()
        );
    }
    if stale {
        pivot_marker::remove(&opts.image).with_context(|| {
            format!(
                "cannot remove {}",
                pivot_marker::marker_path(&opts.image).display()
            )
        })?;
    }
    // Before the first thread (the bitmap writer) starts: the kernel
    // confines only this thread and those it starts afterwards.
    if opts.landlock == landlock::Mode::Enforce {
        let mut sockets = vec![opts.socket.as_path()];
        sockets.extend(opts.qmp.as_deref());
        let reach =
            landlock::Reach::for_daemon(&opts.image, &allow, &sockets).context("--landlock")?;
        let status = landlock::restrict(&reach).context("cannot confine vubd with Landlock")?;
        info!("{}", landlock::describe(&status));
    }
    let disk = Arc::new(Disk::new(Box::new(image), opts.readonly));
    // Persistent bitmaps live beside the image; they are loaded (and, after
    // an unclean stop, recovered) before the first guest write can happen.
    let mut tracker_cfg = TrackerConfig::for_image(&opts.image, size);
    tracker_cfg.read_only = opts.readonly;
    tracker_cfg.flush_interval = Duration::from_secs_f64(opts.bitmap_flush_interval);
    let tracker = Arc::new(DirtyTracker::open(tracker_cfg).context("cannot load dirty bitmaps")?);
    disk.add_hook(tracker.clone());
    let threads = match opts.threads {
        Some(n) if n > opts.queues => {
            bail!("--threads {n}: more threads than --queues {}", opts.queues)
        }
        Some(n) => n,
        None => opts.queues,
    };
    let cfg = DeviceConfig {
        size,
        num_queues: opts.queues,
        threads,
        queue_size: opts.queue_size,
        logical_block_size: opts.logical_block_size,
        physical_block_size: opts.logical_block_size.max(4096),
        read_only: opts.readonly,
        serial: opts.serial.clone(),
        poll_us: opts.poll_us,
        allow_unsealed_memory: opts.allow_unsealed_memory,
        aio: match opts.aio {
            AioOpt::Sync => AioEngine::Sync,
            // Probe once: an explicit request must not degrade silently.
            aio => match vubd_backend::disk::uring::UringEngine::new(1) {
                Ok(_) => AioEngine::IoUring {
                    inline_lone: !opts.direct,
                    inline_memory: matches!(aio, AioOpt::Auto) && cores_taken(threads),
                },
                Err(e) if matches!(aio, AioOpt::IoUring) => {
                    bail!("--aio io_uring: io_uring is unavailable: {e}")
                }
                Err(e) => {
                    info!("io_uring unavailable ({e}): synchronous I/O");
                    AioEngine::Sync
                }
            },
        },
    };
    let socket_opts = SocketOptions {
        mode: opts.socket_mode,
        group: opts.socket_group,
    };
    let listener = bind_socket(&opts.socket, &socket_opts)?;
    let mut server = Server::new(&opts.socket, listener, disk.clone(), cfg);
    if opts.no_inflight {
        server.offer_inflight(false);
    }

    // Every way of stopping (signals, QMP quit) ends up in one handler.
    let (shutdown_tx, shutdown_rx) = mpsc::channel::<ShutdownReason>();
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("cannot install signal handlers")?;
    let signal_tx = shutdown_tx.clone();
    std::thread::Builder::new()
        .name("vubd-signals".into())
        .spawn(move || {
            seccomp::enter(seccomp::Kind::Main);
            for _ in signals.forever() {
                let _ = signal_tx.send(ShutdownReason::Signal);
            }
        })
        .context("cannot start the signal thread")?;

    let events = EventBus::new();
    // Block jobs: an interrupted mirror's state beside the image starts
    // tracking guest writes before the first request is served.
    let jobs = vubd_backend::jobs::JobRegistry::new(events.clone());
    let mirrors = vubd_backend::mirror::MirrorManager::new(
        disk.clone(),
        &opts.node_name,
        &opts.image,
        opts.direct,
        jobs,
    )
    .context("cannot load the state of an interrupted mirror")?;
    // The block-node graph: the disk's node and those `blockdev-add` makes.
    let graph = Arc::new(graph_qmp::graph_for_disk(
        &disk,
        &opts.node_name,
        opts.direct,
    ));
    mirrors.attach_graph(graph.clone());
    // The bitmaps belong to the disk: at a pivot their sidecar moves beside
    // the new image, so a restart with `--image NEW` finds them complete.
    // The new sidecar is written before the pause; the pause only adds the
    // pages marked since, and renames it into place.
    let pivot_tracker = tracker.clone();
    mirrors.on_pivot(move |_old, new| {
        let store: Arc<dyn MetaStore> = Arc::new(FileStore::new(sidecar_path(new)));
        let failed = |e| {
            format!(
                "cannot move the dirty bitmaps beside {}: {e}",
                new.display()
            )
        };
        let prepared = pivot_tracker.prepare_relocation(store).map_err(&failed)?;
        let tracker = pivot_tracker.clone();
        let new = new.to_path_buf();
        Ok(Box::new(move || {
            tracker.relocate_prepared(prepared).map_err(|e| {
                format!(
                    "cannot move the dirty bitmaps beside {}: {e}",
                    new.display()
                )
            })
        }))
    });
    let mut nbd = None;
    let qmp = match &opts.qmp {
        Some(path) => {
            let ctx = Arc::new(DaemonContext {
                node_name: opts.node_name.clone(),
                disk: disk.clone(),
                direct: opts.direct,
                bitmaps: Some(tracker.clone()),
                shutdown: Mutex::new(shutdown_tx.clone()),
                hold_first_timeout: HOLD_FIRST_TIMEOUT,
            });
            let dispatcher = standard_dispatcher(ctx.clone(), events.clone());
            graph_qmp::register_graph_commands(&dispatcher, graph.clone(), ctx.clone());
            vubd_backend::mirror::qmp::register_block_job_commands(&dispatcher, mirrors.clone());
            let node = vubd_backend::nbd::DiskNode {
                name: opts.node_name.clone(),
                disk: disk.clone(),
                bitmaps: Some(tracker.clone()),
            };
            // Exports find every node of the graph (a snapshot-access node).
            let nodes = vubd_backend::graph::export::GraphNodes {
                disk: node,
                graph: graph.clone(),
            };
            let nbd_service =
                vubd_backend::nbd::register_nbd_commands(&dispatcher, Arc::new(nodes));
            nbd_service.set_socket_options(socket_opts);
            nbd = Some(nbd_service);
            // Image fleecing: `blockdev-backup` and its `transaction` action.
            let (filter_graph, filter_ctx) = (graph.clone(), ctx.clone());
            let backup = Arc::new(vubd_backend::backup::qmp::BackupService {
                disk: disk.clone(),
                graph,
                jobs: mirrors.registry().clone(),
                ctx,
            });
            vubd_backend::backup::qmp::register_backup_commands(&dispatcher, backup);
            // `blockdev-add driver=copy-before-write` over the disk.
            graph_qmp::register_filter_commands(
                &dispatcher,
                filter_graph,
                vubd_backend::graph::cbw::Filters {
                    disk: disk.clone(),
                    ctx: filter_ctx,
                    jobs: mirrors.registry().clone(),
                },
            );
            let config = ServerConfig {
                max_clients: usize::from(opts.qmp_max_clients),
                socket: socket_opts,
                ..ServerConfig::default()
            };
            let server = QmpServer::start(path, dispatcher, config)
                .with_context(|| format!("cannot start the QMP monitor on {}", path.display()))?;
            Some(server)
        }
        None => None,
    };

    let stop = server.stop_handle();
    let socket = opts.socket.clone();
    let shutdown_thread = std::thread::Builder::new()
        .name("vubd-shutdown".into())
        .spawn(move || {
            seccomp::enter(seccomp::Kind::Main);
            let Ok(reason) = shutdown_rx.recv() else {
                return;
            };
            info!("shutting down ({reason:?}): finishing requests in flight");
            if reason == ShutdownReason::Signal {
                events.emit(
                    "SHUTDOWN",
                    serde_json::json!({"guest": false, "reason": "host-signal"}),
                );
            }
            stop.stop_and_drain();
            if let Some(nbd) = nbd {
                nbd.shutdown();
            }
            let mut code = 0;
            if let Err(e) = disk.flush() {
                eprintln!("vubd: error: final flush failed: {e}");
                code = 1;
            }
            if let Err(e) = tracker.shutdown() {
                eprintln!("vubd: error: cannot write dirty bitmaps out: {e}");
                code = 1;
            }
            let _ = std::fs::remove_file(&socket);
            // The SHUTDOWN event and the reply to `quit` are only queued to
            // the clients' writer threads; exiting now could cut them off.
            if let Some(qmp) = qmp {
                qmp.shutdown();
            }
            info!("stopped");
            std::process::exit(code);
        })
        .context("cannot start the shutdown thread")?;

    eprintln!(
        "vubd: serving {} ({size} bytes, {} queue(s) on {threads} thread(s)) on {}",
        opts.image.display(),
        opts.queues,
        opts.socket.display()
    );
    seccomp::enter(seccomp::Kind::Main);
    server.run()?;
    // The server returns once a shutdown has begun, possibly as soon as a
    // frontend leaves; returning from main now would end the process before
    // the final flush, the bitmap write-out and the last QMP events. The
    // shutdown thread finishes those and exits the process itself.
    let _ = shutdown_thread.join();
    Ok(())
}

/// How long a start waits for the image's locks: after a kill -9 the dead
/// vubd's io_uring lets go of the file a moment after the process is gone,
/// and a supervisor restarts at once.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Locks the image, retrying a conflict for up to [`LOCK_WAIT`].
fn lock_image_waiting(
    image: &RawImage,
    take: vubd_backend::lock::Perms,
    share: vubd_backend::lock::Perms,
) -> Result<(), vubd_backend::lock::LockError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match image.lock(take, share) {
            Err(vubd_backend::lock::LockError::Conflict { .. })
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let opts = Options::parse();
    if let Err(e) = run(opts) {
        eprintln!("vubd: error: {e:#}");
        std::process::exit(1);
    }
}
