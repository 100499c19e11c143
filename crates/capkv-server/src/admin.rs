//! The test-only `Admin` gRPC service: one typed call sets every fault a node can inject
//! (network drops either way, fsync failures and stalls, wall-clock offset). Refused unless
//! the node runs with `--unsafe-fault-injection`.

use std::sync::Arc;
use std::time::Duration;

use capkv_proto::admin::{self as pb, admin_server::Admin};
use capkv_replication::faults::{NetworkFaults, FAULTS_DISABLED};
use capkv_types::NodeId;
use tonic::{Request, Response, Status};

use crate::kv::KvCore;

pub struct AdminService {
    pub core: Arc<KvCore>,
}

/// Largest stall or clock offset a call may set (an hour): beyond it is a typo.
const FAULT_MAGNITUDE_MAX_MS: i64 = 3_600_000;

impl AdminService {
    fn current(&self) -> pb::Faults {
        let core = &self.core;
        let net = core.faults().network();
        pb::Faults {
            drop_to: net.drop_to.iter().map(|n| n.0).collect(),
            drop_from: net.drop_from.iter().map(|n| n.0).collect(),
            fsync_fail_next: false,
            fsync_stall_ms: core.storage().group_commit().faults().stall().as_millis() as u32,
            wall_clock_offset_ms: core.hlc().wall_offset_ms(),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn set_faults(
        &self,
        request: Request<pb::Faults>,
    ) -> Result<Response<pb::Faults>, Status> {
        let core = &self.core;
        if !core.faults().enabled() {
            return Err(Status::failed_precondition(FAULTS_DISABLED));
        }
        let f = request.into_inner();
        if i64::from(f.fsync_stall_ms) > FAULT_MAGNITUDE_MAX_MS
            || f.wall_clock_offset_ms.abs() > FAULT_MAGNITUDE_MAX_MS
        {
            return Err(Status::invalid_argument(format!(
                "fsync stall and clock offset are limited to {FAULT_MAGNITUDE_MAX_MS} ms"
            )));
        }
        let network = NetworkFaults {
            drop_to: f.drop_to.iter().map(|n| NodeId(*n)).collect(),
            drop_from: f.drop_from.iter().map(|n| NodeId(*n)).collect(),
        };
        core.faults()
            .set_network(network)
            .map_err(Status::failed_precondition)?;
        let disk = core.storage().group_commit().faults();
        disk.set_stall(Duration::from_millis(u64::from(f.fsync_stall_ms)));
        if f.fsync_fail_next {
            disk.fail_next_sync();
        }
        core.hlc().set_wall_offset_ms(f.wall_clock_offset_ms);
        tracing::warn!(
            node = core.id().0,
            drop_to = ?f.drop_to,
            drop_from = ?f.drop_from,
            fsync_fail_next = f.fsync_fail_next,
            fsync_stall_ms = f.fsync_stall_ms,
            wall_clock_offset_ms = f.wall_clock_offset_ms,
            "fault injection"
        );
        Ok(Response::new(self.current()))
    }

    async fn get_faults(
        &self,
        _request: Request<pb::GetFaultsRequest>,
    ) -> Result<Response<pb::Faults>, Status> {
        if !self.core.faults().enabled() {
            return Err(Status::failed_precondition(FAULTS_DISABLED));
        }
        Ok(Response::new(self.current()))
    }
}
