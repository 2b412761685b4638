//! Which agent serves which node: `--agent NODE=URL` (repeatable) and `--agent-template URL`
//! with `{node}` replaced by the node name. URLs are `unix:///PATH`, `https://HOST:PORT`
//! (mutual TLS with `--agent-tls-*`, [`crate::tls`]) or `http://HOST:PORT`.
//! Channels are created lazily and reused; tonic reconnects them after an agent restart.
//! Listings cover the named nodes plus those discovered (`csi controller --nodes-from-csinodes`:
//! the CSINode objects that name our driver), reached through the template.

use super::ids::valid_node;
use super::status::CsiError;
use crate::proto::agent::v1::agent_client::AgentClient;
use crate::tls::ClientTls;
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;
use tonic::transport::Channel;

/// The routing table from node names to agent clients.
#[derive(Debug, Default)]
pub struct Agents {
    explicit: BTreeMap<String, String>,
    template: Option<String>,
    discovered: Mutex<BTreeSet<String>>,
    channels: Mutex<HashMap<String, Channel>>,
    tls: Option<ClientTls>,
}

/// Parses `NODE=URL`.
pub fn parse_agent_arg(s: &str) -> Result<(String, String), String> {
    let (node, url) = s
        .split_once('=')
        .ok_or_else(|| format!("--agent {s:?}: expected NODE=URL"))?;
    if !valid_node(node) {
        return Err(format!("--agent {s:?}: {node:?} is not a node name"));
    }
    check_url(url).map_err(|e| format!("--agent {s:?}: {e}"))?;
    Ok((node.into(), url.into()))
}

fn check_url(url: &str) -> Result<(), String> {
    if url.starts_with("unix://") || url.starts_with("http://") || url.starts_with("https://") {
        Ok(())
    } else {
        Err(format!(
            "{url:?} is not an agent URL (unix:///PATH, https://HOST:PORT or http://HOST:PORT)"
        ))
    }
}

impl Agents {
    /// A table from explicit entries and an optional template.
    pub fn new(
        explicit: impl IntoIterator<Item = (String, String)>,
        template: Option<String>,
    ) -> Result<Self, String> {
        if let Some(t) = &template {
            if !t.contains("{node}") {
                return Err(format!("--agent-template {t:?} does not contain {{node}}"));
            }
            check_url(t)?;
        }
        Ok(Self {
            explicit: explicit.into_iter().collect(),
            template,
            discovered: Mutex::default(),
            channels: Mutex::default(),
            tls: None,
        })
    }

    /// Uses `tls` (client certificate and agent CA) for `https://` agents.
    pub fn with_tls(mut self, tls: Option<ClientTls>) -> Self {
        self.tls = tls;
        self
    }

    /// The nodes named with `--agent` and the discovered ones the template reaches, in order:
    /// the ones listings and placement without topology cover.
    pub fn nodes(&self) -> Vec<String> {
        let mut all: BTreeSet<String> = self.explicit.keys().cloned().collect();
        if self.template.is_some() {
            all.extend(self.discovered.lock().iter().cloned());
        }
        all.into_iter().collect()
    }

    /// Replaces the discovered nodes (invalid node names are left out).
    pub fn set_discovered(&self, nodes: impl IntoIterator<Item = String>) {
        *self.discovered.lock() = nodes.into_iter().filter(|n| valid_node(n)).collect();
    }

    /// Whether `node` has an agent (named, or reachable through the template).
    pub fn knows(&self, node: &str) -> bool {
        valid_node(node) && (self.explicit.contains_key(node) || self.template.is_some())
    }

    fn url(&self, node: &str) -> Option<String> {
        if let Some(u) = self.explicit.get(node) {
            return Some(u.clone());
        }
        let t = self.template.as_ref()?;
        valid_node(node).then(|| t.replace("{node}", node))
    }

    /// A client for the agent of `node`; NOT_FOUND when no agent serves that node.
    pub fn client(&self, node: &str) -> Result<AgentClient<Channel>, CsiError> {
        let mut ch = self.channels.lock();
        if self.tls.as_ref().is_some_and(ClientTls::refresh) {
            // Rotated certificates: new connections must present them (calls in flight keep
            // their channel until they finish).
            ch.clear();
        }
        if let Some(c) = ch.get(node) {
            return Ok(AgentClient::new(c.clone()));
        }
        let url = self
            .url(node)
            .ok_or_else(|| CsiError::NotFound(format!("no agent serves node {node:?}")))?;
        let tls = self.tls.as_ref().map(ClientTls::current);
        let channel = crate::tls::endpoint(&url, tls.as_ref())
            .map_err(|why| CsiError::Unavailable {
                node: node.into(),
                why,
            })?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(120))
            .connect_lazy();
        ch.insert(node.into(), channel.clone());
        Ok(AgentClient::new(channel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing() {
        let a = Agents::new(
            [("n1".to_string(), "unix:///tmp/a.sock".to_string())],
            Some("unix:///run/{node}/agent.sock".into()),
        )
        .unwrap();
        assert_eq!(a.url("n1").unwrap(), "unix:///tmp/a.sock");
        assert_eq!(a.url("n2").unwrap(), "unix:///run/n2/agent.sock");
        assert_eq!(a.url("../x y"), None);
        assert_eq!(a.nodes(), vec!["n1".to_string()]);
        a.set_discovered(["n3".into(), "n1".into(), "../x".into()]);
        assert_eq!(a.nodes(), vec!["n1".to_string(), "n3".to_string()]);
        let named_only = Agents::new([("n1".into(), "unix:///a".into())], None).unwrap();
        named_only.set_discovered(["n3".into()]);
        assert_eq!(named_only.nodes(), vec!["n1".to_string()], "no URL for n3");
        assert!(Agents::new([], Some("unix:///x".into())).is_err());
        assert!(parse_agent_arg("n1").is_err());
        assert!(parse_agent_arg("n1=/tmp/x").is_err());
        assert_eq!(
            parse_agent_arg("n1=http://h:1").unwrap(),
            ("n1".to_string(), "http://h:1".to_string())
        );
        let none = Agents::new([], None).unwrap();
        assert!(matches!(none.client("n1"), Err(CsiError::NotFound(_))));
    }
}
