//! Read consistency levels a request can ask for. See docs/consistency.md.

use std::fmt;
use std::str::FromStr;

/// How far behind a `bounded` read may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Staleness {
    /// At most this many positions of the partition's Raft log behind its commit index
    /// when the read began (a position holds one engine turn's writes to the partition,
    /// so possibly more than one write).
    Positions(u64),
    /// Reflects every write acknowledged more than this many milliseconds before the read
    /// began.
    Millis(u64),
}

impl fmt::Display for Staleness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Staleness::Positions(k) => write!(f, "{k}"),
            Staleness::Millis(ms) => write!(f, "{ms}ms"),
        }
    }
}

/// The longest time bound accepted (one hour).
pub const STALENESS_MS_MAX: u64 = 3_600_000;

impl FromStr for Staleness {
    type Err = String;

    /// `K` (log positions), or a time: `Nms`, `Ns`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            format!(
                "bad staleness bound {s:?}: give a number of log positions (bounded:5) or a time \
                 (bounded:100ms, bounded:2s) of at most {STALENESS_MS_MAX} ms"
            )
        };
        let (digits, scale) = if let Some(d) = s.strip_suffix("ms") {
            (d, Some(1))
        } else if let Some(d) = s.strip_suffix('s') {
            (d, Some(1000))
        } else {
            (s, None)
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        match scale {
            None => Ok(Staleness::Positions(n)),
            Some(k) => match n.checked_mul(k) {
                Some(ms) if ms <= STALENESS_MS_MAX => Ok(Staleness::Millis(ms)),
                _ => Err(bad()),
            },
        }
    }
}

/// The level a read is served at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadConsistency {
    /// Sees every write acknowledged before the read began (leader + lease or ReadIndex).
    #[default]
    Linearizable,
    /// Linearizable too, but served by any replica: it asks the leader for its commit
    /// index (a ReadIndex round) and serves once it has applied it (a follower read).
    LinearizableFollower,
    /// Consistent prefix, and at most this far behind the latest committed write: any
    /// replica that can prove it.
    Bounded(Staleness),
    /// Some prefix of the partition's committed history, from the local replica;
    /// possibly stale, never out of order.
    Prefix,
    /// Read-your-writes and monotonic reads within a session (its `SessionToken`): any
    /// replica that has applied up to the session's position in the partition.
    Session,
    /// Whatever the local replica has; never waits on the network. Replicas converge
    /// when writes stop.
    Eventual,
}

impl ReadConsistency {
    pub const NAMES: &'static [&'static str] = &[
        "linearizable",
        "linearizable-follower",
        "bounded:K",
        "bounded:Tms",
        "session",
        "prefix",
        "eventual",
    ];

    /// The level's name, without its bound.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadConsistency::Linearizable => "linearizable",
            ReadConsistency::LinearizableFollower => "linearizable-follower",
            ReadConsistency::Bounded(_) => "bounded",
            ReadConsistency::Prefix => "prefix",
            ReadConsistency::Session => "session",
            ReadConsistency::Eventual => "eventual",
        }
    }

    /// Whether a replica other than the leader may serve it.
    pub fn any_replica(self) -> bool {
        self != ReadConsistency::Linearizable
    }
}

impl fmt::Display for ReadConsistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadConsistency::Bounded(b) => write!(f, "bounded:{b}"),
            other => f.write_str(other.as_str()),
        }
    }
}

impl FromStr for ReadConsistency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        if let Some(bound) = lower.strip_prefix("bounded:") {
            return bound.parse().map(ReadConsistency::Bounded);
        }
        match lower.as_str() {
            "linearizable" | "strong" => Ok(ReadConsistency::Linearizable),
            "linearizable-follower" | "follower" => Ok(ReadConsistency::LinearizableFollower),
            "prefix" | "consistent-prefix" => Ok(ReadConsistency::Prefix),
            "session" => Ok(ReadConsistency::Session),
            "eventual" => Ok(ReadConsistency::Eventual),
            "bounded" => {
                Err("bounded needs its bound: bounded:K (log positions) or bounded:100ms".into())
            }
            other => Err(format!(
                "unknown consistency level {other:?}; expected one of: {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_levels_and_rejects_others() {
        assert_eq!(
            "linearizable".parse::<ReadConsistency>(),
            Ok(ReadConsistency::Linearizable)
        );
        assert_eq!(
            "PREFIX".parse::<ReadConsistency>(),
            Ok(ReadConsistency::Prefix)
        );
        let err = "sometimes".parse::<ReadConsistency>().unwrap_err();
        assert!(err.contains("linearizable"), "{err}");
        assert_eq!(
            "follower".parse::<ReadConsistency>(),
            Ok(ReadConsistency::LinearizableFollower)
        );
    }

    #[test]
    fn bounded_takes_log_positions_or_a_time_and_round_trips() {
        for (s, level) in [
            ("bounded:5", Staleness::Positions(5)),
            ("bounded:0", Staleness::Positions(0)),
            ("bounded:100ms", Staleness::Millis(100)),
            ("Bounded:2s", Staleness::Millis(2000)),
        ] {
            let parsed = s.parse::<ReadConsistency>();
            assert_eq!(parsed, Ok(ReadConsistency::Bounded(level)), "{s}");
            let shown = parsed.clone().unwrap().to_string();
            assert_eq!(shown.parse::<ReadConsistency>(), parsed, "{shown}");
        }
        for bad in [
            "bounded",
            "bounded:",
            "bounded:-1",
            "bounded:1h",
            "bounded:5000s",
            "bounded:ms",
        ] {
            let err = bad.parse::<ReadConsistency>().unwrap_err();
            assert!(err.contains("bounded"), "{bad}: {err}");
        }
    }
}
