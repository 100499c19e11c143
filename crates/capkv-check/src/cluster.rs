//! The cluster under test: `capkv server` processes this run starts (every fault), or an
//! existing cluster given by endpoints (faults through its nodes' Admin service only: no
//! kills, pauses or restarts). Processes are run by `capkv-testkit`.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use capkv_client::{Client, ClientConfig};
use capkv_testkit::{
    leaders_at, partition_cuts, set_node_faults, wait_until, ClusterOptions, Faults, LocalCluster,
};

/// A cluster someone else runs: its nodes' addresses.
pub struct External {
    nodes: Vec<(u64, String)>,
    partitions: u32,
}

pub enum Cluster {
    Local(LocalCluster),
    External(External),
}

impl Cluster {
    /// Starts `n` nodes of `exe` under `dir` with fault injection on, and waits until every
    /// partition has a leader.
    pub async fn start_local(
        exe: &Path,
        dir: &Path,
        n: usize,
        partitions: u32,
        extra_args: Vec<String>,
    ) -> anyhow::Result<Cluster> {
        let mut options = ClusterOptions::new(n, partitions);
        options.extra_args = [
            "--unsafe-fault-injection",
            "--write-timeout-ms",
            "2000",
            "--read-timeout-ms",
            "2000",
        ]
        .map(String::from)
        .to_vec();
        options.extra_args.extend(extra_args);
        Ok(Cluster::Local(
            LocalCluster::start(exe, dir, options).await?,
        ))
    }

    /// An existing cluster: learns its nodes from any endpoint.
    pub async fn external(endpoints: &[String]) -> anyhow::Result<Cluster> {
        let client = Client::connect(ClientConfig::new(endpoints.to_vec())).await?;
        let nodes = client
            .node_addrs()
            .into_iter()
            .map(|(id, addr)| (id.0, addr))
            .collect::<Vec<_>>();
        if nodes.is_empty() {
            bail!("the cluster at {endpoints:?} reported no nodes");
        }
        let mut partitions = 0;
        for (_, addr) in &nodes {
            if let Ok(s) = client.node_status(addr).await {
                partitions = s.partition_count;
                break;
            }
        }
        Ok(Cluster::External(External { nodes, partitions }))
    }

    pub fn controls_processes(&self) -> bool {
        matches!(self, Cluster::Local(_))
    }

    pub fn partitions(&self) -> u32 {
        match self {
            Cluster::Local(c) => c.partitions,
            Cluster::External(e) => e.partitions,
        }
    }

    pub fn ids(&self) -> Vec<u64> {
        match self {
            Cluster::Local(c) => c.ids(),
            Cluster::External(e) => e.nodes.iter().map(|(id, _)| *id).collect(),
        }
    }

    pub fn endpoints(&self) -> Vec<String> {
        match self {
            Cluster::Local(c) => c.endpoints(),
            Cluster::External(e) => e.nodes.iter().map(|(_, a)| a.clone()).collect(),
        }
    }

    fn addr(&self, id: u64) -> anyhow::Result<String> {
        match self {
            Cluster::Local(c) => Ok(c.node(id)?.addr.clone()),
            Cluster::External(e) => e
                .nodes
                .iter()
                .find(|(n, _)| *n == id)
                .map(|(_, a)| a.clone())
                .with_context(|| format!("no node {id}")),
        }
    }

    fn local(&mut self) -> anyhow::Result<&mut LocalCluster> {
        match self {
            Cluster::Local(c) => Ok(c),
            Cluster::External(_) => bail!("process faults need a cluster that `check` started"),
        }
    }

    /// Whether node `id` can answer (an external node is assumed to).
    pub fn is_up(&self, id: u64) -> bool {
        match self {
            Cluster::Local(c) => c.is_up(id),
            Cluster::External(_) => true,
        }
    }

    pub fn kill(&mut self, id: u64) -> anyhow::Result<()> {
        self.local()?.kill(id)
    }

    /// Starts node `id` again if it is not running.
    pub fn restart(&mut self, id: u64) -> anyhow::Result<()> {
        let c = self.local()?;
        c.reap_exited();
        if !c.node(id)?.is_running() {
            c.spawn(id)?;
        }
        Ok(())
    }

    /// Starts node `id` (which must be down) with its clocks, monotonic and wall, running
    /// at `rate_percent` % of real time (libfaketime's `LD_PRELOAD`, which also scales its
    /// sleeps and timeouts). The rate stays with the node at later restarts. Any other
    /// node running at a skewed rate is restarted at the real rate first: one node off at
    /// a time keeps the rates within the 2x the lease assumes (0.6x against 1x).
    pub fn restart_with_clock_rate(
        &mut self,
        id: u64,
        faketime: &Path,
        rate_percent: u32,
    ) -> anyhow::Result<()> {
        let c = self.local()?;
        for other in c.ids() {
            if other != id && !c.env(other)?.is_empty() {
                c.set_env(other, vec![])?;
                if c.node(other)?.is_running() {
                    c.kill(other)?;
                    c.spawn(other)?;
                }
            }
        }
        let rate = f64::from(rate_percent) / 100.0;
        c.set_env(
            id,
            vec![
                ("LD_PRELOAD".into(), faketime.display().to_string()),
                ("FAKETIME".into(), format!("+0 x{rate:.2}")),
            ],
        )?;
        self.restart(id)
    }

    pub fn pause(&mut self, id: u64) -> anyhow::Result<()> {
        self.local()?.pause(id)
    }

    /// Starts node `id` (which must be down) after dropping the writes no fsync covered.
    pub fn restart_losing_unsynced_writes(&mut self, id: u64) -> anyhow::Result<()> {
        let c = self.local()?;
        c.reap_exited();
        if c.node(id)?.is_running() {
            bail!("node {id} is running");
        }
        c.spawn_with(id, &["--unsafe-lose-unsynced-writes".to_string()])
    }

    /// A power cut of every node at once: all killed, then each started after dropping
    /// what no fsync covered.
    pub fn power_cut_all(&mut self) -> anyhow::Result<()> {
        let c = self.local()?;
        let ids = c.ids();
        for id in &ids {
            c.kill(*id)?;
        }
        for id in ids {
            c.spawn_with(id, &["--unsafe-lose-unsynced-writes".to_string()])?;
        }
        Ok(())
    }

    pub fn resume(&mut self, id: u64) -> anyhow::Result<()> {
        self.local()?.resume(id)
    }

    pub async fn set_faults(&self, id: u64, faults: Faults) -> anyhow::Result<()> {
        if !self.is_up(id) {
            return Ok(());
        }
        set_node_faults(&self.addr(id)?, faults)
            .await
            .with_context(|| format!("node {id} refused fault injection"))?;
        Ok(())
    }

    /// Makes each node drop Raft traffic both ways with nodes outside its group.
    pub async fn partition(&self, groups: &[Vec<u64>]) -> anyhow::Result<()> {
        for (id, cut) in partition_cuts(&self.ids(), groups) {
            self.set_faults(id, cut).await?;
        }
        Ok(())
    }

    /// Brings every node back: resumes and restarts them (a node whose storage is
    /// poisoned is restarted too) and clears every injected fault.
    pub async fn heal_all(&mut self) -> anyhow::Result<()> {
        if let Cluster::Local(c) = self {
            c.reap_exited();
            for id in c.ids() {
                if c.node(id)?.is_paused() {
                    c.resume(id)?;
                }
                let poisoned = match c.status(id).await {
                    Some(s) => !s.storage_error.is_empty(),
                    None => false,
                };
                if poisoned {
                    tracing::info!(
                        node = id,
                        "heal: restarting the node, its storage is poisoned"
                    );
                    c.kill(id)?;
                }
                if !c.node(id)?.is_running() {
                    c.spawn(id)?;
                }
            }
        }
        // A restarted node needs a moment before its port answers.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        'retry: loop {
            for id in self.ids() {
                if let Err(e) = self.set_faults(id, Faults::default()).await {
                    if std::time::Instant::now() > deadline {
                        return Err(e.context("clearing faults after the nemesis"));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue 'retry;
                }
            }
            return Ok(());
        }
    }

    /// The leader of each partition, from one status call per node that is up.
    pub async fn leaders(&self) -> Vec<Option<u64>> {
        match self {
            Cluster::Local(c) => c.leaders().await,
            Cluster::External(e) => leaders_at(e.partitions, &e.nodes).await,
        }
    }

    /// The leader of partition `p`, asked of the nodes that are up.
    pub async fn leader_of(&self, p: u32) -> Option<u64> {
        self.leaders().await.get(p as usize).copied().flatten()
    }

    pub async fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        match self {
            Cluster::Local(c) => c.wait_ready(limit).await,
            Cluster::External(_) => {
                let this = &*self;
                wait_until(limit, "every partition has a leader", || async move {
                    this.leaders().await.iter().all(Option::is_some)
                })
                .await
            }
        }
    }

    pub fn shutdown(&mut self) {
        if let Cluster::Local(c) = self {
            c.shutdown();
        }
    }
}
