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

use super::args::Args;
use super::commands::{self, AddArgs, MergeArgs};
use super::context::{BitmapOpError, BitmapTransaction, DirtyBitmaps, ManagementContext};
use super::error::QmpError;
use serde_json::{json, Value};

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

/// Reads one element of `actions` (`{"type", "data"}`), as QEMU's input
/// visitor does: the type, then the data, then unexpected members.
fn parse_action(path: &str, v: Value) -> Result<Box<dyn Action>, QmpError> {
    let mut a = Args::nested(path, v)?;
    let kind = a.req_str("type")?;
    let Some(&kind) = TYPES.iter().find(|t| **t == kind) else {
        // QEMU names the discriminator without its path here.
        return Err(QmpError::generic(format!(
            "Parameter 'type' does not accept value '{kind}'"
        )));
    };
    let data_path = a.path("data");
    let data = Args::nested(&data_path, a.required("data")?)?;
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
pub fn transaction(ctx: &dyn ManagementContext, mut args: Args) -> Result<Value, QmpError> {
    let items = args.req_list("actions")?;
    let mut actions = Vec::with_capacity(items.len());
    for (path, v) in items {
        actions.push(parse_action(&path, v)?);
    }
    let mut mode = CompletionMode::Individual;
    if let Some(props) = args.take("properties") {
        let mut props = Args::nested("properties", props)?;
        if props.opt_enum("completion-mode", &["individual", "grouped"])? == Some("grouped".into())
        {
            mode = CompletionMode::Grouped;
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
        let bitmaps = tx.bitmaps.take();
        let mut committed = Err(QmpError::generic("guest I/O was not held"));
        let mut bitmaps = Some(bitmaps);
        let held = ctx.with_guest_io_held(&mut || {
            let Some(bitmaps) = bitmaps.take() else {
                return;
            };
            committed = match bitmaps.map(|b| b.commit()) {
                Some(Err(e)) => Err(QmpError::generic(e.to_string())),
                _ => Ok(()),
            };
            if committed.is_ok() {
                for a in actions.iter_mut() {
                    a.commit(&mut tx);
                }
            }
        });
        result = held.and(committed);
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
