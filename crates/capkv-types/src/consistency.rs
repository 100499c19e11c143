//! Read consistency levels a request can ask for. See docs/consistency.md.

use std::fmt;
use std::str::FromStr;

/// The level a read is served at. `bounded` arrives in a later release; the wire enum
/// reserves its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadConsistency {
    /// Sees every write acknowledged before the read began (leader + lease or ReadIndex).
    #[default]
    Linearizable,
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
    pub const NAMES: &'static [&'static str] = &["linearizable", "session", "prefix", "eventual"];

    pub fn as_str(self) -> &'static str {
        match self {
            ReadConsistency::Linearizable => "linearizable",
            ReadConsistency::Prefix => "prefix",
            ReadConsistency::Session => "session",
            ReadConsistency::Eventual => "eventual",
        }
    }
}

impl fmt::Display for ReadConsistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ReadConsistency {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "linearizable" | "strong" => Ok(ReadConsistency::Linearizable),
            "prefix" | "consistent-prefix" => Ok(ReadConsistency::Prefix),
            "session" => Ok(ReadConsistency::Session),
            "eventual" => Ok(ReadConsistency::Eventual),
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
    }
}
