//! QMP `transaction`: several actions that take effect at one instant
//! with respect to guest writes, or none does (QEMU 7.2's semantics,
//! arguments and error texts).
//!
//! Each action is an [`Action`] with QEMU's phases: `prepare` checks and
//! readies everything that can fail while the guest runs; once every
//! action is prepared, guest I/O is held at the disk's gate and every
//! action's `commit` runs, which cannot fail; if any prepare fails, every
//! action prepared so far (the failing one too) is aborted, so nothing is
//! left behind; `clean` runs last either way. Actions share a
//! [`TxContext`]: the bitmap actions plan their changes in one
//! [`BitmapTransaction`], which has its own fallible prepare (the sidecar
//! is written ahead) and commit (the rename; on error nothing changed, and
//! every action is aborted). Another action type (e.g. `blockdev-backup`)
//! is one more [`Action`] and one more arm in [`parse_action`].

use super::args::{value_enum, Args};
use super::commands::{self, AddArgs, MergeArgs};
use super::context::{BitmapOpError, BitmapTransaction, DirtyBitmaps, ManagementContext};
use super::error::QmpError;
use crate::jobs::JobTxn;
use serde_json::{json, Value};
use std::sync::Arc;

/// QEMU's `ActionCompletionMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionMode {
    /// Each action's job completes on its own (the default).
    Individual,
    /// The jobs of the transaction complete or fail together.
    Grouped,
}

impl CompletionMode {
    fn as_str(self) -> &'static str {
        match self {
            CompletionMode::Individual => "individual",
            CompletionMode::Grouped => "grouped",
        }
    }
}

/// What the actions of one transaction share.
pub struct TxContext<'a> {
    /// The daemon.
    pub ctx: &'a dyn ManagementContext,
    /// `properties.completion-mode`.
    pub completion_mode: CompletionMode,
    source: Option<&'a dyn DirtyBitmaps>,
    bitmaps: Option<Box<dyn BitmapTransaction + 'a>>,
    jobs: Option<Arc<JobTxn>>,
}

impl<'a> TxContext<'a> {
    /// The transaction's bitmap plan, started on first use.
    pub fn bitmaps(&mut self) -> Result<&mut (dyn BitmapTransaction + 'a), QmpError> {
        if self.bitmaps.is_none() {
            let source = self
                .source
                .ok_or_else(|| QmpError::generic(commands::NO_BITMAPS))?;
            let txn = source.begin_transaction().ok_or_else(|| {
                QmpError::generic("The dirty bitmaps of this disk do not support transactions")
            })?;
            self.bitmaps = Some(txn);
        }
        match self.bitmaps.as_deref_mut() {
            Some(b) => Ok(b),
            None => Err(QmpError::generic(commands::NO_BITMAPS)),
        }
    }

    /// The job transaction that the jobs of a `grouped` transaction join
    /// (`None` for `individual`: each job stands alone).
    pub fn job_txn(&mut self) -> Option<Arc<JobTxn>> {
        if self.completion_mode == CompletionMode::Individual {
            return None;
        }
        Some(self.jobs.get_or_insert_with(JobTxn::new).clone())
    }

    /// QEMU's `action_check_completion_mode`: actions without a job accept
    /// only `individual`.
    pub fn require_individual(&self, action: &str) -> Result<(), QmpError> {
        if self.completion_mode == CompletionMode::Individual {
            return Ok(());
        }
        Err(QmpError::generic(format!(
            "Action '{action}' does not support Transaction property completion-mode = {}",
            self.completion_mode.as_str()
        )))
    }
}

/// One action of a transaction, with QEMU's phases (see the module docs).
pub trait Action {
    /// Checks and readies everything that can fail; nothing visible
    /// changes. Sees what the earlier actions prepared.
    fn prepare(&mut self, tx: &mut TxContext<'_>) -> Result<(), QmpError>;
    /// Takes effect. Runs with guest I/O held, after every prepare
    /// succeeded; must be quick and cannot fail.
    fn commit(&mut self, _tx: &mut TxContext<'_>) {}
    /// Undoes what `prepare` did (it may have failed half-way).
    fn abort(&mut self, _tx: &mut TxContext<'_>) {}
    /// Releases what is left, after `commit` or `abort`.
    fn clean(&mut self, _tx: &mut TxContext<'_>) {}
}

/// The action types vubd implements (QEMU's `TransactionActionKind`).
const TYPES: [&str; 7] = [
    "abort",
    "block-dirty-bitmap-add",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear",
    "block-dirty-bitmap-enable",
    "block-dirty-bitmap-disable",
    "block-dirty-bitmap-merge",
];

/// `abort`: fails in its prepare, so the whole transaction is rolled back.
struct AbortAction;

impl Action for AbortAction {
    fn prepare(&mut self, _tx: &mut TxContext<'_>) -> Result<(), QmpError> {
        Err(QmpError::generic("Transaction aborted using Abort action"))
    }
}

enum BitmapOp {
    Add(AddArgs),
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(MergeArgs),
}

/// A `block-dirty-bitmap-*` action: planned in the shared bitmap plan,
/// which commits (or is dropped) for all of them at once.
struct BitmapAction {
    kind: &'static str,
    /// `node` and `name` (`Remove` .. `Disable`).
    target: (String, String),
    op: BitmapOp,
}

impl Action for BitmapAction {
    fn prepare(&mut self, tx: &mut TxContext<'_>) -> Result<(), QmpError> {
        tx.require_individual(self.kind)?;
        let ctx = tx.ctx;
        let err = |e: BitmapOpError| QmpError::generic(e.to_string());
        match &self.op {
            BitmapOp::Add(a) => {
                // The plan is started only once the arguments are checked,
                // as `block-dirty-bitmap-add` looks the engine up last.
                a.apply(ctx, |name, g, p, d| match tx.bitmaps() {
                    Ok(b) => b.add(name, g, p, d),
                    Err(e) => Err(BitmapOpError::Failed(e.desc)),
                })
            }
            BitmapOp::Merge(m) => {
                let b = tx.bitmaps()?;
                // The plan looks the names up itself, in the same order.
                m.apply(ctx, |_| true, |target, names| b.merge(target, names))
            }
            op => {
                let (node, name) = &self.target;
                commands::check_node(ctx, node)?;
                let b = tx.bitmaps()?;
                match op {
                    BitmapOp::Remove => b.remove(name),
                    BitmapOp::Clear => b.clear(name),
                    BitmapOp::Enable => b.enable(name),
                    _ => b.disable(name),
                }
                .map_err(err)
            }
        }
    }
}

/// An action type that lives outside this module (`blockdev-backup`,
/// which needs the disk, the graph and the jobs): its QAPI name and the
/// parser of its `data`.
pub type ExtraAction<'a> = (
    &'static str,
    &'a dyn Fn(Args) -> Result<Box<dyn Action>, QmpError>,
);

/// Reads one element of `actions` (`{"type", "data"}`), as QEMU's input
/// visitor does: the type, then the data, then unexpected members.
fn parse_action(
    path: &str,
    v: Value,
    extra: &[ExtraAction<'_>],
) -> Result<Box<dyn Action>, QmpError> {
    let mut a = Args::nested(path, v)?;
    let kind = a.req_str("type")?;
    let ext = extra.iter().find(|(t, _)| *t == kind);
    let Some(kind) = TYPES
        .iter()
        .copied()
        .find(|t| *t == kind)
        .or(ext.map(|(t, _)| *t))
    else {
        // QEMU names the discriminator without its path here.
        return Err(QmpError::generic(format!(
            "Parameter 'type' does not accept value '{kind}'"
        )));
    };
    let data_path = a.path("data");
    let data = Args::nested(&data_path, a.required("data")?)?;
    if let Some((_, parse)) = ext {
        let action = parse(data)?;
        a.finish()?;
        return Ok(action);
    }
    let action: Box<dyn Action> = match kind {
        "abort" => {
            data.finish()?;
            Box::new(AbortAction)
        }
        "block-dirty-bitmap-add" => Box::new(BitmapAction {
            kind,
            target: Default::default(),
            op: BitmapOp::Add(AddArgs::parse(data)?),
        }),
        "block-dirty-bitmap-merge" => Box::new(BitmapAction {
            kind,
            target: Default::default(),
            op: BitmapOp::Merge(MergeArgs::parse(data)?),
        }),
        _ => {
            let op = match kind {
                "block-dirty-bitmap-remove" => BitmapOp::Remove,
                "block-dirty-bitmap-clear" => BitmapOp::Clear,
                "block-dirty-bitmap-enable" => BitmapOp::Enable,
                _ => BitmapOp::Disable,
            };
            Box::new(BitmapAction {
                kind,
                target: commands::parse_node_name(data)?,
                op,
            })
        }
    };
    a.finish()?;
    Ok(action)
}

/// The `transaction` command: parses every action first (a malformed one
/// changes nothing), then runs them.
pub fn transaction(ctx: &dyn ManagementContext, args: Args) -> Result<Value, QmpError> {
    transaction_with(ctx, args, &[])
}

/// The `transaction` command knowing the action types of `extra` too.
pub fn transaction_with(
    ctx: &dyn ManagementContext,
    mut args: Args,
    extra: &[ExtraAction<'_>],
) -> Result<Value, QmpError> {
    let items = args.req_list("actions")?;
    let mut actions = Vec::with_capacity(items.len());
    for (path, v) in items {
        actions.push(parse_action(&path, v, extra)?);
    }
    let mut mode = CompletionMode::Individual;
    if let Some(props) = args.take("properties") {
        let mut props = Args::nested("properties", props)?;
        if let Some(m) = props.opt_str("completion-mode")? {
            // QEMU names an enum member without its path (as for 'type').
            let m = value_enum(
                "completion-mode",
                Value::String(m),
                &["individual", "grouped"],
            )?;
            if m == "grouped" {
                mode = CompletionMode::Grouped;
            }
        }
        props.finish()?;
    }
    args.finish()?;
    run(ctx, actions, mode)?;
    Ok(json!({}))
}

/// Runs `actions` as one transaction (the phases of the module docs).
pub fn run(
    ctx: &dyn ManagementContext,
    mut actions: Vec<Box<dyn Action>>,
    completion_mode: CompletionMode,
) -> Result<(), QmpError> {
    let source = ctx.bitmaps();
    let mut tx = TxContext {
        ctx,
        completion_mode,
        source: source.as_deref(),
        bitmaps: None,
        jobs: None,
    };
    let mut prepared = 0;
    let mut result = Ok(());
    for a in actions.iter_mut() {
        // The failing action is aborted too (it may have done part).
        prepared += 1;
        result = a.prepare(&mut tx);
        if result.is_err() {
            break;
        }
    }
    if result.is_ok() {
        if let Some(b) = tx.bitmaps.as_mut() {
            result = b.prepare().map_err(|e| QmpError::generic(e.to_string()));
        }
    }
    if result.is_ok() {
        let mut bitmaps = tx.bitmaps.take();
        let mut committed = None;
        let held = ctx.with_guest_io_held(&mut || {
            if committed.is_some() {
                return;
            }
            // The bitmap plan first: its commit is the one that can fail.
            let r = match bitmaps.take() {
                Some(b) => b.commit().map_err(|e| QmpError::generic(e.to_string())),
                None => Ok(()),
            };
            if r.is_ok() {
                for a in actions.iter_mut() {
                    a.commit(&mut tx);
                }
            }
            committed = Some(r);
        });
        result = held.and_then(|()| {
            committed.unwrap_or_else(|| Err(QmpError::generic("guest I/O was not held")))
        });
    }
    if result.is_err() {
        // A bitmap plan not committed is dropped: nothing of it remains.
        tx.bitmaps = None;
        for a in actions[..prepared].iter_mut().rev() {
            a.abort(&mut tx);
        }
    }
    for a in actions[..prepared].iter_mut() {
        a.clean(&mut tx);
    }
    result
}

#[cfg(test)]
mod tests {
    //! `transaction` on the real engine with a real sidecar file: a failed
    //! transaction leaves nothing behind (in memory, in the sidecar, no
    //! staged file), also when the sidecar cannot be written at the commit
    //! and when the process dies between the staging and the commit.

    use super::*;
    use crate::dirty::{sidecar_path, DirtyTracker, FileStore, MetaStore, TrackerConfig};
    use crate::qmp::{standard_dispatcher, DiskInfo, Dispatcher, EventBus};
    use serde_json::Map;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    const SIZE: u64 = 64 << 20;
    const MIB: u64 = 1 << 20;

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(format!("vubd-txn-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A file store whose replacements fail while `fail` is set (a full
    /// disk at the commit), and whose staging writes half the file and
    /// fails while `fail_stage` is set (a full disk at the prepare).
    struct FailingStore {
        inner: FileStore,
        fail: AtomicBool,
        fail_stage: AtomicBool,
    }

    impl FailingStore {
        fn check(&self) -> std::io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                Err(std::io::Error::other("injected: no space left"))
            } else {
                Ok(())
            }
        }
    }

    impl MetaStore for FailingStore {
        fn size(&self) -> std::io::Result<Option<u64>> {
            self.inner.size()
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
            self.inner.read_at(offset, buf)
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
            self.inner.write_at(offset, buf)
        }
        fn sync(&self) -> std::io::Result<()> {
            self.inner.sync()
        }
        fn replace(&self, contents: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.inner.replace(contents)
        }
        fn remove(&self) -> std::io::Result<()> {
            self.inner.remove()
        }
        fn stage(&self, contents: &[u8]) -> std::io::Result<()> {
            if self.fail_stage.load(Ordering::SeqCst) {
                self.inner.stage(&contents[..contents.len() / 2])?;
                return Err(std::io::Error::other("injected: staging failed"));
            }
            self.inner.stage(contents)
        }
        fn commit_staged(
            &self,
            contents: &[u8],
            changed: &[std::ops::Range<usize>],
        ) -> std::io::Result<()> {
            self.check()?;
            self.inner.commit_staged(contents, changed)
        }
        fn discard_staged(&self) {
            self.inner.discard_staged()
        }
        fn describe(&self) -> String {
            self.inner.describe()
        }
    }

    struct Ctx(Arc<DirtyTracker>);

    impl ManagementContext for Ctx {
        fn node_name(&self) -> String {
            "disk0".into()
        }
        fn disk_info(&self) -> DiskInfo {
            DiskInfo {
                image: "/nonexistent".into(),
                size: SIZE,
                read_only: false,
                direct: false,
                writeback: true,
            }
        }
        fn bitmaps(&self) -> Option<Arc<dyn DirtyBitmaps>> {
            Some(self.0.clone())
        }
        fn quit(&self) {}
    }

    fn open(store: Arc<dyn MetaStore>) -> Arc<DirtyTracker> {
        let mut cfg = TrackerConfig::new(SIZE);
        cfg.sidecar = Some(store);
        // No background write-out: the sidecar changes only by commands.
        cfg.flush_interval = Duration::from_secs(3600);
        Arc::new(DirtyTracker::open(cfg).unwrap())
    }

    fn exec(d: &Dispatcher, cmd: &str, args: Value) -> Result<Value, QmpError> {
        let Value::Object(m) = args else {
            return d.execute(cmd, Map::new());
        };
        d.execute(cmd, m)
    }

    fn act(kind: &str, data: Value) -> Value {
        json!({"type": kind, "data": data})
    }

    fn b(name: &str) -> Value {
        json!({"node": "disk0", "name": name})
    }

    /// Everything observable about the bitmaps: list entries and hashes.
    fn state(t: &DirtyTracker) -> Vec<(String, u64, bool, bool, String)> {
        t.list()
            .into_iter()
            .map(|i| {
                let sha = t.sha256(&i.name).unwrap();
                (i.name, i.count, i.recording, i.persistent, sha)
            })
            .collect()
    }

    fn write(t: &DirtyTracker, offset: u64, len: u64) {
        t.mark(offset, len).unwrap();
    }

    fn tmp_of(sidecar: &Path) -> PathBuf {
        let mut p = sidecar.as_os_str().to_owned();
        p.push(".tmp");
        PathBuf::from(p)
    }

    /// p0 (persistent, 2 chunks), p1 (persistent, disabled, 1 chunk),
    /// m0 (in memory, 3 chunks).
    fn populate(d: &Dispatcher, t: &DirtyTracker) {
        let add = |name: &str, persistent: bool, disabled: bool| {
            exec(
                d,
                "block-dirty-bitmap-add",
                json!({"node": "disk0", "name": name, "persistent": persistent, "disabled": disabled}),
            )
            .unwrap();
        };
        add("p0", true, false);
        add("p1", true, false);
        write(t, 0, 4096);
        exec(d, "block-dirty-bitmap-disable", b("p1")).unwrap();
        add("m0", false, false);
        write(t, 8 * MIB, 4096);
        write(t, 40 * MIB, 4096);
    }

    /// The full set of actions, then one that fails: QEMU's error, and
    /// nothing changed in memory or on disk.
    #[test]
    fn a_failing_last_action_leaves_no_trace() {
        let dir = Dir::new("fail");
        let sidecar = sidecar_path(&dir.0.join("img"));
        let t = open(Arc::new(FileStore::new(&sidecar)));
        let d = standard_dispatcher(Arc::new(Ctx(t.clone())), EventBus::new());
        populate(&d, &t);
        let before = state(&t);
        let file = std::fs::read(&sidecar).unwrap();
        let all = || {
            vec![
                act(
                    "block-dirty-bitmap-add",
                    json!({"node": "disk0", "name": "p2", "persistent": true}),
                ),
                act("block-dirty-bitmap-disable", b("p0")),
                act("block-dirty-bitmap-enable", b("p1")),
                act("block-dirty-bitmap-clear", b("p1")),
                act(
                    "block-dirty-bitmap-merge",
                    json!({"node": "disk0", "target": "p1", "bitmaps": ["m0", "p0"]}),
                ),
                act("block-dirty-bitmap-remove", b("m0")),
                act("block-dirty-bitmap-remove", b("p0")),
            ]
        };
        let cases = [
            (
                act("abort", json!({})),
                "Transaction aborted using Abort action",
            ),
            (
                act("block-dirty-bitmap-add", b("p2")),
                "Bitmap already exists: p2",
            ),
            (
                act("block-dirty-bitmap-clear", b("p0")),
                "Bitmap 'p0' is currently in use by another operation and cannot be used",
            ),
            (
                act("block-dirty-bitmap-enable", b("zz")),
                "Dirty bitmap 'zz' not found",
            ),
        ];
        for (last, desc) in cases {
            let mut actions = all();
            actions.push(last);
            let e = exec(&d, "transaction", json!({ "actions": actions })).unwrap_err();
            assert_eq!(e.desc, desc);
            assert_eq!(state(&t), before, "after '{desc}'");
            assert_eq!(std::fs::read(&sidecar).unwrap(), file, "sidecar changed");
            assert!(!tmp_of(&sidecar).exists(), "a staged sidecar was left");
        }
        let e = exec(
            &d,
            "transaction",
            json!({"actions": all(), "properties": {"completion-mode": "grouped"}}),
        )
        .unwrap_err();
        assert_eq!(
            e.desc,
            "Action 'block-dirty-bitmap-add' does not support Transaction property completion-mode = grouped"
        );
        assert_eq!(state(&t), before);

        // The same actions commit, all at once, and survive a crash (no
        // clean shutdown) exactly.
        exec(&d, "transaction", json!({ "actions": all() })).unwrap();
        let after = state(&t);
        let names: Vec<&str> = after.iter().map(|s| s.0.as_str()).collect();
        assert_eq!(names, ["p2", "p1"]);
        assert_eq!(after[1].1, 3 * 64 * 1024, "p1 = m0 | p0 after its clear");
        assert!(after[1].2, "p1 enabled");
        drop(d);
        drop(t);
        let t = open(Arc::new(FileStore::new(&sidecar)));
        assert_eq!(state(&t), after);
    }

    /// The new sidecar cannot be staged, or cannot be put in place at the
    /// commit instant: the error is reported and every bit, flag and file
    /// is as before.
    #[test]
    fn a_commit_that_cannot_write_the_sidecar_changes_nothing() {
        let dir = Dir::new("commit");
        let sidecar = sidecar_path(&dir.0.join("img"));
        let store = Arc::new(FailingStore {
            inner: FileStore::new(&sidecar),
            fail: AtomicBool::new(false),
            fail_stage: AtomicBool::new(false),
        });
        let t = open(store.clone());
        let d = standard_dispatcher(Arc::new(Ctx(t.clone())), EventBus::new());
        populate(&d, &t);
        let before = state(&t);
        let file = std::fs::read(&sidecar).unwrap();
        let actions = json!({"actions": [
                act("block-dirty-bitmap-add", json!({"node": "disk0", "name": "p2", "persistent": true})),
                act("block-dirty-bitmap-clear", b("p0")),
                act("block-dirty-bitmap-merge", json!({"node": "disk0", "target": "p1", "bitmaps": ["m0"]})),
                act("block-dirty-bitmap-enable", b("p1")),
                act("block-dirty-bitmap-remove", b("m0")),
        ]});
        for flag in [&store.fail_stage, &store.fail] {
            flag.store(true, Ordering::SeqCst);
            let e = exec(&d, "transaction", actions.clone()).unwrap_err();
            assert!(e.desc.contains("injected"), "{}", e.desc);
            assert_eq!(state(&t), before);
            assert_eq!(std::fs::read(&sidecar).unwrap(), file);
            assert!(
                !tmp_of(&sidecar).exists(),
                "{}: a staged file was left",
                e.desc
            );
            flag.store(false, Ordering::SeqCst);
        }
        // And the bitmaps still work: the next commit writes them all.
        exec(
            &d,
            "transaction",
            json!({"actions": [act("block-dirty-bitmap-clear", b("p0"))]}),
        )
        .unwrap();
        drop(d);
        drop(t);
        let t = open(Arc::new(FileStore::new(&sidecar)));
        let p: Vec<_> = state(&t).into_iter().map(|s| (s.0, s.1, s.2)).collect();
        assert_eq!(
            p,
            [
                ("p1".to_string(), 64 * 1024, false),
                ("p0".to_string(), 0, true)
            ]
        );
    }

    /// Killed after the new sidecar was staged, before it was put in
    /// place: the next start has the old bitmaps and no staged file.
    #[test]
    fn killed_between_staging_and_commit_recovers_the_old_state() {
        let dir = Dir::new("kill");
        let sidecar = sidecar_path(&dir.0.join("img"));
        let t = open(Arc::new(FileStore::new(&sidecar)));
        let d = standard_dispatcher(Arc::new(Ctx(t.clone())), EventBus::new());
        populate(&d, &t);
        drop(d);
        let persistent: Vec<_> = state(&t).into_iter().filter(|s| s.3).collect();
        let p0_runs: Vec<(u64, u64)> = t.bitmap("p0").unwrap().dirty_ranges().collect();
        let mut txn = t.transaction();
        txn.add("p2", None, true, false).unwrap();
        txn.disable("p0").unwrap();
        txn.clear("p1").unwrap();
        txn.prepare().unwrap();
        assert!(tmp_of(&sidecar).exists(), "prepare stages the new sidecar");
        // The process dies here: no commit, no drop, no clean shutdown.
        std::mem::forget(txn);
        drop(t);
        let t = open(Arc::new(FileStore::new(&sidecar)));
        let recovered = state(&t);
        // p0 was recording: recovery adds the logged extents (over-marking
        // is allowed, a lost bit is not); p1 was not: exactly as it was.
        let shape = |v: &[(String, u64, bool, bool, String)]| -> Vec<(String, bool, bool)> {
            v.iter().map(|s| (s.0.clone(), s.2, s.3)).collect()
        };
        assert_eq!(shape(&recovered), shape(&persistent));
        assert_eq!(recovered[0], persistent[0]);
        let p0 = t.bitmap("p0").unwrap();
        assert!(p0_runs.iter().all(|(off, _)| p0.get(*off)));
        assert!(
            !tmp_of(&sidecar).exists(),
            "the staged file is removed at open"
        );

        // The first persistent bitmap of a disk, killed the same way: no
        // sidecar, and no staged file either.
        let d = standard_dispatcher(Arc::new(Ctx(t.clone())), EventBus::new());
        exec(
            &d,
            "transaction",
            json!({"actions": [act("block-dirty-bitmap-remove", b("p0")),
                               act("block-dirty-bitmap-remove", b("p1"))]}),
        )
        .unwrap();
        drop(d);
        assert!(!sidecar.exists());
        let mut txn = t.transaction();
        txn.add("p9", None, true, false).unwrap();
        txn.prepare().unwrap();
        assert!(tmp_of(&sidecar).exists());
        std::mem::forget(txn);
        drop(t);
        let t = open(Arc::new(FileStore::new(&sidecar)));
        assert!(t.list().is_empty());
        assert!(!sidecar.exists());
        assert!(
            !tmp_of(&sidecar).exists(),
            "the staged file is removed at open"
        );
    }
}
