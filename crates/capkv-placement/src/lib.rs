//! Where partitions live: the hash ring of nodes and the partition map.
//!
//! Pure: no IO, no clocks, no async. The node and the client both use the map; a later
//! rebalancing planner will compute moves from one map to the next here, without IO.
//!
//! Placement: each node owns [`TOKENS_PER_NODE`] points on a 64-bit ring (XXH3 of
//! `"node:{id}:{i}"`). Partition `p` sits at the middle of its arc of the key ring;
//! its replicas are the first `rf` distinct nodes met walking clockwise from there.
//! With `rf` >= the node count, every node holds every partition.

use std::collections::BTreeMap;

use capkv_types::{partition_for_key, NodeId, PartitionId};
use serde::{Deserialize, Serialize};

pub const TOKENS_PER_NODE: u32 = 64;
pub const PARTITIONS_MAX: u32 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("invalid cluster spec: {0}")]
    InvalidSpec(String),
}

/// A member of the initial cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub id: NodeId,
    /// Address of the node's gRPC port, `host:port`.
    pub addr: String,
}

/// Parses `1=127.0.0.1:7379,2=127.0.0.1:7380`.
pub fn parse_initial_cluster(spec: &str) -> Result<Vec<NodeSpec>, PlacementError> {
    let mut nodes: Vec<NodeSpec> = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| PlacementError::InvalidSpec(format!("{part:?} is not ID=HOST:PORT")))?;
        let id: u64 = id.trim().parse().map_err(|_| {
            PlacementError::InvalidSpec(format!("{id:?} is not a node id (a positive integer)"))
        })?;
        if id == 0 {
            return Err(PlacementError::InvalidSpec("node id 0 is reserved".into()));
        }
        let addr = addr.trim();
        if addr
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .is_none()
        {
            return Err(PlacementError::InvalidSpec(format!(
                "{addr:?} is not HOST:PORT"
            )));
        }
        if nodes.iter().any(|n| n.id.0 == id) {
            return Err(PlacementError::InvalidSpec(format!(
                "node id {id} appears twice"
            )));
        }
        if nodes.iter().any(|n| n.addr == addr) {
            return Err(PlacementError::InvalidSpec(format!(
                "address {addr} appears twice"
            )));
        }
        nodes.push(NodeSpec {
            id: NodeId(id),
            addr: addr.to_string(),
        });
    }
    if nodes.is_empty() {
        return Err(PlacementError::InvalidSpec(
            "the cluster has no nodes".into(),
        ));
    }
    nodes.sort_by_key(|n| n.id);
    Ok(nodes)
}

/// Which nodes hold each partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMap {
    pub partition_count: u32,
    pub replication_factor: u32,
    pub nodes: BTreeMap<NodeId, String>,
    /// `replicas[p]`: the nodes holding partition `p`, in ring order.
    pub replicas: Vec<Vec<NodeId>>,
}

impl PartitionMap {
    /// The map of a freshly bootstrapped cluster.
    pub fn initial(
        nodes: &[NodeSpec],
        partition_count: u32,
        replication_factor: u32,
    ) -> Result<Self, PlacementError> {
        if nodes.is_empty() {
            return Err(PlacementError::InvalidSpec(
                "the cluster has no nodes".into(),
            ));
        }
        if partition_count == 0 || partition_count > PARTITIONS_MAX {
            return Err(PlacementError::InvalidSpec(format!(
                "partition count must be in 1..={PARTITIONS_MAX}, got {partition_count}"
            )));
        }
        if replication_factor == 0 {
            return Err(PlacementError::InvalidSpec(
                "replication factor must be at least 1".into(),
            ));
        }
        let rf = (replication_factor as usize).min(nodes.len());
        let mut ring: Vec<(u64, NodeId)> = nodes
            .iter()
            .flat_map(|n| {
                (0..TOKENS_PER_NODE).map(move |i| {
                    (
                        xxhash_rust::xxh3::xxh3_64(format!("node:{}:{i}", n.id.0).as_bytes()),
                        n.id,
                    )
                })
            })
            .collect();
        ring.sort();
        let arc = (1u128 << 64) / u128::from(partition_count);
        let replicas = (0..partition_count)
            .map(|p| {
                let position = (u128::from(p) * arc + arc / 2) as u64;
                let start = ring.partition_point(|(token, _)| *token < position);
                let mut chosen: Vec<NodeId> = Vec::with_capacity(rf);
                for i in 0..ring.len() {
                    let node = ring[(start + i) % ring.len()].1;
                    if !chosen.contains(&node) {
                        chosen.push(node);
                        if chosen.len() == rf {
                            break;
                        }
                    }
                }
                chosen
            })
            .collect();
        Ok(PartitionMap {
            partition_count,
            replication_factor: rf as u32,
            nodes: nodes.iter().map(|n| (n.id, n.addr.clone())).collect(),
            replicas,
        })
    }

    pub fn partition_for_key(&self, key: &[u8]) -> PartitionId {
        partition_for_key(key, self.partition_count)
    }

    pub fn partitions(&self) -> impl Iterator<Item = PartitionId> {
        (0..self.partition_count).map(PartitionId)
    }

    pub fn replicas(&self, p: PartitionId) -> &[NodeId] {
        self.replicas
            .get(p.0 as usize)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    pub fn partitions_of(&self, node: NodeId) -> Vec<PartitionId> {
        self.partitions()
            .filter(|p| self.replicas(*p).contains(&node))
            .collect()
    }

    pub fn addr_of(&self, node: NodeId) -> Option<&str> {
        self.nodes.get(&node).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(n: u64) -> Vec<NodeSpec> {
        (1..=n)
            .map(|i| NodeSpec {
                id: NodeId(i),
                addr: format!("127.0.0.1:{}", 7378 + i),
            })
            .collect()
    }

    #[test]
    fn parses_and_validates_cluster_specs() {
        let nodes = parse_initial_cluster("2=127.0.0.1:7380, 1=127.0.0.1:7379").unwrap();
        assert_eq!(
            nodes[0],
            NodeSpec {
                id: NodeId(1),
                addr: "127.0.0.1:7379".into()
            }
        );
        assert_eq!(nodes.len(), 2);
        for bad in [
            "",
            "1",
            "x=127.0.0.1:1",
            "0=127.0.0.1:1",
            "1=host",
            "1=a:1,1=b:2",
            "1=a:1,2=a:1",
        ] {
            assert!(
                parse_initial_cluster(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn small_clusters_replicate_everything_everywhere() {
        let map = PartitionMap::initial(&spec(3), 8, 3).unwrap();
        for p in map.partitions() {
            let mut r = map.replicas(p).to_vec();
            r.sort();
            assert_eq!(r, vec![NodeId(1), NodeId(2), NodeId(3)]);
        }
        let single = PartitionMap::initial(&spec(1), 8, 3).unwrap();
        assert_eq!(single.replication_factor, 1);
        assert_eq!(single.partitions_of(NodeId(1)).len(), 8);
    }

    #[test]
    fn larger_clusters_spread_distinct_replicas() {
        let map = PartitionMap::initial(&spec(6), 64, 3).unwrap();
        let mut per_node = BTreeMap::new();
        for p in map.partitions() {
            let r = map.replicas(p);
            assert_eq!(r.len(), 3);
            let mut d = r.to_vec();
            d.sort_unstable();
            d.dedup();
            assert_eq!(d.len(), 3, "replicas must be distinct: {r:?}");
            for n in r {
                *per_node.entry(*n).or_insert(0) += 1;
            }
        }
        // 64 * 3 = 192 replicas over 6 nodes: 32 each on average.
        for (n, c) in &per_node {
            assert!(
                (16..=48).contains(c),
                "node {n} holds {c} replicas: {per_node:?}"
            );
        }
        // Deterministic: the same inputs give the same map.
        assert_eq!(map, PartitionMap::initial(&spec(6), 64, 3).unwrap());
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(PartitionMap::initial(&spec(3), 0, 3).is_err());
        assert!(PartitionMap::initial(&spec(3), PARTITIONS_MAX + 1, 3).is_err());
        assert!(PartitionMap::initial(&spec(3), 8, 0).is_err());
        assert!(PartitionMap::initial(&[], 8, 3).is_err());
    }
}
