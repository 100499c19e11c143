//! The read path: what must happen before a read at each level (the pure planner in
//! `read_plan`, carried out here), and reads forwarded once to the leader.

use super::*;

/// How long a `session` read waits for the local replica to apply the session's position
/// before it goes to the leader: about a heartbeat round, so a follower that is merely a
/// little behind serves it.
pub const SESSION_WAIT: Duration = Duration::from_millis(100);

impl KvCore {
    /// Waits until the local replica may serve a read at `level` (`session_at`: the
    pub(super) async fn read_barrier(
        &self,
        p: PartitionId,
        level: ReadConsistency,
        session_at: u64,
    ) -> Result<(&Replica, Bound), KvError> {
        let replica = self.replica(p)?;
        if level == ReadConsistency::Linearizable {
            // The hot path: under the leader's lease, at once, with no role lookup.
            if self.unsafe_local_reads
                || (self.read_policy == ReadPolicyChoice::Lease
                    && self.raft_engine.lease_read_now(p))
            {
                return Ok((replica, Bound::default()));
            }
        }
        let bounded = matches!(level, ReadConsistency::Bounded(_));
        if bounded && self.unsafe_ignore_bound {
            return Ok((replica, Bound::default()));
        }
        let mut ask = ReadAsk {
            level,
            session_at: if self.unsafe_ignore_session {
                0
            } else {
                session_at
            },
            waited: false,
            confirmed: None,
        };
        loop {
            let applied = replica.applied.get();
            // The planner looks at the role only for the levels that need a leader or a
            // proof from one, and session reads the replica is behind on; the engine's
            // status is not read otherwise.
            let role = match level {
                ReadConsistency::Prefix | ReadConsistency::Eventual => None,
                ReadConsistency::Session if applied >= ask.session_at => None,
                _ => Some(self.role(p)),
            };
            let state = ReplicaState {
                leader: role.is_some_and(|r| r.leader),
                known_leader: role.and_then(|r| r.known_leader).filter(|l| *l != self.id),
                applied,
                proof: if bounded { replica.proof() } else { None },
            };
            match read_plan::plan(ask, state) {
                Plan::Serve(bound) => return Ok((replica, bound)),
                Plan::ConfirmLeadership => {
                    let began = Instant::now();
                    let index = self.confirm_leadership(p).await?;
                    replica.proven(began, index);
                    let bound = Bound {
                        stale_ms_at_most: bounded.then_some(0),
                        behind_positions_at_most: bounded.then_some(0),
                    };
                    return Ok((replica, bound));
                }
                Plan::AskCommitIndex => {
                    let began = Instant::now();
                    let index = self.commit_index_confirmed(p).await?;
                    replica.proven(began, index);
                    ask.confirmed = Some(index);
                }
                Plan::WaitApplied(index) => {
                    let deadline = tokio::time::Instant::now() + SESSION_WAIT;
                    while replica.applied.get() < index && tokio::time::Instant::now() < deadline {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    ask.waited = true;
                }
                Plan::Elsewhere(leader) => {
                    return Err(self.leader_elsewhere(p, leader.map(|n| n.0)))
                }
                Plan::TokenAhead { at, applied } => {
                    return Err(KvError::Unavailable(format!(
                        "partition {p}: the read must see log position {at}, but its \
                         leader has applied only {applied} (still applying after a restart \
                         or election, or a session token from another cluster)"
                    )))
                }
            }
        }
    }

    /// The key counts of `p` on this node's replica once it has applied log position
    /// `session_at` (a session read's barrier: the connection's own writes are counted).
    /// `None` when `p` is not hosted here or its replica does not catch up in time.
    pub async fn key_counts_after(
        &self,
        p: PartitionId,
        session_at: u64,
    ) -> Option<capkv_replication::KeyCounts> {
        self.read_barrier(p, ReadConsistency::Session, session_at)
            .await
            .ok()?;
        self.key_counts(p)
    }

    /// This node leads `p` and has applied a read index it held as the only leader: after
    /// a ReadIndex round. Returns the read index.
    async fn confirm_leadership(&self, p: PartitionId) -> Result<u64, KvError> {
        // (The lease was tried first, in `read_barrier`.)
        let engine = &self.raft_engine;
        self.confirmed(p, engine.read_index(p)).await
    }

    /// `p`'s commit index, confirmed by its leader (wherever it is) after this call.
    async fn commit_index_confirmed(&self, p: PartitionId) -> Result<u64, KvError> {
        let engine = &self.raft_engine;
        self.confirmed(p, engine.commit_index_confirmed(p)).await
    }

    async fn confirmed(
        &self,
        p: PartitionId,
        round: impl std::future::Future<Output = Result<u64, ProposeError>>,
    ) -> Result<u64, KvError> {
        match tokio::time::timeout(self.read_timeout, round).await {
            Err(_elapsed) => Err(KvError::Unavailable(format!(
                "partition {p}: no leader confirmed its leadership with a quorum within {} ms",
                self.read_timeout.as_millis()
            ))),
            Ok(Ok(index)) => Ok(index),
            // A read has no outcome to be unsure of.
            Ok(Err(ProposeError::Stopped)) => Err(KvError::Unavailable(format!(
                "partition {p}: the replica stopped"
            ))),
            Ok(Err(e)) => Err(self.engine_error(p, e)),
        }
    }

    /// A read of `key` at `level`. A replica that cannot serve a read any replica may serve
    /// (it waited, and is still behind what the read must see) forwards it once to the
    /// leader it names, so clients without a routing cache need not follow the hint;
    /// `forwarded` marks a read that is itself such a forward (answered here, or refused).
    /// Linearizable reads are not forwarded: `NotLeader` tells a routing client where to
    /// go.
    pub async fn get(
        &self,
        key: &[u8],
        level: ReadConsistency,
        session: &SessionToken,
        forwarded: bool,
    ) -> Result<(Served, Option<StoredValue>), KvError> {
        self.limits.check_key(key)?;
        let p = self.map.partition_for_key(key);
        let (replica, bound) = match self.read_barrier(p, level, session.at(p)).await {
            Ok(r) => r,
            Err(KvError::NotLeader {
                leader_id: Some(leader),
                ..
            }) if !forwarded && level.any_replica() && leader != self.id => {
                return self.get_remote(leader, p, key, level, session.at(p)).await;
            }
            Err(e) => return Err(e),
        };
        let now = self.hlc.now().physical_ms();
        let value = self
            .engine
            .sm_get(p, key)
            .map_err(|e| KvError::Internal(e.to_string()))?
            // An expired key is absent on every replica, whether or not its delete has
            // been applied yet.
            .filter(|v| !v.expired_at(now));
        Ok((self.served(replica, bound), value))
    }

    /// Forwards a read to `node` (see [`KvCore::get`]).
    pub async fn get_remote(
        &self,
        node: NodeId,
        p: PartitionId,
        key: &[u8],
        level: ReadConsistency,
        session_at: u64,
    ) -> Result<(Served, Option<StoredValue>), KvError> {
        let addr = self
            .map
            .addr_of(node)
            .ok_or_else(|| KvError::Internal(format!("node {node} is not in the partition map")))?;
        let mut client = KvClient::new(self.peers.channel(addr))
            .max_decoding_message_size(self.limits.message_bytes_max());
        let mut token = SessionToken::default();
        token.observe(p, session_at);
        let w = capkv_proto::consistency::to_wire(level);
        let mut req = tonic::Request::new(GetRequest {
            key: key.to_vec(),
            consistency: w.consistency,
            session_token: token.encode(),
            max_lag_positions: w.max_lag_positions,
            max_staleness_ms: w.max_staleness_ms,
            follower_read: w.follower_read,
            forwarded: true,
        });
        req.set_timeout(self.read_timeout + Duration::from_secs(1));
        self.metrics.reads_forwarded.inc();
        let resp = client
            .get(req)
            .await
            .map_err(|s| capkv_proto::status::from_status(&s))?
            .into_inner();
        let h = resp.header.unwrap_or_default();
        let served = Served {
            partition: p,
            served_by: NodeId(h.served_by),
            term: h.raft_term,
            applied_index: h.applied_index,
            bound: Bound {
                stale_ms_at_most: h.stale_ms_at_most,
                behind_positions_at_most: h.behind_positions_at_most,
            },
        };
        let value = resp.kv.filter(|_| resp.found).map(|kv| StoredValue {
            mod_revision: kv.mod_revision,
            create_revision: kv.create_revision,
            hlc: kv.hlc,
            value: kv.value,
            expires_at_ms: kv.expires_at_ms,
        });
        Ok((served, value))
    }
}
