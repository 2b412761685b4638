//! Table-driven test of the mapping state machine (FLASHCOPY.md §2.3) and the consistency-group
//! commands (§2.4) on a pure `Engine`: every (state, event) cell of §2.3, each built from scratch,
//! with the expected outcome written down as data.
//!
//! Reading the tables: `Next(s)` = accepted, the mapping ends in `s` (for "state kept" rows `s` is
//! the starting state); `Deleted` = accepted, the mapping is gone; `NoOp` = accepted and nothing
//! in the engine changed; `Rejected(kind)` = the documented error and the engine is `==` to its
//! clone from before. "—" and "n/a" cells of §2.3 are `Rejected`.
//!
//! Where a cell's outcome depends on a documented precondition (CopyComplete needs every grain
//! split and no dependant, CleanComplete needs nothing left to clean, S1 stays in `stopping` only
//! while a dependant needs grains), the primary cell uses a fixture that meets it and extra cells
//! below the 91 cover the other side.

use flashcopy_csi::engine::{
    Engine, EngineError, Event, GrainSize, GroupId, GroupState, Limits, MapId, MapState,
    MappingSpec, Op, VolId,
};

const GRAIN: GrainSize = GrainSize::K64;
/// Two grains per volume.
const GRAINS: u64 = 2;
const SIZE: u64 = GRAINS * 64 * 1024;
/// Start time of the subject mapping (and of a group start).
const NOW: u64 = 1_000;

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// An engine in a known state, and the mappings the cells look at.
struct Fx {
    e: Engine,
    /// The mapping the event is sent to.
    subject: MapId,
    /// An older snapshot of the subject's source that reads through the subject's target.
    dep: Option<MapId>,
}

fn apply(e: &mut Engine, op: Op) -> Vec<Event> {
    match e.apply(&op) {
        Ok(ev) => ev,
        Err(err) => panic!("fixture op {op:?} rejected: {err}"),
    }
}

fn vol(e: &mut Engine) -> VolId {
    let id = e.next_volume_id();
    apply(
        e,
        Op::CreateVolume {
            id,
            name: format!("v{}", id.0),
            size: SIZE,
            origin: String::new(),
        },
    );
    id
}

fn map(e: &mut Engine, spec: MappingSpec) -> MapId {
    let id = e.next_mapping_id();
    apply(e, Op::CreateMapping { id, spec });
    id
}

fn spec(source: VolId, target: VolId) -> MappingSpec {
    MappingSpec {
        grain: Some(GRAIN),
        ..MappingSpec::snapshot(source, target)
    }
}

fn prepare(e: &mut Engine, map: MapId) {
    apply(
        e,
        Op::Prepare {
            map,
            restore: false,
        },
    );
}

fn run(e: &mut Engine, map: MapId, now: u64) {
    prepare(e, map);
    apply(e, Op::FlushDone { map });
    apply(e, Op::Start { map, now });
}

fn split(e: &mut Engine, map: MapId, grains: std::ops::Range<u64>) {
    for grain in grains {
        apply(e, Op::MarkSplit { map, grain });
    }
}

fn stop(e: &mut Engine, map: MapId) {
    apply(
        e,
        Op::Stop {
            map,
            force: false,
            split: false,
        },
    );
}

fn bitmap_offline(e: &mut Engine, map: MapId) {
    apply(e, Op::BitmapOffline { map });
}

/// How the starting state of a cell is built.
#[derive(Clone, Copy, Debug)]
enum Setup {
    /// One mapping S→T (copy rate 0, 64 KiB grains), just created.
    Idle,
    /// As `Idle`, incremental.
    IdleIncr,
    /// As `IdleIncr`, after `BitmapOffline`.
    IdleIncrOff,
    /// As `Idle`, but T is the source of a copying mapping T→U (P1 precondition).
    IdleTargetFeeds,
    Preparing,
    PreparingIncr,
    PreparingIncrOff,
    Prepared,
    PreparedIncr,
    PreparedIncrOff,
    /// Lone mapping, started at `NOW`, nothing split.
    Copying,
    /// Lone mapping, every grain split: CopyComplete may fire.
    CopyingDone,
    /// As `CopyingDone`, with autodelete.
    CopyingDoneAuto,
    /// Lone mapping that got `BitmapOffline` while idle and was started with the flag still set.
    CopyingMetaFlag,
    /// Two snapshots of one source: the subject is the newer, grain 0 is split on its target and
    /// the older one (`dep`) reads grain 0 through it.
    CopyingFeeding,
    /// As `CopyingFeeding`, but every grain of the subject is split (progress 100); the older
    /// one still reads through it.
    CopyingFeedingFull,
    /// `CopyingFeeding` + Stop: grain 0 still has to be handed to the dependant.
    Stopping,
    /// `Stopping`, then the dependant got grain 0: nothing left to clean, target incomplete.
    StoppingClean,
    /// `CopyingFeedingFull` + Stop, then the dependant got every grain: nothing left to clean
    /// and the target was complete at stop time.
    StoppingFullClean,
    /// Lone mapping, started then stopped (nothing to clean, target incomplete).
    Stopped,
    StoppedIncr,
    StoppedIncrOff,
    /// `Copying` + BitmapOffline.
    Suspended,
    /// `Stopping` + BitmapOffline.
    SuspendedStopping,
}

fn lone(incr: bool, autodelete: bool) -> Fx {
    let mut e = Engine::new(Limits::default());
    let s = vol(&mut e);
    let t = vol(&mut e);
    let subject = map(
        &mut e,
        MappingSpec {
            incremental: incr,
            autodelete,
            ..spec(s, t)
        },
    );
    Fx {
        e,
        subject,
        dep: None,
    }
}

fn feeding(full: bool) -> Fx {
    let mut e = Engine::new(Limits::default());
    let s = vol(&mut e);
    let t_old = vol(&mut e);
    let t_new = vol(&mut e);
    let dep = map(&mut e, spec(s, t_old));
    let subject = map(&mut e, spec(s, t_new));
    run(&mut e, dep, NOW - 10);
    run(&mut e, subject, NOW);
    let grains = if full { 0..GRAINS } else { 0..1 };
    split(&mut e, subject, grains);
    assert_eq!(e.dependent_mappings(subject), vec![dep], "fixture: cascade");
    Fx {
        e,
        subject,
        dep: Some(dep),
    }
}

fn build(setup: Setup) -> Fx {
    use Setup::*;
    match setup {
        Idle => lone(false, false),
        IdleIncr => lone(true, false),
        IdleIncrOff => {
            let mut f = lone(true, false);
            bitmap_offline(&mut f.e, f.subject);
            f
        }
        IdleTargetFeeds => {
            let mut f = lone(false, false);
            let t = f.e.mapping(f.subject).unwrap().target;
            let u = vol(&mut f.e);
            let other = map(&mut f.e, spec(t, u));
            run(&mut f.e, other, NOW - 10);
            f
        }
        Preparing | PreparingIncr | PreparingIncrOff => {
            let mut f = lone(!matches!(setup, Preparing), false);
            prepare(&mut f.e, f.subject);
            if matches!(setup, PreparingIncrOff) {
                bitmap_offline(&mut f.e, f.subject);
            }
            f
        }
        Prepared | PreparedIncr | PreparedIncrOff => {
            let mut f = lone(!matches!(setup, Prepared), false);
            prepare(&mut f.e, f.subject);
            apply(&mut f.e, Op::FlushDone { map: f.subject });
            if matches!(setup, PreparedIncrOff) {
                bitmap_offline(&mut f.e, f.subject);
            }
            f
        }
        Copying | CopyingDone | CopyingDoneAuto => {
            let mut f = lone(false, matches!(setup, CopyingDoneAuto));
            run(&mut f.e, f.subject, NOW);
            if !matches!(setup, Copying) {
                split(&mut f.e, f.subject, 0..GRAINS);
            }
            f
        }
        CopyingMetaFlag => {
            let mut f = lone(false, false);
            bitmap_offline(&mut f.e, f.subject);
            run(&mut f.e, f.subject, NOW);
            assert!(f.e.mapping(f.subject).unwrap().bitmap_offline);
            f
        }
        CopyingFeeding => feeding(false),
        CopyingFeedingFull => feeding(true),
        Stopping | StoppingClean | SuspendedStopping => {
            let mut f = feeding(false);
            stop(&mut f.e, f.subject);
            match setup {
                StoppingClean => split(&mut f.e, f.dep.unwrap(), 0..1),
                SuspendedStopping => bitmap_offline(&mut f.e, f.subject),
                _ => {}
            }
            f
        }
        StoppingFullClean => {
            let mut f = feeding(true);
            stop(&mut f.e, f.subject);
            split(&mut f.e, f.dep.unwrap(), 0..GRAINS);
            f
        }
        Stopped | StoppedIncr | StoppedIncrOff => {
            let mut f = lone(!matches!(setup, Stopped), false);
            run(&mut f.e, f.subject, NOW);
            stop(&mut f.e, f.subject);
            if matches!(setup, StoppedIncrOff) {
                bitmap_offline(&mut f.e, f.subject);
            }
            f
        }
        Suspended => {
            let mut f = lone(false, false);
            run(&mut f.e, f.subject, NOW);
            bitmap_offline(&mut f.e, f.subject);
            f
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Events, expectations, checks
// ---------------------------------------------------------------------------------------------

/// The events of §2.3 (columns), plus `StopSplit` for extra cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ev {
    Prepare,
    PrepareRestore,
    FlushDone,
    FlushFailed,
    Start,
    Stop,
    StopForce,
    StopSplit,
    IoError,
    CopyComplete,
    CleanComplete,
    Delete,
    DeleteForce,
    BitmapOffline,
    BitmapOnline,
}

/// The 13 columns of §2.3.
const COLUMNS: [Ev; 13] = [
    Ev::Prepare,
    Ev::FlushDone,
    Ev::FlushFailed,
    Ev::Start,
    Ev::Stop,
    Ev::StopForce,
    Ev::IoError,
    Ev::CopyComplete,
    Ev::CleanComplete,
    Ev::Delete,
    Ev::DeleteForce,
    Ev::BitmapOffline,
    Ev::BitmapOnline,
];

impl Ev {
    fn op(self, map: MapId) -> Op {
        match self {
            Ev::Prepare => Op::Prepare {
                map,
                restore: false,
            },
            Ev::PrepareRestore => Op::Prepare { map, restore: true },
            Ev::FlushDone => Op::FlushDone { map },
            Ev::FlushFailed => Op::FlushFailed { map },
            Ev::Start => Op::Start { map, now: NOW + 1 },
            Ev::Stop => Op::Stop {
                map,
                force: false,
                split: false,
            },
            Ev::StopForce => Op::Stop {
                map,
                force: true,
                split: false,
            },
            Ev::StopSplit => Op::Stop {
                map,
                force: false,
                split: true,
            },
            Ev::IoError => Op::IoError { map },
            Ev::CopyComplete => Op::CopyComplete { map },
            Ev::CleanComplete => Op::CleanComplete { map },
            Ev::Delete => Op::DeleteMapping { map, force: false },
            Ev::DeleteForce => Op::DeleteMapping { map, force: true },
            Ev::BitmapOffline => Op::BitmapOffline { map },
            Ev::BitmapOnline => Op::BitmapOnline { map },
        }
    }
}

/// Which typed error a rejection must carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// CMMVC5903E, naming the mapping and its state.
    BadState,
    /// `rmfcmap` of a stopped mapping without -force.
    DeleteNeedsForce,
    /// P1: target feeds an active mapping and no -restore.
    TargetIsActiveSource,
    /// `-split` below 100 %.
    SplitIncomplete,
    /// A group command found the group in the wrong state.
    BadGroupState,
    /// `rmfcconsistgrp` without -force on a group with members.
    GroupNotEmpty,
    /// A grouped mapping driven on its own.
    InGroup,
}

fn kind_of(err: &EngineError) -> Option<Kind> {
    Some(match err {
        EngineError::BadState { .. } => Kind::BadState,
        EngineError::DeleteNeedsForce(_) => Kind::DeleteNeedsForce,
        EngineError::TargetIsActiveSource { .. } => Kind::TargetIsActiveSource,
        EngineError::SplitIncomplete(..) => Kind::SplitIncomplete,
        EngineError::BadGroupState { .. } => Kind::BadGroupState,
        EngineError::GroupNotEmpty(..) => Kind::GroupNotEmpty,
        EngineError::InGroup(..) => Kind::InGroup,
        _ => return None,
    })
}

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// Accepted; the mapping ends in this state.
    Next(MapState),
    /// Accepted; the mapping no longer exists.
    Deleted,
    /// Accepted; the engine did not change at all.
    NoOp,
    /// Rejected with this error; the engine did not change at all.
    Rejected(Kind),
}

/// Extra facts a cell checks after an accepted event.
#[derive(Clone, Copy, Debug)]
enum Also {
    Nothing,
    /// The dependant (`Fx::dep`) is in this state.
    Dependant(MapState),
    /// Host I/O (a read) to the subject's source / target fails as offline.
    Offline {
        source: bool,
        target: bool,
    },
    /// The subject's state changes, in order (every `Event::MapState` of the subject).
    Path(&'static [MapState]),
    /// The subject's `start_time` and `restoring`.
    Started(u64),
    Restoring(bool),
}

struct Cell {
    from: MapState,
    ev: Ev,
    setup: Setup,
    expect: Expect,
    also: Also,
}

const fn cell(from: MapState, ev: Ev, setup: Setup, expect: Expect) -> Cell {
    Cell {
        from,
        ev,
        setup,
        expect,
        also: Also::Nothing,
    }
}

const fn cell_also(from: MapState, ev: Ev, setup: Setup, expect: Expect, also: Also) -> Cell {
    Cell {
        from,
        ev,
        setup,
        expect,
        also,
    }
}

use Expect::{Deleted, Next, NoOp, Rejected};
use MapState::{
    Copying as COPYING, IdleOrCopied as IDLE, Prepared as PREPARED, Preparing as PREPARING,
    Stopped as STOPPED, Stopping as STOPPING, Suspended as SUSPENDED,
};

const BAD: Expect = Rejected(Kind::BadState);
const OFF_BOTH: Also = Also::Offline {
    source: true,
    target: true,
};
const OFF_TARGET: Also = Also::Offline {
    source: false,
    target: true,
};
const ONLINE: Also = Also::Offline {
    source: false,
    target: false,
};

/// The 91 cells of §2.3, row by row, in column order.
const TABLE: [Cell; 91] = {
    use Ev::*;
    use Setup as S;
    [
        // ---- idle_or_copied ----
        cell(IDLE, Prepare, S::Idle, Next(PREPARING)), // P1
        cell(IDLE, FlushDone, S::Idle, BAD),           // —
        cell(IDLE, FlushFailed, S::Idle, BAD),         // —
        cell(IDLE, Start, S::Idle, BAD),               // —
        cell(IDLE, Stop, S::Idle, NoOp),               // S0, §10.14
        cell(IDLE, StopForce, S::Idle, NoOp),          // no-op
        cell(IDLE, IoError, S::Idle, BAD),             // n/a
        cell(IDLE, CopyComplete, S::Idle, BAD),        // n/a
        cell(IDLE, CleanComplete, S::Idle, BAD),       // n/a
        cell(IDLE, Delete, S::Idle, Deleted),          // D1
        cell(IDLE, DeleteForce, S::Idle, Deleted),
        // volumes offline (incr. maps), state kept
        cell_also(IDLE, BitmapOffline, S::IdleIncr, Next(IDLE), OFF_BOTH),
        // volumes online, state kept
        cell_also(IDLE, BitmapOnline, S::IdleIncrOff, Next(IDLE), ONLINE),
        // ---- preparing ----
        cell(PREPARING, Prepare, S::Preparing, BAD), // —
        cell(PREPARING, FlushDone, S::Preparing, Next(PREPARED)),
        cell(PREPARING, FlushFailed, S::Preparing, Next(STOPPED)),
        cell(PREPARING, Start, S::Preparing, BAD),
        cell(PREPARING, Stop, S::Preparing, Next(STOPPED)), // [derived], §10.18
        cell(PREPARING, StopForce, S::Preparing, Next(STOPPED)),
        cell(PREPARING, IoError, S::Preparing, Next(STOPPED)),
        cell(PREPARING, CopyComplete, S::Preparing, BAD), // n/a
        cell(PREPARING, CleanComplete, S::Preparing, BAD), // n/a
        cell(PREPARING, Delete, S::Preparing, BAD),       // —
        cell(PREPARING, DeleteForce, S::Preparing, BAD),  // —
        cell_also(
            PREPARING,
            BitmapOffline,
            S::PreparingIncr,
            Next(PREPARING),
            OFF_BOTH,
        ),
        // The target stays inaccessible while preparing (§2.1).
        cell_also(
            PREPARING,
            BitmapOnline,
            S::PreparingIncrOff,
            Next(PREPARING),
            OFF_TARGET,
        ),
        // ---- prepared ----
        cell(PREPARED, Prepare, S::Prepared, BAD), // — (P2)
        cell(PREPARED, FlushDone, S::Prepared, BAD), // n/a
        cell(PREPARED, FlushFailed, S::Prepared, BAD), // n/a
        cell_also(
            PREPARED,
            Start,
            S::Prepared,
            Next(COPYING),
            Also::Started(NOW + 1),
        ), // T1
        cell(PREPARED, Stop, S::Prepared, Next(STOPPED)),
        cell(PREPARED, StopForce, S::Prepared, Next(STOPPED)),
        cell(PREPARED, IoError, S::Prepared, BAD), // n/a
        cell(PREPARED, CopyComplete, S::Prepared, BAD), // n/a
        cell(PREPARED, CleanComplete, S::Prepared, BAD), // n/a
        cell(PREPARED, Delete, S::Prepared, BAD),  // —
        cell(PREPARED, DeleteForce, S::Prepared, BAD), // —
        cell_also(
            PREPARED,
            BitmapOffline,
            S::PreparedIncr,
            Next(PREPARED),
            OFF_BOTH,
        ),
        cell_also(
            PREPARED,
            BitmapOnline,
            S::PreparedIncrOff,
            Next(PREPARED),
            OFF_TARGET,
        ),
        // ---- copying ----
        cell(COPYING, Prepare, S::Copying, BAD),     // —
        cell(COPYING, FlushDone, S::Copying, BAD),   // n/a
        cell(COPYING, FlushFailed, S::Copying, BAD), // n/a
        cell(COPYING, Start, S::Copying, BAD),       // —
        // S1: a dependant still needs grain 0, so the stopping copy runs.
        cell_also(
            COPYING,
            Stop,
            S::CopyingFeeding,
            Next(STOPPING),
            Also::Dependant(COPYING),
        ),
        // S2: stopped, and the dependant with it.
        cell_also(
            COPYING,
            StopForce,
            S::CopyingFeeding,
            Next(STOPPED),
            Also::Dependant(STOPPED),
        ),
        // → stopped; target offline, source online (§2.3 IoError).
        cell_also(COPYING, IoError, S::Copying, Next(STOPPED), OFF_TARGET),
        cell(COPYING, CopyComplete, S::CopyingDone, Next(IDLE)), // C1
        cell(COPYING, CleanComplete, S::Copying, BAD),           // n/a
        cell(COPYING, Delete, S::Copying, BAD),                  // — (stop first)
        cell(COPYING, DeleteForce, S::Copying, BAD),             // — (§10.1 KC)
        cell_also(
            COPYING,
            BitmapOffline,
            S::Copying,
            Next(SUSPENDED),
            OFF_BOTH,
        ),
        cell(COPYING, BitmapOnline, S::Copying, BAD), // n/a
        // ---- stopping ----
        cell(STOPPING, Prepare, S::Stopping, BAD),     // —
        cell(STOPPING, FlushDone, S::Stopping, BAD),   // n/a
        cell(STOPPING, FlushFailed, S::Stopping, BAD), // n/a
        cell(STOPPING, Start, S::Stopping, BAD),       // —
        cell(STOPPING, Stop, S::Stopping, NoOp),       // (continues)
        cell_also(
            STOPPING,
            StopForce,
            S::Stopping,
            Next(STOPPED),
            Also::Dependant(STOPPED),
        ), // S2
        cell(STOPPING, IoError, S::Stopping, Next(STOPPED)),
        cell(STOPPING, CopyComplete, S::Stopping, BAD), // n/a
        // S3: target incomplete ⇒ stopped.
        cell_also(
            STOPPING,
            CleanComplete,
            S::StoppingClean,
            Next(STOPPED),
            OFF_TARGET,
        ),
        cell(STOPPING, Delete, S::Stopping, BAD),      // —
        cell(STOPPING, DeleteForce, S::Stopping, BAD), // —
        cell_also(
            STOPPING,
            BitmapOffline,
            S::Stopping,
            Next(SUSPENDED),
            OFF_BOTH,
        ),
        cell(STOPPING, BitmapOnline, S::Stopping, BAD), // n/a
        // ---- stopped ----
        cell(STOPPED, Prepare, S::Stopped, Next(PREPARING)), // P1
        cell(STOPPED, FlushDone, S::Stopped, BAD),           // n/a
        cell(STOPPED, FlushFailed, S::Stopped, BAD),         // n/a
        cell(STOPPED, Start, S::Stopped, BAD),               // —
        cell(STOPPED, Stop, S::Stopped, NoOp),
        cell(STOPPED, StopForce, S::Stopped, NoOp),
        cell(STOPPED, IoError, S::Stopped, BAD),       // n/a
        cell(STOPPED, CopyComplete, S::Stopped, BAD),  // n/a
        cell(STOPPED, CleanComplete, S::Stopped, BAD), // n/a
        cell(
            STOPPED,
            Delete,
            S::Stopped,
            Rejected(Kind::DeleteNeedsForce),
        ), // — (needs -force)
        cell_also(STOPPED, DeleteForce, S::Stopped, Deleted, ONLINE), // D1: target online
        // §2.3 says "—" here, but §2.1's common rule ("if both nodes holding the bitmap are lost,
        // source and target go offline in any of idle/prepared/preparing/stopped states (for
        // incremental maps)" [FLEX347][RB507]) says the stopped map is affected like the idle,
        // preparing and prepared rows: state kept, volumes offline. The two sections disagree;
        // these two cells follow §2.1 (the engine's behaviour) — see the report.
        cell_also(
            STOPPED,
            BitmapOffline,
            S::StoppedIncr,
            Next(STOPPED),
            OFF_BOTH,
        ),
        cell_also(
            STOPPED,
            BitmapOnline,
            S::StoppedIncrOff,
            Next(STOPPED),
            OFF_TARGET,
        ),
        // ---- suspended ----
        cell(SUSPENDED, Prepare, S::Suspended, BAD), // —
        cell(SUSPENDED, FlushDone, S::Suspended, BAD), // n/a
        cell(SUSPENDED, FlushFailed, S::Suspended, BAD), // n/a
        cell(SUSPENDED, Start, S::Suspended, BAD),   // —
        cell(SUSPENDED, Stop, S::Suspended, Next(STOPPED)), // [derived], §10.18
        cell(SUSPENDED, StopForce, S::Suspended, Next(STOPPED)),
        cell(SUSPENDED, IoError, S::Suspended, BAD), // n/a
        cell(SUSPENDED, CopyComplete, S::Suspended, BAD), // n/a
        cell(SUSPENDED, CleanComplete, S::Suspended, BAD), // n/a
        cell(SUSPENDED, Delete, S::Suspended, BAD),  // —
        cell(SUSPENDED, DeleteForce, S::Suspended, BAD), // —
        cell(SUSPENDED, BitmapOffline, S::Suspended, NoOp), // stays
        // → copying (whichever it was) [RB507]; volumes back online.
        cell_also(SUSPENDED, BitmapOnline, S::Suspended, Next(COPYING), ONLINE),
    ]
};

/// The other side of the preconditions and "or" outcomes of the 91 cells.
const EXTRA: &[Cell] = {
    use Ev::*;
    use Setup as S;
    &[
        // Non-incremental maps: metadata loss leaves the volumes online (§2.3 "incr. maps").
        cell_also(IDLE, BitmapOffline, S::Idle, Next(IDLE), ONLINE),
        // P1 precondition: target is the source of an active mapping and no -restore.
        cell(
            IDLE,
            Prepare,
            S::IdleTargetFeeds,
            Rejected(Kind::TargetIsActiveSource),
        ),
        cell_also(
            IDLE,
            PrepareRestore,
            S::IdleTargetFeeds,
            Next(PREPARING),
            Also::Restoring(true),
        ),
        // The -restore flag is ignored when the target feeds nothing (§3.9).
        cell_also(
            IDLE,
            PrepareRestore,
            S::Idle,
            Next(PREPARING),
            Also::Restoring(false),
        ),
        // A stopped incremental mapping may be restarted (P1 from stopped).
        cell(STOPPED, Prepare, S::StoppedIncr, Next(PREPARING)),
        // S1 with nothing to clean: stopping, then at once S3 → stopped (target incomplete).
        cell_also(
            COPYING,
            Stop,
            S::Copying,
            Next(STOPPED),
            Also::Path(&[STOPPING, STOPPED]),
        ),
        // ... or → idle_or_copied when the target was complete at stop time (§10.2).
        cell_also(
            COPYING,
            Stop,
            S::CopyingDone,
            Next(IDLE),
            Also::Path(&[STOPPING, IDLE]),
        ),
        // S1 at 100 % with a dependant: the stopping copy still runs.
        cell_also(
            COPYING,
            Stop,
            S::CopyingFeedingFull,
            Next(STOPPING),
            Also::Dependant(COPYING),
        ),
        // -split only at progress 100.
        cell(
            COPYING,
            StopSplit,
            S::Copying,
            Rejected(Kind::SplitIncomplete),
        ),
        cell(COPYING, StopSplit, S::CopyingDone, Next(IDLE)),
        // IoError while copying stops what depends on the target too (data lost).
        cell_also(
            COPYING,
            IoError,
            S::CopyingFeeding,
            Next(STOPPED),
            Also::Dependant(STOPPED),
        ),
        // C1 preconditions: every grain split ...
        cell(COPYING, CopyComplete, S::Copying, BAD),
        // ... and no dependent mappings (§10.3).
        cell(COPYING, CopyComplete, S::CopyingFeedingFull, BAD),
        // C1 with autodelete: → deleted.
        cell(COPYING, CopyComplete, S::CopyingDoneAuto, Deleted),
        // BitmapOnline while copying is accepted only to clear a flag left from an earlier
        // BitmapOffline in idle (otherwise that mapping's volumes could never come back).
        cell(COPYING, BitmapOnline, S::CopyingMetaFlag, Next(COPYING)),
        // S3 precondition: grains left to clean.
        cell(STOPPING, CleanComplete, S::Stopping, BAD),
        // S3 when the target was complete at stop time: → idle_or_copied, target online.
        cell_also(
            STOPPING,
            CleanComplete,
            S::StoppingFullClean,
            Next(IDLE),
            ONLINE,
        ),
        // Stop of a stopping mapping with nothing left to clean finishes it.
        cell(STOPPING, Stop, S::StoppingClean, Next(STOPPED)),
        // Suspended from stopping returns to stopping [RB507].
        cell_also(
            SUSPENDED,
            BitmapOnline,
            S::SuspendedStopping,
            Next(STOPPING),
            OFF_TARGET,
        ),
        cell(SUSPENDED, Stop, S::SuspendedStopping, Next(STOPPED)),
        cell(SUSPENDED, BitmapOffline, S::SuspendedStopping, NoOp),
    ]
};

fn offline(e: &Engine, vol: VolId) -> bool {
    match e.check_io(vol, 0, 512) {
        Ok(_) => false,
        Err(EngineError::VolumeOffline { .. }) => true,
        Err(other) => panic!("read check of {vol}: unexpected {other}"),
    }
}

fn subject_path(ev: &[Event], subject: MapId) -> Vec<MapState> {
    ev.iter()
        .filter_map(|e| match e {
            Event::MapState { map, to, .. } if *map == subject => Some(*to),
            _ => None,
        })
        .collect()
}

/// Runs one cell; `Err` says what was wrong.
fn check(c: &Cell) -> Result<(), String> {
    let Fx {
        mut e,
        subject,
        dep,
    } = build(c.setup);
    let m = e.mapping(subject).unwrap();
    if m.state != c.from {
        return Err(format!(
            "fixture {:?} is {}, not {}",
            c.setup, m.state, c.from
        ));
    }
    let (source, target) = (m.source, m.target);
    let before = e.clone();
    let res = e.apply(&c.ev.op(subject));
    match (c.expect, res) {
        (Rejected(kind), Err(err)) => {
            if kind_of(&err) != Some(kind) {
                return Err(format!("rejected with {err:?}, expected {kind:?}"));
            }
            if e != before {
                return Err(format!("rejected ({err}) but the engine changed"));
            }
            if let EngineError::BadState { map, state, .. } = &err {
                let text = err.to_string();
                if *map != subject || *state != c.from || !text.contains("CMMVC5903E") {
                    return Err(format!("BadState names the wrong thing: {text}"));
                }
            }
            Ok(())
        }
        (Rejected(kind), Ok(ev)) => Err(format!("accepted ({ev:?}), expected {kind:?}")),
        (_, Err(err)) => Err(format!("rejected: {err} ({err:?})")),
        (NoOp, Ok(ev)) => {
            if !ev.is_empty() || e != before {
                return Err(format!("expected no change, got events {ev:?} / a change"));
            }
            Ok(())
        }
        (Deleted, Ok(ev)) => {
            if e.mapping(subject).is_some() {
                return Err("mapping still exists".into());
            }
            if !ev.contains(&Event::MapDeleted { map: subject }) {
                return Err(format!("no MapDeleted event: {ev:?}"));
            }
            check_also(c, &e, &ev, subject, dep, source, target)
        }
        (Next(to), Ok(ev)) => {
            let Some(m) = e.mapping(subject) else {
                return Err(format!("mapping deleted, expected {to}"));
            };
            if m.state != to {
                return Err(format!("ended in {}, expected {to}", m.state));
            }
            let path = subject_path(&ev, subject);
            if to == c.from && !path.is_empty() {
                return Err(format!("state kept but events say {path:?}"));
            }
            if to != c.from && path.last() != Some(&to) {
                return Err(format!("events {ev:?} do not end in {to}"));
            }
            check_also(c, &e, &ev, subject, dep, source, target)
        }
    }
}

fn check_also(
    c: &Cell,
    e: &Engine,
    ev: &[Event],
    subject: MapId,
    dep: Option<MapId>,
    source: VolId,
    target: VolId,
) -> Result<(), String> {
    match c.also {
        Also::Nothing => Ok(()),
        Also::Dependant(want) => {
            let d = dep.ok_or("cell checks a dependant the fixture lacks")?;
            let st = e.mapping(d).map(|m| m.state);
            (st == Some(want))
                .then_some(())
                .ok_or(format!("dependant is {st:?}, expected {want}"))
        }
        Also::Offline {
            source: s,
            target: t,
        } => {
            let got = (offline(e, source), offline(e, target));
            (got == (s, t)).then_some(()).ok_or(format!(
                "(source, target) offline = {got:?}, expected {:?}",
                (s, t)
            ))
        }
        Also::Path(want) => {
            let got = subject_path(ev, subject);
            (got == want)
                .then_some(())
                .ok_or(format!("state path {got:?}, expected {want:?}"))
        }
        Also::Started(t) => {
            let got = e.mapping(subject).and_then(|m| m.start_time);
            (got == Some(t))
                .then_some(())
                .ok_or(format!("start_time {got:?}, expected {t}"))
        }
        Also::Restoring(r) => {
            let got = e.mapping(subject).map(|m| m.restoring);
            (got == Some(r))
                .then_some(())
                .ok_or(format!("restoring {got:?}, expected {r}"))
        }
    }
}

fn run_cells<'a>(cells: impl IntoIterator<Item = &'a Cell>) {
    let failures: Vec<String> = cells
        .into_iter()
        .filter_map(|c| {
            check(c).err().map(|why| {
                format!(
                    "{} × {:?} (fixture {:?}, expected {:?}): {why}",
                    c.from, c.ev, c.setup, c.expect
                )
            })
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} cell(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn table_covers_every_state_event_pair_once() {
    for (i, s) in MapState::ALL.iter().enumerate() {
        for (j, ev) in COLUMNS.iter().enumerate() {
            let c = &TABLE[i * COLUMNS.len() + j];
            assert_eq!(
                (c.from, c.ev),
                (*s, *ev),
                "table order at row {s}, column {ev:?}"
            );
        }
    }
}

#[test]
fn mapping_state_table() {
    run_cells(TABLE.iter());
}

#[test]
fn mapping_state_table_preconditions() {
    run_cells(EXTRA.iter());
}

// ---------------------------------------------------------------------------------------------
// Consistency groups (§2.4, §4.2)
// ---------------------------------------------------------------------------------------------

/// Group states of §2.4: `empty` plus the mapping states.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GSetup {
    Empty,
    Idle,
    Preparing,
    Prepared,
    /// Started at `NOW`; each member's target feeds an older stand-alone snapshot of its
    /// source, with grain 0 split on the member, so a stop has cleaning to do.
    Copying,
    /// `Copying` + group stop: every member stopping.
    Stopping,
    /// `Prepared` + group stop.
    Stopped,
    /// `Copying` + BitmapOffline on every member.
    Suspended,
}

const GSETUPS: [GSetup; 8] = [
    GSetup::Empty,
    GSetup::Idle,
    GSetup::Preparing,
    GSetup::Prepared,
    GSetup::Copying,
    GSetup::Stopping,
    GSetup::Stopped,
    GSetup::Suspended,
];

impl GSetup {
    fn state(self) -> GroupState {
        match self {
            GSetup::Empty => GroupState::Empty,
            GSetup::Idle => GroupState::Map(IDLE),
            GSetup::Preparing => GroupState::Map(PREPARING),
            GSetup::Prepared => GroupState::Map(PREPARED),
            GSetup::Copying => GroupState::Map(COPYING),
            GSetup::Stopping => GroupState::Map(STOPPING),
            GSetup::Stopped => GroupState::Map(STOPPED),
            GSetup::Suspended => GroupState::Map(SUSPENDED),
        }
    }
}

struct GFx {
    e: Engine,
    group: GroupId,
    members: Vec<MapId>,
    /// Stand-alone older snapshots reading through the members' targets.
    deps: Vec<MapId>,
}

fn group_op(group: GroupId, op: GCmd) -> Op {
    match op {
        GCmd::Prepare => Op::PrepareGroup {
            group,
            restore: false,
        },
        GCmd::FlushDone => Op::GroupFlushDone { group },
        GCmd::FlushFailed => Op::GroupFlushFailed { group },
        GCmd::Start => Op::StartGroup { group, now: NOW },
        GCmd::Stop => Op::StopGroup {
            group,
            force: false,
            split: false,
        },
        GCmd::StopForce => Op::StopGroup {
            group,
            force: true,
            split: false,
        },
        GCmd::Delete => Op::DeleteGroup {
            group,
            force: false,
        },
        GCmd::DeleteForce => Op::DeleteGroup { group, force: true },
    }
}

fn build_group(setup: GSetup) -> GFx {
    let mut e = Engine::new(Limits::default());
    let group = e.next_group_id();
    apply(
        &mut e,
        Op::CreateGroup {
            id: group,
            name: Some("cg".into()),
            autodelete: false,
        },
    );
    let mut f = GFx {
        e,
        group,
        members: Vec::new(),
        deps: Vec::new(),
    };
    if setup == GSetup::Empty {
        return f;
    }
    for _ in 0..2 {
        let e = &mut f.e;
        let s = vol(e);
        let old = vol(e);
        let t = vol(e);
        let dep = map(e, spec(s, old));
        run(e, dep, NOW - 10);
        let m = map(
            e,
            MappingSpec {
                group: Some(group),
                ..spec(s, t)
            },
        );
        f.deps.push(dep);
        f.members.push(m);
    }
    let (e, g) = (&mut f.e, group);
    let steps: &[GCmd] = match setup {
        GSetup::Empty | GSetup::Idle => &[],
        GSetup::Preparing => &[GCmd::Prepare],
        GSetup::Prepared => &[GCmd::Prepare, GCmd::FlushDone],
        GSetup::Copying | GSetup::Stopping | GSetup::Suspended => {
            &[GCmd::Prepare, GCmd::FlushDone, GCmd::Start]
        }
        GSetup::Stopped => &[GCmd::Prepare, GCmd::FlushDone, GCmd::Stop],
    };
    for step in steps {
        apply(e, group_op(g, *step));
    }
    if matches!(
        setup,
        GSetup::Copying | GSetup::Stopping | GSetup::Suspended
    ) {
        for &m in &f.members {
            split(e, m, 0..1);
        }
    }
    match setup {
        GSetup::Stopping => {
            apply(e, group_op(g, GCmd::Stop));
        }
        GSetup::Suspended => {
            for &m in &f.members {
                bitmap_offline(e, m);
            }
        }
        _ => {}
    }
    f
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GCmd {
    Prepare,
    FlushDone,
    FlushFailed,
    Start,
    Stop,
    StopForce,
    Delete,
    DeleteForce,
}

const GCMDS: [GCmd; 8] = [
    GCmd::Prepare,
    GCmd::FlushDone,
    GCmd::FlushFailed,
    GCmd::Start,
    GCmd::Stop,
    GCmd::StopForce,
    GCmd::Delete,
    GCmd::DeleteForce,
];

#[derive(Clone, Copy, Debug)]
enum GExpect {
    /// Accepted; every member in this state (and the group reports it).
    Next(MapState),
    /// Accepted; the group is gone, its members stand alone in the states they had.
    Deleted,
    /// Accepted; nothing changed.
    NoOp,
    /// Rejected with this error; nothing changed.
    Rejected(Kind),
}

/// `rmfcconsistgrp` is not in §2.4: the group cells below follow the engine's rule (documented
/// on `Op::DeleteGroup`): an empty group goes; a group with members needs -force, and then its
/// members must be deletable-state (idle_or_copied or stopped, as D1) and become stand-alone.
///
/// `stopfcconsistgrp` is "S1/S2 on all members" (§2.4), so its outcome per member follows the
/// mapping rows of §2.3: a no-op on idle_or_copied and stopped members (S0), → stopped from
/// preparing ([derived]). Rows: (group state, [prepare, flush done, flush failed, start, stop,
/// stop -force, delete, delete -force]).
const GROUP_TABLE: [(GSetup, [GExpect; 8]); 8] = {
    use GExpect::Next as N;
    use GExpect::{Deleted, NoOp, Rejected};
    const BS: GExpect = Rejected(Kind::BadState);
    const BG: GExpect = Rejected(Kind::BadGroupState);
    const NE: GExpect = Rejected(Kind::GroupNotEmpty);
    [
        // An empty group cannot be prepared, started or stopped; it can be deleted.
        (GSetup::Empty, [BG, BG, BG, BG, BG, BG, Deleted, Deleted]),
        (
            GSetup::Idle,
            [N(PREPARING), BG, BG, BG, NoOp, NoOp, NE, Deleted],
        ),
        (
            GSetup::Preparing,
            [
                BS,
                N(PREPARED),
                N(STOPPED),
                BG,
                N(STOPPED),
                N(STOPPED),
                NE,
                BG,
            ],
        ),
        (
            GSetup::Prepared,
            [BS, BG, BG, N(COPYING), N(STOPPED), N(STOPPED), NE, BG],
        ),
        (
            GSetup::Copying,
            [BS, BG, BG, BG, N(STOPPING), N(STOPPED), NE, BG],
        ),
        (GSetup::Stopping, [BS, BG, BG, BG, NoOp, N(STOPPED), NE, BG]),
        (
            GSetup::Stopped,
            [N(PREPARING), BG, BG, BG, NoOp, NoOp, NE, Deleted],
        ),
        (
            GSetup::Suspended,
            [BS, BG, BG, BG, N(STOPPED), N(STOPPED), NE, BG],
        ),
    ]
};

fn check_group(setup: GSetup, cmd: GCmd, expect: GExpect) -> Result<(), String> {
    let GFx {
        mut e,
        group,
        members,
        deps,
    } = build_group(setup);
    let st = e.group_state(group);
    if st != Some(setup.state()) {
        return Err(format!("fixture is {st:?}"));
    }
    let before = e.clone();
    let states_before: Vec<MapState> = members
        .iter()
        .map(|m| e.mapping(*m).unwrap().state)
        .collect();
    let res = e.apply(&group_op(group, cmd));
    match (expect, res) {
        (GExpect::Rejected(kind), Err(err)) => {
            if kind_of(&err) != Some(kind) {
                return Err(format!("rejected with {err:?}, expected {kind:?}"));
            }
            if e != before {
                return Err(format!("rejected ({err}) but the engine changed"));
            }
            Ok(())
        }
        (GExpect::Rejected(kind), Ok(ev)) => Err(format!("accepted ({ev:?}), expected {kind:?}")),
        (_, Err(err)) => Err(format!("rejected: {err} ({err:?})")),
        (GExpect::NoOp, Ok(ev)) => (ev.is_empty() && e == before)
            .then_some(())
            .ok_or(format!("expected no change, got {ev:?}")),
        (GExpect::Deleted, Ok(ev)) => {
            if e.group(group).is_some() || !ev.contains(&Event::GroupDeleted { group }) {
                return Err(format!("group not deleted: {ev:?}"));
            }
            for (m, st) in members.iter().zip(&states_before) {
                let mm = e.mapping(*m).ok_or(format!("member {m} vanished"))?;
                if mm.group.is_some() || mm.state != *st {
                    return Err(format!("member {m} is {} in {:?}", mm.state, mm.group));
                }
            }
            Ok(())
        }
        (GExpect::Next(to), Ok(_)) => {
            for m in &members {
                let s = e.mapping(*m).unwrap().state;
                if s != to {
                    return Err(format!("member {m} is {s}, expected {to}"));
                }
            }
            if e.group_state(group) != Some(GroupState::Map(to)) {
                return Err(format!("group reports {:?}", e.group_state(group)));
            }
            // S2 through the group: the members' dependants stop with them.
            if cmd == GCmd::StopForce && matches!(setup, GSetup::Copying | GSetup::Stopping) {
                for d in &deps {
                    let s = e.mapping(*d).unwrap().state;
                    if s != STOPPED {
                        return Err(format!("dependant {d} is {s} after a forced stop"));
                    }
                }
            }
            Ok(())
        }
    }
}

#[test]
fn group_command_table() {
    let mut failures = Vec::new();
    for (i, (setup, row)) in GROUP_TABLE.iter().enumerate() {
        assert_eq!(*setup, GSETUPS[i], "group table order");
        for (cmd, expect) in GCMDS.iter().zip(row) {
            if let Err(why) = check_group(*setup, *cmd, *expect) {
                failures.push(format!(
                    "group {} × {cmd:?} (expected {expect:?}): {why}",
                    setup.state()
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} group cell(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Mappings inside a group cannot be prepared, started or stopped individually (§4.2,
/// [CLI-PRE][CLI-SP831]); nor can the data path's flush events address them one by one.
#[test]
fn grouped_mappings_cannot_be_driven_individually() {
    let cases: [(GSetup, Ev); 8] = [
        (GSetup::Idle, Ev::Prepare),
        (GSetup::Idle, Ev::PrepareRestore),
        (GSetup::Preparing, Ev::FlushDone),
        (GSetup::Preparing, Ev::FlushFailed),
        (GSetup::Prepared, Ev::Start),
        (GSetup::Prepared, Ev::Stop),
        (GSetup::Copying, Ev::Stop),
        (GSetup::Copying, Ev::StopForce),
    ];
    let mut failures = Vec::new();
    for (setup, ev) in cases {
        let GFx {
            mut e,
            group,
            members,
            ..
        } = build_group(setup);
        let before = e.clone();
        let m = members[0];
        match e.apply(&ev.op(m)) {
            Err(EngineError::InGroup(mm, g)) if mm == m && g == group && e == before => {}
            other => failures.push(format!(
                "group {} × {ev:?} on member {m}: {other:?} (changed: {})",
                setup.state(),
                e != before
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// T1 for a group is one op: every member goes prepared → copying inside it, with one
/// `start_time`, and nothing else changes state (§2.3 T1, §4.2).
#[test]
fn group_start_is_one_op_with_one_start_time() {
    let GFx {
        mut e,
        group,
        members,
        deps,
    } = build_group(GSetup::Prepared);
    let deps_before: Vec<_> = deps.iter().map(|d| e.mapping(*d).cloned()).collect();
    let ev = e.apply(&Op::StartGroup { group, now: NOW }).unwrap();
    let switched: Vec<MapId> = ev
        .iter()
        .filter_map(|x| match x {
            Event::MapState {
                map,
                from: PREPARED,
                to: COPYING,
            } => Some(*map),
            _ => None,
        })
        .collect();
    assert_eq!(switched, members, "one op switches every member: {ev:?}");
    assert_eq!(ev.len(), members.len(), "no other events: {ev:?}");
    for m in &members {
        let mm = e.mapping(*m).unwrap();
        assert_eq!(
            (mm.state, mm.start_time),
            (COPYING, Some(NOW)),
            "member {m}"
        );
    }
    let deps_after: Vec<_> = deps.iter().map(|d| e.mapping(*d).cloned()).collect();
    assert_eq!(
        deps_before
            .iter()
            .map(|d| d.as_ref().map(|m| m.state))
            .collect::<Vec<_>>(),
        deps_after
            .iter()
            .map(|d| d.as_ref().map(|m| m.state))
            .collect::<Vec<_>>(),
    );
}

/// §4.4 [derived]: the group is the unit of state; a flush failure or an I/O error of one member
/// stops every member.
#[test]
fn one_member_failing_stops_the_group() {
    let GFx {
        mut e,
        group,
        members,
        ..
    } = build_group(GSetup::Copying);
    e.apply(&Op::IoError { map: members[1] }).unwrap();
    for m in &members {
        assert_eq!(
            e.mapping(*m).unwrap().state,
            STOPPED,
            "member {m} after IoError"
        );
    }
    assert_eq!(e.group_state(group), Some(GroupState::Map(STOPPED)));

    let GFx {
        mut e,
        group,
        members,
        ..
    } = build_group(GSetup::Preparing);
    e.apply(&Op::IoError { map: members[0] }).unwrap();
    for m in &members {
        assert_eq!(
            e.mapping(*m).unwrap().state,
            STOPPED,
            "member {m} after IoError"
        );
    }
    assert_eq!(e.group_state(group), Some(GroupState::Map(STOPPED)));
}
