//! Scans: one partition's rows (locally or from a peer), and the merge of every
//! partition's rows into one page in key order.

use super::*;

/// A scan request, after decoding.
#[derive(Debug, Clone, Default)]
pub struct ScanParams {
    pub start: Vec<u8>,
    /// Exclusive; `None` = to the last key.
    pub end: Option<Vec<u8>>,
    pub prefix: Vec<u8>,
    pub limit: u32,
    pub continuation: Vec<u8>,
    pub consistency: ReadConsistency,
    /// The session's token (`session` reads wait for its position in each partition).
    pub session: SessionToken,
}

/// One partition's share of a scan: `[start, end)`, at most `limit` keys, read at `level`.
#[derive(Debug, Clone, Copy)]
pub struct PartitionScan<'a> {
    pub partition: PartitionId,
    pub start: &'a [u8],
    /// Exclusive; `None` = to the partition's last key.
    pub end: Option<&'a [u8]>,
    pub limit: u32,
    pub level: ReadConsistency,
    /// The session's position in this partition (`session` reads).
    pub session_at: u64,
}

#[derive(Debug, Clone, Default)]
pub struct ScanPage {
    pub kvs: Vec<KeyValue>,
    /// Empty when the range is exhausted.
    pub continuation: Vec<u8>,
    /// The position of each partition read (its replica's applied index after the read).
    pub seen: SessionToken,
    /// Bounded reads: the loosest bound of the partitions read.
    pub bound: Bound,
}

/// One partition's share of a scan, as read: the rows, whether the partition has more,
/// and the replica's applied index after the read.
pub struct PartitionRows {
    pub kvs: Vec<KeyValue>,
    pub more: bool,
    /// With `more`: the last key looked at (expired keys are looked at and left out).
    pub examined_to: Option<Vec<u8>>,
    pub position: u64,
    pub bound: Bound,
}

pub const SCAN_DEFAULT_LIMIT: u32 = 1000;
const CONTINUATION_V1: u8 = 1;

/// The smallest key greater than every key starting with `prefix`, or `None` if there is
/// none (the prefix is all 0xff).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

fn decode_continuation(token: &[u8]) -> Result<Option<Vec<u8>>, KvError> {
    match token.split_first() {
        None => Ok(None),
        Some((&CONTINUATION_V1, last_key)) => Ok(Some(last_key.to_vec())),
        Some(_) => Err(KvError::InvalidArgument(
            "continuation token is not one this server issued".into(),
        )),
    }
}

fn encode_continuation(last_key: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(1 + last_key.len());
    t.push(CONTINUATION_V1);
    t.extend_from_slice(last_key);
    t
}

impl KvCore {
    pub async fn scan_partition_local(
        &self,
        scan: PartitionScan<'_>,
    ) -> Result<PartitionRows, KvError> {
        let PartitionScan {
            partition: p,
            start,
            end,
            limit,
            level,
            session_at,
        } = scan;
        if p.0 >= self.map.partition_count {
            return Err(KvError::InvalidArgument(format!(
                "partition {p} does not exist (the cluster has {})",
                self.map.partition_count
            )));
        }
        let (replica, bound) = self.read_barrier(p, level, session_at).await?;
        let want = limit as usize;
        let bytes_max = self.limits.scan_page_bytes_max;
        // A page (up to 4 MiB, maybe from disk) is read on the blocking pool: a node may run
        // a single async worker (`--worker-threads`), which must not stall every connection
        // and the Raft transport meanwhile.
        let engine = self.engine.clone();
        let (start, end) = (start.to_vec(), end.map(<[u8]>::to_vec));
        let mut rows = tokio::task::spawn_blocking(move || {
            engine.sm_scan(p, &start, end.as_deref(), want + 1, bytes_max)
        })
        .await
        .map_err(|e| KvError::Internal(format!("scan task: {e}")))?
        .map_err(|e| KvError::Internal(e.to_string()))?;
        let bytes: usize = rows.iter().map(|(k, v)| k.len() + v.value.len()).sum();
        let more = rows.len() > want || bytes >= bytes_max;
        rows.truncate(want);
        let examined_to = rows.last().map(|(k, _)| k.clone()).filter(|_| more);
        let now = self.hlc.now().physical_ms();
        Ok(PartitionRows {
            kvs: rows
                .into_iter()
                .filter(|(_, v)| !v.expired_at(now))
                .map(|(key, value)| KeyValue { key, value })
                .collect(),
            more,
            examined_to,
            // After the read: no row is newer than this.
            position: replica.applied.upper(),
            bound,
        })
    }

    async fn scan_partition_anywhere(
        &self,
        scan: PartitionScan<'_>,
    ) -> Result<PartitionRows, KvError> {
        let p = scan.partition;
        let mut target: Option<NodeId> = None;
        if self.replicas.contains_key(&p) {
            let role = self.role(p);
            if scan.level.any_replica() || role.leader {
                // A `session` read this replica cannot serve names the leader.
                match self.scan_partition_local(scan).await {
                    Err(KvError::NotLeader { leader_id, .. }) if leader_id.is_some() => {
                        target = leader_id;
                    }
                    other => return other,
                }
            } else {
                target = role.known_leader;
            }
        }
        let mut target = target.or_else(|| self.map.replicas(p).first().copied());
        // Follow at most two leader hints.
        for _ in 0..3 {
            let Some(node) = target else { break };
            if node == self.id {
                return self.scan_partition_local(scan).await;
            }
            match self.scan_remote(node, scan).await {
                Err(KvError::NotLeader { leader_id, .. })
                    if leader_id.is_some() && leader_id != Some(node) =>
                {
                    target = leader_id;
                }
                other => return other,
            }
        }
        Err(KvError::Unavailable(format!(
            "partition {p}: no leader found for the scan"
        )))
    }

    async fn scan_remote(
        &self,
        node: NodeId,
        scan: PartitionScan<'_>,
    ) -> Result<PartitionRows, KvError> {
        let PartitionScan {
            partition: p,
            start,
            end,
            limit,
            level,
            session_at,
        } = scan;
        let addr = self
            .map
            .addr_of(node)
            .ok_or_else(|| KvError::Internal(format!("node {node} is not in the partition map")))?;
        let mut client = KvClient::new(self.peers.channel(addr)).max_decoding_message_size(
            self.limits.message_bytes_max() + self.limits.scan_page_bytes_max,
        );
        let mut token = SessionToken::default();
        token.observe(p, session_at);
        let w = capkv_proto::consistency::to_wire(level);
        let mut req = tonic::Request::new(ScanRequest {
            start: start.to_vec(),
            end: end.map(<[u8]>::to_vec).unwrap_or_default(),
            prefix: vec![],
            limit,
            continuation: vec![],
            consistency: w.consistency,
            partition_id: Some(p.0),
            session_token: token.encode(),
            max_lag_positions: w.max_lag_positions,
            max_staleness_ms: w.max_staleness_ms,
            follower_read: w.follower_read,
        });
        req.set_timeout(self.read_timeout + Duration::from_secs(1));
        let resp = client
            .scan(req)
            .await
            .map_err(|s| capkv_proto::status::from_status(&s))?
            .into_inner();
        let kvs = resp
            .kvs
            .into_iter()
            .map(|kv| KeyValue {
                key: kv.key,
                value: StoredValue {
                    mod_revision: kv.mod_revision,
                    create_revision: kv.create_revision,
                    hlc: kv.hlc,
                    value: kv.value,
                    expires_at_ms: kv.expires_at_ms,
                },
            })
            .collect();
        Ok(PartitionRows {
            kvs,
            more: !resp.continuation.is_empty(),
            examined_to: decode_continuation(&resp.continuation)?,
            position: SessionToken::decode(&resp.session_token)?.at(p),
            bound: Bound {
                stale_ms_at_most: resp.stale_ms_at_most,
                behind_positions_at_most: resp.behind_positions_at_most,
            },
        })
    }

    /// Resolves prefix, range and continuation into `[start, end)`.
    fn scan_bounds(&self, params: &ScanParams) -> Result<(Vec<u8>, Option<Vec<u8>>), KvError> {
        let (mut start, end) = if !params.prefix.is_empty() {
            if !params.start.is_empty() || params.end.is_some() {
                return Err(KvError::InvalidArgument(
                    "give either a prefix or a start/end range, not both".into(),
                ));
            }
            (params.prefix.clone(), prefix_end(&params.prefix))
        } else {
            (params.start.clone(), params.end.clone())
        };
        // One byte over the key limit: a continuation after a longest key is `key ‖ 0`,
        // and a node fanning a scan out sends it on as the start.
        let bound_max = self.limits.key_bytes_max + 1;
        for k in [Some(&start), end.as_ref()].into_iter().flatten() {
            if k.len() > bound_max {
                return Err(KvError::too_large("scan bound", k.len(), bound_max));
            }
        }
        if let Some(last) = decode_continuation(&params.continuation)? {
            let mut after = last;
            after.push(0);
            if after > start {
                start = after;
            }
        }
        Ok((start, end))
    }

    fn scan_limit(&self, limit: u32) -> Result<u32, KvError> {
        match limit {
            0 => Ok(SCAN_DEFAULT_LIMIT.min(self.limits.scan_limit_max)),
            l if l > self.limits.scan_limit_max => Err(KvError::InvalidArgument(format!(
                "scan limit {l} is over the maximum of {}",
                self.limits.scan_limit_max
            ))),
            l => Ok(l),
        }
    }

    /// One partition, for a peer's fan-out.
    pub async fn scan_one(&self, p: PartitionId, params: &ScanParams) -> Result<ScanPage, KvError> {
        let limit = self.scan_limit(params.limit)?;
        let (start, end) = self.scan_bounds(params)?;
        let rows = self
            .scan_partition_local(PartitionScan {
                partition: p,
                start: &start,
                end: end.as_deref(),
                limit,
                level: params.consistency,
                session_at: params.session.at(p),
            })
            .await?;
        let continuation = match (rows.more, &rows.examined_to) {
            (true, Some(last)) => encode_continuation(last),
            _ => vec![],
        };
        let mut seen = SessionToken::default();
        seen.observe(p, rows.position);
        Ok(ScanPage {
            kvs: rows.kvs,
            continuation,
            seen,
            bound: rows.bound,
        })
    }

    /// Keys in byte order across every partition, one page.
    ///
    /// Each partition is read at the requested level on its own; a page is not a
    /// snapshot across partitions.
    pub async fn scan(&self, params: &ScanParams) -> Result<ScanPage, KvError> {
        let limit = self.scan_limit(params.limit)?;
        let (start, end) = self.scan_bounds(params)?;
        if matches!(&end, Some(e) if *e <= start) {
            return Ok(ScanPage::default());
        }
        let futures = self.map.partitions().map(|p| {
            self.scan_partition_anywhere(PartitionScan {
                partition: p,
                start: &start,
                end: end.as_deref(),
                limit,
                level: params.consistency,
                session_at: params.session.at(p),
            })
        });
        let results = futures::future::join_all(futures).await;
        let mut all: Vec<KeyValue> = Vec::new();
        // No key past the last key of a partition that has more may be returned: that
        // partition could hold keys between.
        let mut cutoff: Option<Vec<u8>> = None;
        let mut seen = SessionToken::default();
        let mut bound = Bound::default();
        for (p, r) in self.map.partitions().zip(results) {
            let PartitionRows {
                kvs,
                more,
                examined_to,
                position,
                bound: b,
            } = r?;
            seen.observe(p, position);
            bound = bound.loosest(b);
            if more {
                // The last key the partition looked at (rows after expired keys are
                // left out, so it may be past the last row returned).
                if let Some(last) = examined_to.or_else(|| kvs.last().map(|kv| kv.key.clone())) {
                    if cutoff.as_ref().is_none_or(|c| last < *c) {
                        cutoff = Some(last);
                    }
                }
            }
            all.extend(kvs);
        }
        all.sort_by(|a, b| a.key.cmp(&b.key));
        let total = all.len();
        let mut page = Vec::new();
        let mut bytes = 0usize;
        for kv in all {
            if page.len() >= limit as usize
                || (bytes >= self.limits.scan_page_bytes_max && !page.is_empty())
            {
                break;
            }
            if matches!(&cutoff, Some(c) if kv.key > *c) {
                break;
            }
            bytes += kv.key.len() + kv.value.value.len();
            page.push(kv);
        }
        let truncated = page.len() < total || cutoff.is_some();
        let continuation = match (truncated, page.last(), &cutoff) {
            (true, Some(last), _) => encode_continuation(&last.key),
            // Every row looked at had expired: go on past them.
            (true, None, Some(c)) => encode_continuation(c),
            _ => vec![],
        };
        Ok(ScanPage {
            kvs: page,
            continuation,
            seen,
            bound,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        assert_eq!(prefix_end(b"user:"), Some(b"user;".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
    }

    #[test]
    fn continuation_tokens_round_trip_and_reject_garbage() {
        assert_eq!(
            decode_continuation(&encode_continuation(b"k1")).unwrap(),
            Some(b"k1".to_vec())
        );
        assert_eq!(decode_continuation(b"").unwrap(), None);
        assert!(decode_continuation(b"\x07junk").is_err());
    }
}
