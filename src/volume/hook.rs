//! A scheduling seam for tests: named points of the data path where a callback may pause the
//! thread that reached it or yield, to force one interleaving (a deterministic test) or to
//! widen the windows between planning and executing (a stress test). No-op unless a test sets
//! it; one atomic load per point otherwise.

use super::Pool;
use crate::engine::{MapId, VolId};
use std::sync::OnceLock;

/// A point of the data path, reached with the locks its description names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HookPoint {
    /// A write found grains that need a copy or a mark (checked under the gate, without grain
    /// locks); it locks them next.
    WriteChecked {
        /// The volume written.
        vol: VolId,
    },
    /// A grain lock a write or a copy step needs is held by another thread: this one waits
    /// for it next.
    LockWait,
    /// A write planned its copies and marks under its grain locks; the copies run next.
    WritePlanned {
        /// The volume written.
        vol: VolId,
    },
    /// A background or cleaning step chose its grains (without grain locks); it locks them
    /// next.
    BatchChosen {
        /// The mapping copied or cleaned.
        map: MapId,
    },
    /// A background or cleaning step copied its grains under their locks; their marks commit
    /// next.
    BatchCopied {
        /// The mapping copied or cleaned.
        map: MapId,
    },
}

type Callback = Box<dyn Fn(HookPoint) + Send + Sync>;

/// The callback, set once.
#[derive(Default)]
pub(super) struct Hook(OnceLock<Callback>);

impl Pool {
    /// For tests: calls `f` at every [`HookPoint`], from the thread that reached it. Only the
    /// first callback is kept; returns false if one was set already.
    pub fn set_test_hook(&self, f: impl Fn(HookPoint) + Send + Sync + 'static) -> bool {
        self.hook.0.set(Box::new(f)).is_ok()
    }

    pub(super) fn at(&self, point: HookPoint) {
        if let Some(f) = self.hook.0.get() {
            f(point);
        }
    }
}
