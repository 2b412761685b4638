//! CSI capacity: what each node's agent may still provision (its budget minus what its
//! volumes already claim), and GetCapacity over one topology segment or all nodes.

use super::*;

impl ControllerService {
    /// Bytes a node may still provision.
    pub(in crate::csi) async fn free_bytes(&self, node: &str) -> Result<u64, CsiError> {
        let mut c = self.client(node)?;
        let i = c
            .get_agent_info(pb::GetAgentInfoRequest {})
            .await
            .map_err(|s| CsiError::agent(node, s))?
            .into_inner();
        Ok(i.capacity_bytes.saturating_sub(i.provisioned_bytes))
    }

    pub(in crate::csi) async fn ensure_room(&self, node: &str, bytes: u64) -> Result<(), CsiError> {
        let free = self.free_bytes(node).await?;
        if bytes > free {
            return Err(CsiError::ResourceExhausted(format!(
                "node {node} has {free} bytes of capacity left; {bytes} are needed"
            )));
        }
        Ok(())
    }

    pub(in crate::csi) async fn get_capacity_inner(
        &self,
        r: csi::GetCapacityRequest,
    ) -> Result<csi::GetCapacityResponse, CsiError> {
        if !r.volume_capabilities.is_empty()
            && check_capabilities(&r.volume_capabilities)?.is_some()
        {
            // Volumes with these capabilities cannot be made anywhere.
            return Ok(csi::GetCapacityResponse::default());
        }
        Params::parse(&r.parameters)?;
        let nodes = match &r.accessible_topology {
            Some(t) => {
                let n = topology_nodes(std::slice::from_ref(t));
                if n.is_empty() || !self.agents.knows(&n[0]) {
                    return Ok(csi::GetCapacityResponse::default());
                }
                n
            }
            None => self.agents.nodes(),
        };
        let (mut total, mut max) = (0u64, 0u64);
        for n in &nodes {
            let f = self.free_bytes(n).await?;
            total = total.saturating_add(f);
            max = max.max(f);
        }
        Ok(csi::GetCapacityResponse {
            available_capacity: total.min(i64::MAX as u64) as i64,
            maximum_volume_size: Some(max.min(i64::MAX as u64) as i64),
            minimum_volume_size: Some(512),
        })
    }
}
