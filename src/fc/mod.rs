//! `flashcopy-csi fc`: the operator's FlashCopy command line over the agent API, with IBM
//! Spectrum Virtualize verbs (`mkfcmap`, `lsfcmap`, `startfcconsistgrp`, ...).
//!
//! Objects are named by id or by name. Listings are aligned tables with IBM-like columns, or
//! JSON with `-o json` (an array for listings, an object otherwise). A rejected command prints
//! the agent's reason (which names the rule) and exits with 1; an unreachable agent exits with
//! 3; usage errors exit with 2.

pub mod output;

use crate::proto::agent::v1 as pb;
use crate::proto::agent::v1::agent_client::AgentClient;
use clap::{Subcommand, ValueEnum};
use output as out;
use output::Output;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// `println!` that ignores a closed stdout (`fc lsfcmap | head`).
macro_rules! outln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}

/// `print!` that ignores a closed stdout.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}

/// `flashcopy-csi fc` arguments.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The agent: unix://PATH (e.g. unix://DIR/agent.sock), a socket path, https://HOST:PORT
    /// (with --agent-tls-ca/--agent-tls-cert/--agent-tls-key) or http://HOST:PORT.
    #[arg(long, value_name = "URI", global = true)]
    pub agent: Option<String>,
    /// Client certificate and agent CA for an https:// agent.
    #[command(flatten)]
    pub agent_tls: crate::tls::ClientArgs,
    /// Output format (json: an array for listings, an object otherwise).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    /// What to do.
    #[command(subcommand)]
    pub verb: Verb,
}

/// `on` or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Create a volume: `mkvol NAME SIZE` (SIZE in bytes, or with a unit: 64M, 1G, 1GiB).
    Mkvol {
        /// Name (letters, digits, `.`, `_`, `-`; not starting with a digit).
        name: String,
        /// Size.
        size: String,
    },
    /// List volumes, or show one in detail.
    Lsvol {
        /// Volume id or name.
        volume: Option<String>,
    },
    /// Resize a volume that no mapping uses.
    Resizevol {
        /// Volume id or name.
        volume: String,
        /// New size.
        size: String,
    },
    /// Delete a volume that no mapping uses.
    Rmvol {
        /// Volume id or name.
        volume: String,
    },
    /// Create a FlashCopy mapping.
    Mkfcmap {
        /// Source volume (id or name).
        #[arg(long)]
        source: String,
        /// Target volume (id or name); if its size differs from the source's, the smaller
        /// one must be a whole number of grains (the mapping covers the smaller size).
        #[arg(long)]
        target: String,
        /// Name [default: fcmapN, N being its id].
        #[arg(long)]
        name: Option<String>,
        /// Background copy rate 0-150 (0: a snapshot, copy-on-write only) [default: 50].
        #[arg(long)]
        copyrate: Option<u32>,
        /// Cleaning rate 0-150 [default: 50].
        #[arg(long)]
        cleanrate: Option<u32>,
        /// Grain size in KiB, 64 or 256 [default: as the connected mappings, else 256].
        #[arg(long)]
        grainsize: Option<u32>,
        /// Keep a difference bitmap so a restart copies only what changed.
        #[arg(long)]
        incremental: bool,
        /// Delete the mapping when its background copy completes.
        #[arg(long)]
        autodelete: bool,
        /// Consistency group to join (id or name).
        #[arg(long)]
        consistgrp: Option<String>,
    },
    /// List mappings (of one group with --consistgrp), or show one in detail.
    Lsfcmap {
        /// Mapping id or name.
        mapping: Option<String>,
        /// Only the mappings of this consistency group.
        #[arg(long)]
        consistgrp: Option<String>,
    },
    /// Prepare a mapping (flush the source; the target goes offline until the start).
    Prestartfcmap {
        /// Mapping id or name.
        mapping: String,
        /// Allow a target that feeds other active mappings (restore).
        #[arg(long)]
        restore: bool,
    },
    /// Start (trigger) a prepared mapping: the point in time is now.
    Startfcmap {
        /// Mapping id or name.
        mapping: String,
        /// Prepare first.
        #[arg(long)]
        prep: bool,
        /// Allow a target that feeds other active mappings (restore).
        #[arg(long)]
        restore: bool,
    },
    /// Stop a mapping (cleaning first, unless --force).
    Stopfcmap {
        /// Mapping id or name.
        mapping: String,
        /// Skip cleaning; dependent mappings stop too and their targets go offline.
        #[arg(long)]
        force: bool,
        /// Only at 100% progress: the target becomes independent at once.
        #[arg(long, conflicts_with = "force")]
        split: bool,
    },
    /// Delete a mapping (--force for a stopped one, whose target is incomplete).
    Rmfcmap {
        /// Mapping id or name.
        mapping: String,
        /// Delete even though the target is incomplete.
        #[arg(long)]
        force: bool,
    },
    /// Change a mapping's name, rates, autodelete or consistency group.
    Chfcmap {
        /// Mapping id or name.
        mapping: String,
        /// New name (alone: not with other changes).
        #[arg(long)]
        name: Option<String>,
        /// New background copy rate 0-150.
        #[arg(long)]
        copyrate: Option<u32>,
        /// New cleaning rate 0-150.
        #[arg(long)]
        cleanrate: Option<u32>,
        /// Delete the mapping when its background copy completes.
        #[arg(long, value_enum)]
        autodelete: Option<OnOff>,
        /// Move the mapping into this consistency group.
        #[arg(long, conflicts_with = "noconsistgrp")]
        consistgrp: Option<String>,
        /// Make the mapping stand-alone.
        #[arg(long)]
        noconsistgrp: bool,
    },
    /// Create a consistency group.
    Mkfcconsistgrp {
        /// Name [default: fccstgrpN, N being its id].
        #[arg(long)]
        name: Option<String>,
        /// Delete the group when its last mapping leaves.
        #[arg(long)]
        autodelete: bool,
    },
    /// List consistency groups, or show one in detail with its mappings.
    Lsfcconsistgrp {
        /// Group id or name.
        group: Option<String>,
    },
    /// Prepare every mapping of a group.
    Prestartfcconsistgrp {
        /// Group id or name.
        group: String,
        /// Allow targets that feed other active mappings (restore).
        #[arg(long)]
        restore: bool,
    },
    /// Start a group: one point in time for every member (I/O paused, drained, switched).
    Startfcconsistgrp {
        /// Group id or name.
        group: String,
        /// Prepare first.
        #[arg(long)]
        prep: bool,
        /// Allow targets that feed other active mappings (restore).
        #[arg(long)]
        restore: bool,
    },
    /// Stop every mapping of a group.
    Stopfcconsistgrp {
        /// Group id or name.
        group: String,
        /// Skip cleaning.
        #[arg(long)]
        force: bool,
        /// Only when every member is at 100%.
        #[arg(long, conflicts_with = "force")]
        split: bool,
    },
    /// Delete a group (--force when it has mappings: they become stand-alone).
    Rmfcconsistgrp {
        /// Group id or name.
        group: String,
        /// Delete even with mappings in it.
        #[arg(long)]
        force: bool,
    },
    /// Wait until a mapping's background copy (or cleaning) finishes, with a progress bar.
    Wait {
        /// Mapping id or name.
        mapping: String,
        /// Give up after this many seconds (exit 1).
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
    },
    /// Changed-block tracking: the extents of a started snapshot mapping's target that hold
    /// data (byte offset and length, whole grains, merged where adjacent).
    Lsfcmapallocated {
        /// Snapshot mapping id or name.
        mapping: String,
        /// List from the grain that holds this byte offset.
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// Changed-block tracking: the extents where snapshot TARGET's image may differ from the
    /// older snapshot BASE's (two mappings of the same source volume): copy these from TARGET's
    /// export onto a copy of BASE's image to get TARGET's.
    Lsfcmapdelta {
        /// The older snapshot mapping (id or name).
        base: String,
        /// The newer snapshot mapping (id or name).
        target: String,
        /// List from the grain that holds this byte offset.
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// Follow the agent's events (state changes, starts with their pause) until interrupted.
    Events,
    /// Show the agent: endpoints, object counts, data-path counters, start pause windows.
    Lssystem,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
enum FcError {
    /// The agent could not be reached.
    #[error("cannot reach the agent at {uri}: {why}")]
    Connect { uri: String, why: String },
    /// The agent rejected the command or failed.
    #[error("{}", .0.message())]
    Rejected(Status, Option<String>),
    /// Bad input caught before calling the agent, or a failed wait.
    #[error("{0}")]
    Usage(String),
}

impl From<Status> for FcError {
    fn from(s: Status) -> Self {
        FcError::Rejected(s, None)
    }
}

/// Adds a hint to a rejection.
fn hint(e: Status, code: Code, text: impl FnOnce() -> String) -> FcError {
    let h = (e.code() == code).then(text);
    FcError::Rejected(e, h)
}

/// Runs a `fc` command; prints results on stdout, errors on stderr.
pub fn main(args: Args) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                FcError::Rejected(_, Some(h)) => eprintln!("hint: {h}"),
                FcError::Connect { .. } => return ExitCode::from(3),
                _ => {}
            }
            ExitCode::FAILURE
        }
    }
}

/// Turns `--agent` into an endpoint URI.
fn endpoint_uri(agent: &str) -> String {
    if agent.contains("://") || agent.starts_with("unix:") {
        agent.to_string()
    } else {
        format!("unix://{agent}")
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

async fn connect(
    agent: Option<&str>,
    tls: &crate::tls::ClientArgs,
) -> Result<AgentClient<Channel>, FcError> {
    let agent = agent.ok_or_else(|| {
        FcError::Usage("no agent given: use --agent unix://DIR/agent.sock".into())
    })?;
    let uri = endpoint_uri(agent);
    let err = |why: String| FcError::Connect {
        uri: uri.clone(),
        why,
    };
    let tls = tls.load().map_err(|e| FcError::Usage(e.to_string()))?;
    let ep = crate::tls::endpoint(&uri, tls.as_ref())
        .map_err(err)?
        .connect_timeout(Duration::from_secs(5));
    let ch = ep.connect().await.map_err(|e| err(chain(&e)))?;
    Ok(AgentClient::new(ch))
}

fn print_json(v: &serde_json::Value) {
    outln!(
        "{}",
        serde_json::to_string_pretty(v).expect("JSON values always serialise")
    );
}

/// Prints extents as they stream in (a listing of any length needs memory for one page): a
/// table of byte offsets and lengths, or a JSON array of `{"offset", "length"}`.
async fn print_extents(
    mut st: tonic::Streaming<pb::ExtentPage>,
    json: bool,
) -> Result<(), FcError> {
    let mut first = true;
    if json {
        out!("[");
    } else {
        outln!("{:<20} length", "offset");
    }
    while let Some(p) = st.message().await? {
        for e in p.extents {
            if json {
                let sep = if first { "" } else { "," };
                out!(
                    "{sep}\n  {{\"offset\": {}, \"length\": {}}}",
                    e.offset,
                    e.length
                );
            } else {
                outln!("{:<20} {}", e.offset, e.length);
            }
            first = false;
        }
    }
    if json {
        outln!("{}]", if first { "" } else { "\n" });
    }
    Ok(())
}

async fn run(args: Args) -> Result<(), FcError> {
    // Catch bad sizes before connecting.
    let size_arg = match &args.verb {
        Verb::Mkvol { size, .. } | Verb::Resizevol { size, .. } => {
            Some(out::parse_size(size).map_err(FcError::Usage)?)
        }
        _ => None,
    };
    let mut c = connect(args.agent.as_deref(), &args.agent_tls).await?;
    let json = args.output == Output::Json;
    match args.verb {
        Verb::Mkvol { name, .. } => {
            let v = c
                .create_volume(pb::CreateVolumeRequest {
                    name,
                    size_bytes: size_arg.unwrap_or_default(),
                    origin: String::new(),
                })
                .await?
                .into_inner();
            if json {
                print_json(&out::volume_json(&v));
            } else {
                outln!("Virtual Disk, id [{}], successfully created", v.id);
            }
        }
        Verb::Lsvol { volume: Some(r) } => {
            let v = c
                .get_volume(pb::GetVolumeRequest { volume: r })
                .await?
                .into_inner();
            if json {
                print_json(&out::volume_json(&v));
            } else {
                out!("{}", out::volume_detail(&v));
            }
        }
        Verb::Lsvol { volume: None } => {
            let vs = c
                .list_volumes(pb::ListVolumesRequest {})
                .await?
                .into_inner()
                .volumes;
            if json {
                print_json(&vs.iter().map(out::volume_json).collect());
            } else {
                out!("{}", out::volumes_table(&vs));
            }
        }
        Verb::Resizevol { volume, .. } => {
            let v = c
                .resize_volume(pb::ResizeVolumeRequest {
                    volume,
                    size_bytes: size_arg.unwrap_or_default(),
                })
                .await?
                .into_inner();
            if json {
                print_json(&out::volume_json(&v));
            }
        }
        Verb::Rmvol { volume } => {
            let r = c
                .delete_volume(pb::DeleteVolumeRequest {
                    volume: volume.clone(),
                })
                .await;
            r.map_err(|e| {
                hint(e, Code::FailedPrecondition, || {
                    format!("delete the mappings of {volume} first (lsvol {volume} lists them)")
                })
            })?;
            if json {
                print_json(&serde_json::json!({}));
            }
        }
        Verb::Mkfcmap {
            source,
            target,
            name,
            copyrate,
            cleanrate,
            grainsize,
            incremental,
            autodelete,
            consistgrp,
        } => {
            let m = c
                .create_mapping(pb::CreateMappingRequest {
                    source,
                    target,
                    name,
                    copy_rate: copyrate,
                    clean_rate: cleanrate,
                    grain_kib: grainsize,
                    incremental,
                    autodelete,
                    group: consistgrp,
                })
                .await?
                .into_inner();
            if json {
                print_json(&out::mapping_json(&m));
            } else {
                outln!("FlashCopy Mapping, id [{}], successfully created", m.id);
            }
        }
        Verb::Lsfcmap {
            mapping: Some(r), ..
        } => {
            let m = c
                .get_mapping(pb::GetMappingRequest { mapping: r })
                .await?
                .into_inner();
            if json {
                print_json(&out::mapping_json(&m));
            } else {
                out!("{}", out::mapping_detail(&m));
            }
        }
        Verb::Lsfcmap {
            mapping: None,
            consistgrp,
        } => {
            let ms = c
                .list_mappings(pb::ListMappingsRequest { group: consistgrp })
                .await?
                .into_inner()
                .mappings;
            if json {
                print_json(&ms.iter().map(out::mapping_json).collect());
            } else {
                out!("{}", out::mappings_table(&ms));
            }
        }
        Verb::Prestartfcmap { mapping, restore } => {
            let m = c
                .prepare_mapping(pb::PrepareMappingRequest {
                    mapping: mapping.clone(),
                    restore,
                })
                .await
                .map_err(|e| restore_hint(e, restore))?
                .into_inner();
            if json {
                print_json(&out::mapping_json(&m));
            }
        }
        Verb::Startfcmap {
            mapping,
            prep,
            restore,
        } => {
            let r = c
                .start_mapping(pb::StartMappingRequest {
                    mapping: mapping.clone(),
                    prep,
                    restore,
                })
                .await
                .map_err(|e| start_hint(e, "prestartfcmap", &mapping, prep, restore))?
                .into_inner();
            if json {
                let mut v = r
                    .mapping
                    .as_ref()
                    .map_or(serde_json::json!({}), out::mapping_json);
                v["pause_micros"] = r.pause_micros.into();
                print_json(&v);
            } else {
                let name = r.mapping.as_ref().map_or(mapping.as_str(), |m| &m.name);
                outln!("{name} started, host I/O paused {}", micros(r.pause_micros));
            }
        }
        Verb::Stopfcmap {
            mapping,
            force,
            split,
        } => {
            let r = c
                .stop_mapping(pb::StopMappingRequest {
                    mapping,
                    force,
                    split,
                })
                .await?
                .into_inner();
            if json {
                print_json(
                    &r.mapping
                        .as_ref()
                        .map_or(serde_json::json!({}), out::mapping_json),
                );
            }
        }
        Verb::Rmfcmap { mapping, force } => {
            c.delete_mapping(pb::DeleteMappingRequest {
                mapping: mapping.clone(),
                force,
            })
            .await
            .map_err(|e| {
                hint(e, Code::FailedPrecondition, || {
                    if force {
                        format!("stop it first (stopfcmap {mapping})")
                    } else {
                        format!("stop it first (stopfcmap {mapping}), or delete with --force")
                    }
                })
            })?;
            if json {
                print_json(&serde_json::json!({}));
            }
        }
        Verb::Chfcmap {
            mapping,
            name,
            copyrate,
            cleanrate,
            autodelete,
            consistgrp,
            noconsistgrp,
        } => {
            let attrs =
                name.is_some() || copyrate.is_some() || cleanrate.is_some() || autodelete.is_some();
            let group_change = consistgrp.is_some() || noconsistgrp;
            if !attrs && !group_change {
                return Err(FcError::Usage(
                    "chfcmap needs a change: --name, --copyrate, --cleanrate, --autodelete, \
                     --consistgrp or --noconsistgrp"
                        .into(),
                ));
            }
            let mut m = None;
            if attrs {
                m = Some(
                    c.modify_mapping(pb::ModifyMappingRequest {
                        mapping: mapping.clone(),
                        name: name.clone(),
                        copy_rate: copyrate,
                        clean_rate: cleanrate,
                        autodelete: autodelete.map(|a| a == OnOff::On),
                    })
                    .await?
                    .into_inner(),
                );
            }
            // After a rename the old name no longer resolves: address the mapping by id.
            let target = m.as_ref().map_or(mapping, |m| m.id.to_string());
            if let Some(group) = consistgrp {
                m = Some(
                    c.add_to_group(pb::AddToGroupRequest {
                        group,
                        mapping: target,
                    })
                    .await?
                    .into_inner(),
                );
            } else if noconsistgrp {
                m = Some(
                    c.remove_from_group(pb::RemoveFromGroupRequest { mapping: target })
                        .await?
                        .into_inner(),
                );
            }
            if json && let Some(m) = m {
                print_json(&out::mapping_json(&m));
            }
        }
        Verb::Mkfcconsistgrp { name, autodelete } => {
            let g = c
                .create_group(pb::CreateGroupRequest { name, autodelete })
                .await?
                .into_inner();
            if json {
                print_json(&out::group_json(&g));
            } else {
                outln!(
                    "FlashCopy Consistency Group, id [{}], successfully created",
                    g.id
                );
            }
        }
        Verb::Lsfcconsistgrp { group: Some(r) } => {
            let g = c
                .get_group(pb::GetGroupRequest { group: r })
                .await?
                .into_inner();
            if json {
                print_json(&out::group_json(&g));
            } else {
                let members = c
                    .list_mappings(pb::ListMappingsRequest {
                        group: Some(g.id.to_string()),
                    })
                    .await?
                    .into_inner()
                    .mappings;
                out!("{}", out::group_detail(&g, &members));
            }
        }
        Verb::Lsfcconsistgrp { group: None } => {
            let gs = c
                .list_groups(pb::ListGroupsRequest {})
                .await?
                .into_inner()
                .groups;
            if json {
                print_json(&gs.iter().map(out::group_json).collect());
            } else {
                out!("{}", out::groups_table(&gs));
            }
        }
        Verb::Prestartfcconsistgrp { group, restore } => {
            let g = c
                .prepare_group(pb::PrepareGroupRequest { group, restore })
                .await
                .map_err(|e| restore_hint(e, restore))?
                .into_inner();
            if json {
                print_json(&out::group_json(&g));
            }
        }
        Verb::Startfcconsistgrp {
            group,
            prep,
            restore,
        } => {
            let r = c
                .start_group(pb::StartGroupRequest {
                    group: group.clone(),
                    prep,
                    restore,
                })
                .await
                .map_err(|e| start_hint(e, "prestartfcconsistgrp", &group, prep, restore))?
                .into_inner();
            if json {
                let mut v = r
                    .group
                    .as_ref()
                    .map_or(serde_json::json!({}), out::group_json);
                v["pause_micros"] = r.pause_micros.into();
                print_json(&v);
            } else {
                let name = r.group.as_ref().map_or(group.as_str(), |g| &g.name);
                outln!(
                    "{name} started ({} mappings, one point in time), host I/O paused {}",
                    r.group.as_ref().map_or(0, |g| g.members.len()),
                    micros(r.pause_micros)
                );
            }
        }
        Verb::Stopfcconsistgrp {
            group,
            force,
            split,
        } => {
            let g = c
                .stop_group(pb::StopGroupRequest {
                    group,
                    force,
                    split,
                })
                .await?
                .into_inner();
            if json {
                print_json(&out::group_json(&g));
            }
        }
        Verb::Rmfcconsistgrp { group, force } => {
            c.delete_group(pb::DeleteGroupRequest {
                group: group.clone(),
                force,
            })
            .await
            .map_err(|e| {
                hint(e, Code::FailedPrecondition, || {
                    format!("stop the group first, or delete with --force (lsfcconsistgrp {group})")
                })
            })?;
            if json {
                print_json(&serde_json::json!({}));
            }
        }
        Verb::Wait { mapping, timeout } => wait(&mut c, &mapping, timeout, json).await?,
        Verb::Lsfcmapallocated { mapping, from } => {
            let st = c
                .get_allocated_extents(pb::GetAllocatedExtentsRequest {
                    mapping,
                    starting_offset: from,
                    page_size: 0,
                })
                .await?
                .into_inner();
            print_extents(st, json).await?;
        }
        Verb::Lsfcmapdelta { base, target, from } => {
            let st = c
                .get_delta_extents(pb::GetDeltaExtentsRequest {
                    base_mapping: base,
                    target_mapping: target,
                    starting_offset: from,
                    page_size: 0,
                })
                .await?
                .into_inner();
            print_extents(st, json).await?;
        }
        Verb::Events => {
            let mut s = c
                .watch_events(pb::WatchEventsRequest {})
                .await?
                .into_inner();
            while let Some(e) = s.message().await? {
                if json {
                    outln!("{}", out::event_json(&e));
                } else {
                    outln!("{}", out::event_line(&e));
                }
            }
        }
        Verb::Lssystem => {
            let i = c
                .get_agent_info(pb::GetAgentInfoRequest {})
                .await?
                .into_inner();
            if json {
                print_json(&agent_info_json(&i));
            } else {
                out!("{}", agent_info_detail(&i));
            }
        }
    }
    Ok(())
}

fn micros(us: u64) -> String {
    if us >= 10_000 {
        format!("{:.1} ms", us as f64 / 1000.0)
    } else {
        format!("{us} us")
    }
}

fn restore_hint(e: Status, restore: bool) -> FcError {
    let kind = e
        .metadata()
        .get(crate::agent::status::ERROR_KIND_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    hint(e, Code::FailedPrecondition, || {
        if kind == "TargetIsActiveSource" && !restore {
            "to overwrite a volume that other mappings read from, add --restore".into()
        } else {
            String::new()
        }
    })
    .drop_empty_hint()
}

fn start_hint(e: Status, prestart: &str, obj: &str, prep: bool, restore: bool) -> FcError {
    let kind = e
        .metadata()
        .get(crate::agent::status::ERROR_KIND_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if kind == "TargetIsActiveSource" && !restore {
        return restore_hint(e, restore);
    }
    hint(e, Code::FailedPrecondition, || {
        if !prep && matches!(kind.as_str(), "BadState" | "BadGroupState") {
            format!("prepare it first ({prestart} {obj}), or start with --prep")
        } else {
            String::new()
        }
    })
    .drop_empty_hint()
}

impl FcError {
    fn drop_empty_hint(self) -> Self {
        match self {
            FcError::Rejected(s, Some(h)) if h.is_empty() => FcError::Rejected(s, None),
            e => e,
        }
    }
}

/// `wait`: polls the mapping until its copy or cleaning ends.
async fn wait(
    c: &mut AgentClient<Channel>,
    mapping: &str,
    timeout: Option<f64>,
    json: bool,
) -> Result<(), FcError> {
    let t0 = Instant::now();
    let deadline = timeout.map(|s| t0 + Duration::from_secs_f64(s.max(0.0)));
    let mut bar = out::ProgressBar::new();
    let mut last: Option<pb::Mapping> = None;
    let done = |m: &pb::Mapping, how: &str| {
        if json {
            let mut v = out::mapping_json(m);
            v["waited_secs"] = t0.elapsed().as_secs_f64().into();
            v["outcome"] = how.into();
            print_json(&v);
        } else {
            outln!(
                "{}: {how} after {:.1} s",
                m.name,
                t0.elapsed().as_secs_f64()
            );
        }
    };
    loop {
        let m = match c
            .get_mapping(pb::GetMappingRequest {
                mapping: last
                    .as_ref()
                    .map_or(mapping.to_string(), |m| m.id.to_string()),
            })
            .await
        {
            Ok(m) => m.into_inner(),
            Err(e) if e.code() == Code::NotFound => {
                bar.clear();
                return match last {
                    Some(m) if m.autodelete => {
                        done(&m, "copied and deleted (autodelete)");
                        Ok(())
                    }
                    Some(m) => Err(FcError::Usage(format!(
                        "mapping {} was deleted while waiting, at {}%",
                        m.name, m.progress
                    ))),
                    None => Err(e.into()),
                };
            }
            Err(e) => {
                bar.clear();
                return Err(e.into());
            }
        };
        let state = pb::MappingState::try_from(m.state).unwrap_or_default();
        let bytes = |grains: u64| grains * u64::from(m.grain_kib) * 1024;
        match state {
            pb::MappingState::Copying if m.copy_rate == 0 && m.progress < 100 => {
                bar.clear();
                return Err(FcError::Usage(format!(
                    "mapping {} is copying at copy rate 0 (a snapshot): its background copy \
                     does not run; raise it with chfcmap {} --copyrate N",
                    m.name, m.id
                )));
            }
            pb::MappingState::Copying | pb::MappingState::Stopping => {
                bar.draw(
                    &m.name,
                    out::map_state(m.state),
                    m.progress,
                    bytes(m.split_grains),
                    bytes(m.grains),
                );
            }
            pb::MappingState::IdleOrCopied if m.complete || m.progress == 100 => {
                bar.clear();
                done(&m, "copied (100%)");
                return Ok(());
            }
            pb::MappingState::IdleOrCopied if last.is_some() => {
                bar.clear();
                done(&m, "stopped with a complete target");
                return Ok(());
            }
            pb::MappingState::Stopped
                if last
                    .as_ref()
                    .is_some_and(|l| l.state == pb::MappingState::Stopping as i32) =>
            {
                bar.clear();
                done(&m, "stopped (cleaning finished)");
                return Ok(());
            }
            pb::MappingState::Stopped if last.is_some() => {
                bar.clear();
                return Err(FcError::Usage(format!(
                    "mapping {} stopped at {}%: its target is incomplete",
                    m.name, m.progress
                )));
            }
            _ => {
                bar.clear();
                return Err(FcError::Usage(format!(
                    "mapping {} is {}: nothing is copying (start it with startfcmap {})",
                    m.name,
                    out::map_state(m.state),
                    m.id
                )));
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            bar.clear();
            return Err(FcError::Usage(format!(
                "timed out after {:.1} s: mapping {} is {} at {}%",
                t0.elapsed().as_secs_f64(),
                m.name,
                out::map_state(m.state),
                m.progress
            )));
        }
        last = Some(m);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn agent_info_detail(i: &pb::AgentInfo) -> String {
    out::detail(&[
        ("version", i.version.clone()),
        ("data_dir", i.data_dir.clone()),
        ("backend", i.backend.clone()),
        ("agent_socket", i.agent_socket.clone()),
        ("nbd_socket", i.nbd_socket.clone()),
        ("agent_tcp", i.agent_tcp.clone()),
        ("nbd_tcp", i.nbd_tcp.clone()),
        ("volumes", i.volumes.to_string()),
        ("fc_mappings", i.mappings.to_string()),
        ("fc_consistency_groups", i.groups.to_string()),
        ("active_copy_workers", i.active_workers.to_string()),
        ("cow_grains", i.cow_grains.to_string()),
        ("background_grains", i.background_grains.to_string()),
        ("clean_grains", i.clean_grains.to_string()),
        ("commit_rounds", i.commit_rounds.to_string()),
        ("starts", i.starts.to_string()),
        ("last_pause_us", i.last_pause_micros.to_string()),
        ("max_pause_us", i.max_pause_micros.to_string()),
        ("total_pause_us", i.total_pause_micros.to_string()),
    ])
}

fn agent_info_json(i: &pb::AgentInfo) -> serde_json::Value {
    serde_json::json!({
        "version": i.version,
        "data_dir": i.data_dir,
        "backend": i.backend,
        "agent_socket": i.agent_socket,
        "nbd_socket": i.nbd_socket,
        "agent_tcp": i.agent_tcp,
        "nbd_tcp": i.nbd_tcp,
        "volumes": i.volumes,
        "mappings": i.mappings,
        "groups": i.groups,
        "active_workers": i.active_workers,
        "cow_grains": i.cow_grains,
        "background_grains": i.background_grains,
        "clean_grains": i.clean_grains,
        "commit_rounds": i.commit_rounds,
        "starts": i.starts,
        "last_pause_micros": i.last_pause_micros,
        "max_pause_micros": i.max_pause_micros,
        "total_pause_micros": i.total_pause_micros,
    })
}
