//! [`MirrorManager`]: the mirror slot of one disk. It starts mirror jobs
//! from (already parsed) QMP arguments with QEMU's checks and wording,
//! allows one mirror per disk at a time, and at daemon start picks up the
//! persistent state of a mirror that was interrupted (kill -9, crash), so
//! that guest writes are tracked from the first request on and
//! `drive-mirror ... x-resume: true` can continue where it stopped.

use super::engine::Engine;
use super::hook::{MirrorHook, MirrorState, ResumeTracker};
use super::job::{MirrorJob, PivotCommit, PivotHook};
use super::pivot_marker;
use super::state_file::{boot_id, sidecar_path, StateFile, StateHeader};
use super::top::MirrorTop;
use super::{CopyMode, MirrorConfig, MirrorError, SyncMode, DEFAULT_BUF_SIZE, DEFAULT_GRANULARITY};
use crate::allowed_dirs::{self, AccessError};
use crate::disk::{Disk, WriteHook};
use crate::graph::{Graph, Node, User};
use crate::image::{file_identity, Image, ImageError, RawImage, RawImageOptions};
use crate::jobs::{id_wellformed, Job, JobError, JobOptions, JobRegistry, JobStatus, OnError};
use crate::qmp::QmpError;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

/// How the target is obtained (QAPI `NewImageMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetMode {
    /// Open an existing image.
    Existing,
    /// Create a new raw image of the disk's size (sparse), replacing any
    /// file at the path (`absolute-paths`).
    Create,
}

/// A `blockdev-mirror` / `drive-mirror` request after argument parsing.
#[derive(Debug, Clone)]
pub struct MirrorRequest {
    /// `job-id` (default: the device name).
    pub job_id: Option<String>,
    /// `device`: the disk's node name.
    pub device: String,
    /// `target`: path of the target image.
    pub target: PathBuf,
    /// `format` (only `raw`).
    pub format: Option<String>,
    /// `mode`.
    pub mode: TargetMode,
    /// `replaces` (only the disk's own node name).
    pub replaces: Option<String>,
    /// `sync` as given (`full`, `top`, `none`; others are refused).
    pub sync: String,
    /// `speed` in bytes per second (negative is refused).
    pub speed: i64,
    /// `granularity` (0: default).
    pub granularity: u64,
    /// `buf-size` (0: default, negative refused).
    pub buf_size: i64,
    /// `on-source-error`.
    pub on_source_error: OnError,
    /// `on-target-error`.
    pub on_target_error: OnError,
    /// `unmap`.
    pub unmap: bool,
    /// `copy-mode`.
    pub copy_mode: CopyMode,
    /// `auto-finalize`.
    pub auto_finalize: bool,
    /// `auto-dismiss`.
    pub auto_dismiss: bool,
    /// `x-resume`: continue the interrupted mirror recorded beside the image.
    pub resume: bool,
    /// vubd's `x-target-timeout` (seconds; 0: none): the longest a guest
    /// write waits for the target in write-blocking mode. `None`: 30 s, or
    /// none for an NBD target (its client bounds its waits).
    pub target_timeout: Option<u32>,
    /// `filter-node-name` (`blockdev-mirror` only): the name of the job's
    /// `mirror_top` node; without it the node gets an implicit name.
    pub filter_node_name: Option<String>,
}

/// The write-blocking wait for a target with no `x-target-timeout`.
pub const DEFAULT_TARGET_TIMEOUT: Duration = Duration::from_secs(30);

impl MirrorRequest {
    /// A request with QEMU's defaults for everything optional.
    pub fn new(device: &str, target: impl Into<PathBuf>, sync: &str) -> MirrorRequest {
        MirrorRequest {
            job_id: None,
            device: device.to_string(),
            target: target.into(),
            format: None,
            mode: TargetMode::Existing,
            replaces: None,
            sync: sync.to_string(),
            speed: 0,
            granularity: 0,
            buf_size: 0,
            on_source_error: OnError::Report,
            on_target_error: OnError::Report,
            unmap: true,
            copy_mode: CopyMode::Background,
            auto_finalize: true,
            auto_dismiss: true,
            resume: false,
            target_timeout: None,
            filter_node_name: None,
        }
    }
}

/// A job's hold on its target node, let go on drop unless kept.
struct NodeClaim {
    held: Option<(Arc<Graph>, String, User)>,
}

impl NodeClaim {
    fn take(
        graph: Option<&Arc<Graph>>,
        node: Option<&Node>,
        job: &str,
    ) -> Result<NodeClaim, QmpError> {
        let held = match (graph, node) {
            (Some(g), Some(n)) => {
                let user = User::Job(job.to_string());
                g.claim(n.name(), user.clone())
                    .map_err(|e| generic(e.to_string()))?;
                Some((g.clone(), n.name().to_string(), user))
            }
            _ => None,
        };
        Ok(NodeClaim { held })
    }

    /// The job now exists: its end lets go of the node.
    fn keep(mut self) {
        self.held = None;
    }
}

impl Drop for NodeClaim {
    fn drop(&mut self) {
        if let Some((g, node, user)) = self.held.take() {
            g.release(&node, &user);
        }
    }
}

struct Pending {
    state: Arc<StateFile>,
    hook: Arc<dyn WriteHook>,
}

#[derive(Default)]
struct Slot {
    active: Option<String>,
    pending: Option<Pending>,
}

/// The mirror slot of one disk.
pub struct MirrorManager {
    disk: Arc<Disk>,
    node_name: String,
    direct: bool,
    registry: Arc<JobRegistry>,
    slot: Mutex<Slot>,
    pivot_hooks: Mutex<Vec<PivotHook>>,
    graph: OnceLock<Arc<Graph>>,
    me: Weak<MirrorManager>,
}

impl std::fmt::Debug for MirrorManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MirrorManager")
            .field("node", &self.node_name)
            .field("image", &self.disk.image().path())
            .finish()
    }
}

fn generic(msg: impl Into<String>) -> QmpError {
    QmpError::generic(msg)
}

/// Formats QEMU knows but vubd cannot write.
const OTHER_FORMATS: &[&str] = &[
    "qcow2",
    "qcow",
    "qed",
    "vmdk",
    "vdi",
    "vhdx",
    "vpc",
    "luks",
    "parallels",
    "bochs",
    "cloop",
    "dmg",
];

fn canonical(path: &Path) -> PathBuf {
    if let Ok(p) = path.canonicalize() {
        return p;
    }
    // Not there yet: canonicalize the directory.
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) if !dir.as_os_str().is_empty() => dir
            .canonicalize()
            .map(|d| d.join(name))
            .unwrap_or_else(|_| path.to_path_buf()),
        _ => std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf()),
    }
}

/// Locks a target as the guest's disk it may become (QEMU-compatible
/// locks, see [`crate::lock`]): nobody else may write it, and a second
/// mirror or a QEMU cannot take it.
fn lock_target(image: RawImage) -> Result<Arc<dyn Image>, QmpError> {
    let (take, share) = crate::lock::guest_disk_perms(false);
    image
        .lock(take, share)
        .map_err(|e| generic(e.to_string()))?;
    Ok(Arc::new(image))
}

impl MirrorManager {
    /// The mirror slot for `disk` (whose image file was opened as
    /// `image_path`, and whose node name QMP commands use). Call before
    /// guest I/O starts: an interrupted mirror's state found beside the
    /// image starts tracking guest writes at once. Later mirrors go by the
    /// image the disk actually uses (which a pivot changes), not by this
    /// path. `direct`: open targets with O_DIRECT, like the
    /// disk's image. Fails if that state belongs to a disk of another size.
    pub fn new(
        disk: Arc<Disk>,
        node_name: &str,
        image_path: &Path,
        direct: bool,
        registry: Arc<JobRegistry>,
    ) -> Result<Arc<MirrorManager>, MirrorError> {
        let mut slot = Slot::default();
        let sidecar = sidecar_path(image_path);
        if !disk.read_only() {
            if let Some(state) = StateFile::open(&sidecar)? {
                let h = state.header().clone();
                if h.disk_size != disk.size() {
                    return Err(MirrorError::State(format!(
                        "{} belongs to a disk of {} bytes, this one has {}; remove it to start over",
                        sidecar.display(),
                        h.disk_size,
                        disk.size()
                    )));
                }
                if h.boot_id != boot_id() {
                    log::warn!(
                        "{}: written before the host restarted; the whole disk will be copied again on resume",
                        sidecar.display()
                    );
                    state.bits().set_all();
                }
                let state = Arc::new(state);
                let hook: Arc<dyn WriteHook> = Arc::new(ResumeTracker::new(state.clone()));
                disk.add_hook(hook.clone());
                log::warn!(
                    "interrupted mirror of {} to {} found ({} chunks dirty); resume it with drive-mirror x-resume=true (or blockdev-mirror onto a node on that file)",
                    image_path.display(),
                    h.target.display(),
                    state.bits().count()
                );
                slot.pending = Some(Pending { state, hook });
            }
        }
        Ok(Arc::new_cyclic(|me| MirrorManager {
            disk,
            node_name: node_name.to_string(),
            direct,
            registry,
            slot: Mutex::new(slot),
            pivot_hooks: Mutex::new(Vec::new()),
            graph: OnceLock::new(),
            me: me.clone(),
        }))
    }

    /// Registers `f(old_image, new_image)`, called before every pivot with
    /// guest I/O running to prepare what follows the disk to its new image
    /// (e.g. write the persistent bitmaps' new sidecar); the commit it
    /// returns runs with guest I/O paused, once the target is complete, just
    /// before the disk switches to it, and should be quick. An error of
    /// either fails the pivot: the guest stays on the source image and the
    /// job reports the error (an unused commit is dropped uncalled).
    pub fn on_pivot(
        &self,
        f: impl Fn(&Path, &Path) -> Result<PivotCommit, String> + Send + Sync + 'static,
    ) {
        self.pivot_hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::new(f));
    }

    /// Ties the mirror to the daemon's block-node graph: `blockdev-mirror`
    /// then takes target nodes from it, a job holds its target node while
    /// it runs, and a pivot puts the target in the disk's place there. Only
    /// the first call counts.
    pub fn attach_graph(&self, graph: Arc<Graph>) {
        let _ = self.graph.set(graph);
    }

    /// The graph given to [`MirrorManager::attach_graph`].
    pub fn graph(&self) -> Option<&Arc<Graph>> {
        self.graph.get()
    }

    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The job registry mirrors are created in.
    pub fn registry(&self) -> &Arc<JobRegistry> {
        &self.registry
    }

    /// The node name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Target of an interrupted mirror waiting for `x-resume`, if any.
    pub fn pending_resume(&self) -> Option<PathBuf> {
        self.lock()
            .pending
            .as_ref()
            .map(|p| p.state.header().target.clone())
    }

    /// The mirror job running on the disk, if any.
    pub fn active_job(&self) -> Option<Arc<Job>> {
        let id = self.lock().active.clone()?;
        self.registry.get(&id)
    }

    fn drop_pending(&self, slot: &mut Slot) {
        if let Some(p) = slot.pending.take() {
            self.disk.remove_hook(&p.hook);
            let _ = std::fs::remove_file(p.state.path());
            log::info!(
                "discarded the interrupted mirror state {}",
                p.state.path().display()
            );
        }
    }

    /// Refuses a target that is the image the disk uses now, by identity
    /// (device + inode), whatever path names it.
    fn refuse_active(&self, target: Option<(u64, u64)>) -> Result<(), QmpError> {
        match (target, self.disk.image().identity()) {
            (Some(t), Some(active)) if t == active => Err(generic("Can't mirror node into itself")),
            _ => Ok(()),
        }
    }

    fn open_target(&self, req: &MirrorRequest) -> Result<Arc<dyn Image>, QmpError> {
        let size = self.disk.size();
        if let Some(spec) = req
            .target
            .to_str()
            .and_then(crate::graph::nbd::parse_target)
        {
            return self.open_nbd_target(req, &spec?, size);
        }
        // Absolute, so that after a pivot the disk's image path (beside
        // which sidecars and markers go) does not depend on our cwd; not
        // canonical: `--allow-dir` judges the path as given, symlinks too.
        let path = &std::path::absolute(&req.target).unwrap_or_else(|_| req.target.clone());
        let shown = req.target.display();
        let opts = RawImageOptions {
            read_only: false,
            direct: self.direct,
        };
        let refused = |e: AccessError, what: &str| match e {
            AccessError::Refused(m) => generic(m),
            AccessError::Os(e) => generic(format!(
                "Could not {what} '{shown}': {}",
                super::strerror(e.raw_os_error().unwrap_or(libc::EIO))
            )),
        };
        if req.mode == TargetMode::Create {
            // A new file is made with O_EXCL; an existing one (QEMU
            // recreates it) is opened without following a symlink and,
            // not O_TRUNC, checked on the open file before a byte of it
            // is dropped.
            let (f, _) = allowed_dirs::create_or_open(path).map_err(|e| refused(e, "create"))?;
            // Fail closed: a file that cannot be told apart from the image
            // in use is not truncated.
            let unknown = || {
                generic(format!(
                    "Could not create '{shown}': cannot tell whether it is the image in use"
                ))
            };
            let target = f
                .metadata()
                .map(|m| file_identity(&m))
                .map_err(|_| unknown())?;
            self.disk.image().identity().ok_or_else(unknown)?;
            self.refuse_active(Some(target))?;
            f.set_len(0)
                .and_then(|()| f.set_len(size))
                .map_err(|e| refused(e.into(), "create"))?;
        }
        let open = || {
            RawImage::open_allowed(path, opts).map_err(|e| match e {
                ImageError::Refused(m) => generic(m),
                e => generic(format!(
                    "Could not open '{shown}': {}",
                    super::strerror(super::image_errno(&e))
                )),
            })
        };
        let image = open()?;
        self.refuse_active(image.identity())?;
        if image.size() < size {
            // A shorter existing target grows to the disk's size (QEMU
            // resizes the target too); a block device cannot.
            let grown = allowed_dirs::open(path, libc::O_WRONLY)
                .map_err(|_| ())
                .and_then(|f| f.set_len(size).map_err(|_| ()));
            if grown.is_err() {
                return Err(generic("Source and target image have different sizes"));
            }
            let image = open()?;
            self.refuse_active(image.identity())?;
            return lock_target(image);
        }
        lock_target(image)
    }

    /// A `drive-mirror` target named by an NBD URI: the export must exist
    /// (libvirt's `mode: existing`) and be the disk's size.
    fn open_nbd_target(
        &self,
        req: &MirrorRequest,
        spec: &crate::graph::nbd::NbdSpec,
        size: u64,
    ) -> Result<Arc<dyn Image>, QmpError> {
        if req.mode == TargetMode::Create {
            return Err(generic(
                "vubd mirrors onto an NBD export with mode 'existing' only",
            ));
        }
        let node = crate::graph::nbd::open("#nbd-target", spec, false)?;
        if node.options().read_only {
            return Err(generic("Block node is read-only"));
        }
        if node.image().size() != size {
            return Err(generic("Source and target image have different sizes"));
        }
        Ok(node.image().clone())
    }

    /// Starts a mirror (QEMU's checks in QEMU's order, QEMU's messages).
    pub fn start(&self, req: MirrorRequest) -> Result<Arc<Job>, QmpError> {
        self.start_with(req, None, None)
    }

    /// Starts a mirror to a node of the graph (`blockdev-mirror`): the
    /// job holds the node while it runs (so `blockdev-del` refuses it), and
    /// a pivot makes it the disk's node. `req.target` is set to its image's
    /// path (recorded for resuming).
    pub fn start_to_node(
        &self,
        mut req: MirrorRequest,
        node: Arc<Node>,
    ) -> Result<Arc<Job>, QmpError> {
        if node.options().read_only {
            return Err(generic("Block node is read-only"));
        }
        if node.image().size() != self.disk.size() {
            // QEMU starts the job and fails it with these words.
            return Err(generic("Source and target image have different sizes"));
        }
        req.target = node.image().path().to_path_buf();
        let image = node.image().clone();
        self.start_with(req, Some(image), Some(node))
    }

    /// Starts a mirror to an already open target image (an image kind the
    /// QMP commands cannot name, or a test's fault-injecting image);
    /// `req.target` must still name it (it is recorded for resuming).
    pub fn start_to(
        &self,
        req: MirrorRequest,
        target: Arc<dyn Image>,
    ) -> Result<Arc<Job>, QmpError> {
        self.start_with(req, Some(target), None)
    }

    fn start_with(
        &self,
        req: MirrorRequest,
        target: Option<Arc<dyn Image>>,
        target_node: Option<Arc<Node>>,
    ) -> Result<Arc<Job>, QmpError> {
        if req.device != self.node_name {
            return Err(generic(format!(
                "Cannot find device='{0}' nor node-name='{0}'",
                req.device
            )));
        }
        let id = req.job_id.clone().unwrap_or_else(|| req.device.clone());
        if !id_wellformed(&id) {
            return Err(JobError::InvalidId(id).into());
        }
        if self.registry.get(&id).is_some() {
            return Err(JobError::IdInUse(id).into());
        }
        let sync = match req.sync.as_str() {
            "full" => SyncMode::Full,
            "top" => SyncMode::Top,
            "none" => SyncMode::None,
            other => return Err(generic(format!("Sync mode '{other}' not supported"))),
        };
        if req.granularity != 0 && !(512..=64 << 20).contains(&req.granularity) {
            return Err(generic(
                "Parameter 'granularity' expects a value in range [512B, 64MB]",
            ));
        }
        if !req.granularity.is_power_of_two() && req.granularity != 0 {
            return Err(generic("Parameter 'granularity' expects a power of 2"));
        }
        if req.buf_size < 0 {
            return Err(generic("Invalid parameter 'buf-size'"));
        }
        if let Some(r) = &req.replaces {
            if *r != self.node_name {
                return Err(generic(format!(
                    "Cannot find device='{r}' nor node-name='{r}'"
                )));
            }
        }
        match req.format.as_deref() {
            None | Some("raw") => {}
            Some(f) if OTHER_FORMATS.contains(&f) => {
                return Err(generic(format!(
                    "vubd mirrors to raw images only, not '{f}'"
                )))
            }
            Some(f) => return Err(generic(format!("Unknown file format '{f}'"))),
        }
        if req.resume && req.mode == TargetMode::Create {
            return Err(generic(
                "x-resume needs mode 'existing' (the target already holds the copy)",
            ));
        }
        // The image in use, by identity: after a pivot that is the old
        // target, and a hard link, symlink or bind mount of it is it too.
        // (Checked again on the open file, before anything is truncated.)
        match &target {
            Some(t) => self.refuse_active(t.identity())?,
            None => self.refuse_active(
                std::fs::metadata(&req.target)
                    .ok()
                    .map(|m| file_identity(&m)),
            )?,
        }
        let mut slot = self.lock();
        if let Some(active) = &slot.active {
            // The running mirror's filter node sits above the disk's node,
            // so QEMU 7.2 finds no root node to mirror (checked with
            // blockdev-mirror and drive-mirror on QEMU 7.2).
            log::info!("mirror refused: mirror '{active}' runs on the disk");
            return Err(generic("Need a root block node"));
        }
        // Another kind of job on the disk, or a copy-before-write filter
        // a client added: the filter reads the image a pivot would swap
        // away. In QEMU's graph the filter sits above the disk's node,
        // hence QEMU's words.
        if self
            .registry
            .list()
            .into_iter()
            .any(|j| !matches!(j.status(), JobStatus::Concluded | JobStatus::Null))
            || self.graph.get().is_some_and(|g| {
                g.nodes()
                    .iter()
                    .any(|(n, _)| n.driver() == crate::graph::Driver::CopyBeforeWrite)
            })
        {
            return Err(generic("Need a root block node"));
        }
        // QEMU checks the filter's name as it opens the filter, after the
        // op blockers and before the job exists.
        if let Some(name) = &req.filter_node_name {
            MirrorTop::check_name(self.graph.get(), name).map_err(|e| generic(e.to_string()))?;
        }
        // The job holds its target node from here; every failure below
        // lets go of it (and once the job exists, its end does).
        let claim = NodeClaim::take(self.graph.get(), target_node.as_deref(), &id)?;
        let mut granularity = if req.granularity == 0 {
            DEFAULT_GRANULARITY
        } else {
            req.granularity
        };
        let pending_state = if req.resume {
            let Some(p) = &slot.pending else {
                return Err(generic(format!(
                    "No interrupted mirror of '{}' to resume",
                    self.node_name
                )));
            };
            let h = p.state.header();
            if canonical(&h.target) != canonical(&req.target) {
                return Err(generic(format!(
                    "The interrupted mirror of '{}' was to '{}', not '{}'",
                    self.node_name,
                    h.target.display(),
                    req.target.display()
                )));
            }
            if req.granularity != 0 && req.granularity != h.granularity {
                return Err(generic(format!(
                    "Parameter 'granularity' must match the interrupted mirror ({})",
                    h.granularity
                )));
            }
            granularity = h.granularity;
            Some(p.state.clone())
        } else {
            None
        };
        let target = match target {
            Some(t) => t,
            None => self.open_target(&req)?,
        };
        let persist = match (&pending_state, self.disk.read_only()) {
            (_, true) => None,
            (Some(p), false) => Some(p.clone()),
            (None, false) => {
                self.drop_pending(&mut slot);
                let header = StateHeader {
                    disk_size: self.disk.size(),
                    granularity,
                    target: canonical(&req.target),
                    boot_id: boot_id(),
                };
                // Beside the image in use, where a restart on it looks.
                let st = StateFile::create(&sidecar_path(self.disk.image().path()), header)
                    .map_err(|e| generic(e.to_string()))?;
                if sync != SyncMode::None {
                    // Conservative until the first checkpoint brings P to D.
                    st.bits().set_all();
                }
                Some(Arc::new(st))
            }
        };
        // An NBD target bounds its own waits (`x-request-timeout`,
        // `reconnect-delay`); a shorter bound here would end a mirror over
        // an outage the client is meant to ride out.
        let remote = target.async_fd(&[]).is_none();
        let target_timeout = match req.target_timeout {
            Some(0) => None,
            Some(secs) => Some(Duration::from_secs(u64::from(secs))),
            None if remote => None,
            None => Some(DEFAULT_TARGET_TIMEOUT),
        };
        let state = match MirrorState::new(
            self.disk.clone(),
            target,
            granularity,
            persist.clone(),
            (req.copy_mode, target_timeout),
        ) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                if pending_state.is_none() {
                    if let Some(p) = &persist {
                        let _ = std::fs::remove_file(p.path());
                    }
                }
                return Err(generic(format!("cannot start the mirror's threads: {e}")));
            }
        };
        let buf_size = if req.buf_size == 0 {
            DEFAULT_BUF_SIZE
        } else {
            req.buf_size as u64
        };
        let cleanup_new_state = |persist: &Option<Arc<StateFile>>| {
            if pending_state.is_none() {
                if let Some(p) = persist {
                    let _ = std::fs::remove_file(p.path());
                }
            }
        };
        let engine = match Engine::new(state.clone(), buf_size, req.unmap) {
            Ok(e) => e,
            Err(e) => {
                cleanup_new_state(&persist);
                return Err(generic(e));
            }
        };
        let hook: Arc<dyn WriteHook> = Arc::new(MirrorHook::new(state.clone()));
        // The job's filter node stands for the hook: from here on the hook
        // enters and leaves the guest's path with the node.
        let top = match MirrorTop::add(
            self.graph.get(),
            req.filter_node_name.as_deref(),
            self.disk.clone(),
            hook,
            &id,
        ) {
            Ok(t) => Arc::new(t),
            Err(e) => {
                cleanup_new_state(&persist);
                return Err(generic(e.to_string()));
            }
        };
        let config = MirrorConfig {
            sync,
            granularity,
            buf_size,
            copy_mode: req.copy_mode,
            on_source_error: req.on_source_error,
            on_target_error: req.on_target_error,
            unmap: req.unmap,
            auto_finalize: req.auto_finalize,
            resumed: req.resume,
        };
        let me = self.me.clone();
        let job_id = id.clone();
        let graph = self.graph.get().cloned();
        let held = target_node
            .as_ref()
            .map(|n| (n.name().to_string(), User::Job(id.clone())));
        let end_graph = graph.clone();
        let end_held = held.clone();
        let on_end = Box::new(move || {
            if let (Some(g), Some((node, user))) = (&end_graph, &end_held) {
                g.release(node, user);
            }
            if let Some(m) = me.upgrade() {
                let mut slot = m.lock();
                if slot.active.as_deref() == Some(job_id.as_str()) {
                    slot.active = None;
                }
            }
        });
        let hooks = self
            .pivot_hooks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let new_identity = state.target.identity();
        let new_image = state.target.clone();
        let new_node = target_node.as_ref().map(|n| n.name().to_string());
        let read_only = self.disk.read_only();
        let on_pivot: PivotHook = Arc::new(move |old: &Path, new: &Path| {
            // A read-only disk cannot be rolled back: both images stay equal.
            let marker = match read_only {
                true => None,
                false => Some(pivot_marker::stage(old, new, new_identity).map_err(|e| {
                    format!(
                        "cannot leave the pivot marker beside {}: {e}",
                        old.display()
                    )
                })?),
            };
            let commits = hooks
                .iter()
                .map(|h| h(old, new))
                .collect::<Result<Vec<_>, _>>()?;
            let (old, new) = (old.to_path_buf(), new.to_path_buf());
            let (graph, new_image, new_node) = (graph.clone(), new_image.clone(), new_node.clone());
            let commit: PivotCommit = Box::new(move || {
                // The target is complete and flushed, and nothing changes
                // either image until the switch: the marker is true from now.
                let result = (|| {
                    if let Some(m) = marker {
                        m.commit().map_err(|e| {
                            format!(
                                "cannot leave the pivot marker beside {}: {e}",
                                old.display()
                            )
                        })?;
                    }
                    // The disk may come back to an image it once left: a
                    // marker there would send a restart to the stale one.
                    pivot_marker::remove(&new).map_err(|e| {
                        format!(
                            "cannot remove the stale pivot marker {}: {e}",
                            pivot_marker::marker_path(&new).display()
                        )
                    })?;
                    commits.into_iter().try_for_each(|c| c())?;
                    // Last, once nothing can fail the pivot any more: the
                    // graph shows the target in the disk's place. The job
                    // holds its node, so it is there; failing the pivot
                    // now would leave the bitmaps moved without the disk.
                    if let Some(g) = &graph {
                        match &new_node {
                            Some(n) => {
                                if let Err(e) = g.switch_disk(n) {
                                    log::error!("the pivot's target node is gone: {e}");
                                }
                            }
                            None => g.replace_disk_image(new_image),
                        }
                    }
                    Ok(())
                })();
                if result.is_err() {
                    // The guest stays on the old image: no marker may say
                    // otherwise (a commit whose directory sync failed may
                    // have put it in place already).
                    if let Err(re) = pivot_marker::remove(&old) {
                        log::error!(
                            "the pivot failed but its marker {} stays ({re}): remove it before restarting on {}",
                            pivot_marker::marker_path(&old).display(),
                            old.display()
                        );
                    }
                }
                result
            });
            Ok(commit)
        });
        let driver = Arc::new(MirrorJob::new(
            state.clone(),
            top.clone(),
            config,
            engine,
            on_end,
            on_pivot,
        ));
        let job = match self.registry.create(
            JobOptions {
                id: id.clone(),
                auto_finalize: req.auto_finalize,
                auto_dismiss: req.auto_dismiss,
                speed: req.speed.max(0) as u64,
            },
            driver,
        ) {
            Ok(j) => j,
            Err(e) => {
                top.leave();
                cleanup_new_state(&persist);
                return Err(e.into());
            }
        };
        if req.speed < 0 {
            // QEMU creates the job, then fails it on the speed.
            job.early_fail();
            top.leave();
            cleanup_new_state(&persist);
            return Err(JobError::NegativeSpeed.into());
        }
        match &pending_state {
            Some(p) => {
                // Until now guest writes were marked in P only (by the
                // ResumeTracker). With guest I/O paused no write is between
                // its start and its end, so each one either marked P
                // already (taken into D here) or starts after the pause and
                // meets the mirror's hook; the tracker goes only then.
                let _pause = self.disk.gate().pause();
                top.enter();
                state.dirty.or_from(p.bits());
                if let Some(p) = slot.pending.take() {
                    self.disk.remove_hook(&p.hook);
                }
            }
            None => top.enter(),
        }
        claim.keep();
        slot.active = Some(id);
        drop(slot);
        if let Err(e) = job.start() {
            return Err(e.into());
        }
        Ok(job)
    }

    /// The driver of a mirror job (for tests and statistics).
    pub fn mirror_driver(job: &Job) -> Option<&MirrorJob> {
        let any: &dyn std::any::Any = job.driver().as_any();
        any.downcast_ref::<MirrorJob>()
    }
}
