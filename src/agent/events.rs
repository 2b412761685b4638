//! The agent's event stream: a broadcast channel fed with the events that pool operations and
//! the copy workers return, numbered in the order they are sent.
//!
//! A command and a copy worker can both see the same transition (a worker notices that a
//! mapping it was copying was stopped or completed); the hub remembers the last state it
//! published per mapping and the deleted objects, and drops an event that repeats them.

use super::convert;
use crate::engine::Event;
use crate::proto::agent::v1 as pb;
use parking_lot::Mutex;
use std::collections::{HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::broadcast;

/// Events a slow watcher may fall behind before its stream ends with `DATA_LOSS`.
pub const CAPACITY: usize = 4096;

/// Publishes events to every watcher.
#[derive(Debug)]
pub struct EventHub {
    tx: broadcast::Sender<pb::Event>,
    state: Mutex<Published>,
}

#[derive(Debug, Default)]
struct Published {
    seq: u64,
    /// Last published state per mapping (`None`: deleted).
    maps: HashMap<u64, Option<i32>>,
    deleted_groups: HashSet<u64>,
}

impl Published {
    /// Records `kind`; false if it repeats what was already published.
    fn is_news(&mut self, kind: &pb::event::Kind) -> bool {
        use pb::event::Kind;
        match kind {
            Kind::MappingState(c) => self.maps.insert(c.mapping, Some(c.to)) != Some(Some(c.to)),
            Kind::MappingDeleted(d) => self.maps.insert(d.mapping, None) != Some(None),
            Kind::GroupDeleted(d) => self.deleted_groups.insert(d.group),
            // A reused id starts afresh: its first state change and deletion are news.
            Kind::Created(c) => {
                if let Some(m) = c.mapping {
                    self.maps.remove(&m);
                }
                if let Some(g) = c.group {
                    self.deleted_groups.remove(&g);
                }
                true
            }
            Kind::Started(_) | Kind::CopyFailed(_) => true,
        }
    }
}

impl Default for EventHub {
    fn default() -> Self {
        Self::new()
    }
}

impl EventHub {
    /// A hub with no watchers.
    pub fn new() -> Self {
        Self {
            tx: broadcast::channel(CAPACITY).0,
            state: Mutex::new(Published::default()),
        }
    }

    /// A new watcher, which sees every event published from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<pb::Event> {
        self.tx.subscribe()
    }

    /// Publishes one event, unless it repeats a state change or deletion already published.
    pub fn publish(&self, kind: pb::event::Kind) {
        let time_millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        // Numbering and sending under one lock keeps `seq` in send order.
        let mut st = self.state.lock();
        if !st.is_news(&kind) {
            return;
        }
        st.seq += 1;
        // No watcher is not an error.
        let _ = self.tx.send(pb::Event {
            seq: st.seq,
            time_millis,
            kind: Some(kind),
        });
    }

    /// Publishes engine events.
    pub fn publish_all(&self, events: &[Event]) {
        for e in events {
            self.publish(convert::event(e));
        }
    }
}
