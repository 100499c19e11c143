//! Bugs a node can be started with on purpose (TESTING ONLY, `capkv server --planted-bug`),
//! so that `capkv check` can show its faults and checkers catch them
//! (docs/verification.md). Shared by the server, which plants them, and the checker, which
//! asks for them by name.

/// A planted bug.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PlantedBug {
    /// Linearizable reads from the local replica without confirming leadership (caught
    /// under partitions).
    StaleReads,
    /// A lease read trusts a quorum acknowledgement for the whole lease instead of half,
    /// while telling peers it trusts half (the `clock` nemesis's rate skew exposes it).
    FullLease,
    /// Durability acknowledged before the fsync that covers it (caught by the `disk`
    /// nemesis's power cut).
    AckBeforeFsync,
    /// `session` reads ignore the session token: any replica serves them at once, however
    /// far behind (caught by the session checker under partitions).
    IgnoreSessionToken,
    /// `bounded` reads ignore the staleness bound: the local replica serves them at once,
    /// however far behind (caught by the bounded checker under partitions).
    IgnoreStalenessBound,
    /// Scans read the state machine without a snapshot, so writes that land during a
    /// scan are seen ahead of its cursor and missed behind it (caught by the prefix
    /// checker of the sequence workload).
    ScanWithoutSnapshot,
}

impl PlantedBug {
    pub const ALL: [PlantedBug; 6] = [
        PlantedBug::StaleReads,
        PlantedBug::FullLease,
        PlantedBug::AckBeforeFsync,
        PlantedBug::IgnoreSessionToken,
        PlantedBug::IgnoreStalenessBound,
        PlantedBug::ScanWithoutSnapshot,
    ];

    /// The name `--planted-bug` takes.
    pub fn name(self) -> &'static str {
        match self {
            PlantedBug::StaleReads => "stale-reads",
            PlantedBug::FullLease => "full-lease",
            PlantedBug::AckBeforeFsync => "ack-before-fsync",
            PlantedBug::IgnoreSessionToken => "ignore-session-token",
            PlantedBug::IgnoreStalenessBound => "ignore-staleness-bound",
            PlantedBug::ScanWithoutSnapshot => "scan-without-snapshot",
        }
    }

    pub fn parse(name: &str) -> Option<PlantedBug> {
        PlantedBug::ALL.into_iter().find(|b| b.name() == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for b in PlantedBug::ALL {
            assert_eq!(PlantedBug::parse(b.name()), Some(b));
        }
        assert_eq!(PlantedBug::parse("none"), None);
    }
}
