//! Read levels on the wire (`kv.Consistency`) <-> `ReadConsistency`, for the client and
//! the server alike.

use capkv_types::consistency::STALENESS_MS_MAX;
use capkv_types::{KvError, ReadConsistency, Staleness};

use crate::kv::{Consistency, GetRequest, ScanRequest};

/// A read level as the request fields carry it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WireLevel {
    pub consistency: i32,
    pub max_lag_positions: Option<u64>,
    pub max_staleness_ms: Option<u64>,
    pub follower_read: bool,
}

impl WireLevel {
    pub fn of_get(r: &GetRequest) -> WireLevel {
        WireLevel {
            consistency: r.consistency,
            max_lag_positions: r.max_lag_positions,
            max_staleness_ms: r.max_staleness_ms,
            follower_read: r.follower_read,
        }
    }

    pub fn of_scan(r: &ScanRequest) -> WireLevel {
        WireLevel {
            consistency: r.consistency,
            max_lag_positions: r.max_lag_positions,
            max_staleness_ms: r.max_staleness_ms,
            follower_read: r.follower_read,
        }
    }
}

pub fn to_wire(level: ReadConsistency) -> WireLevel {
    let c = |c: Consistency| WireLevel {
        consistency: c as i32,
        ..WireLevel::default()
    };
    match level {
        ReadConsistency::Linearizable => c(Consistency::Linearizable),
        ReadConsistency::LinearizableFollower => WireLevel {
            follower_read: true,
            ..c(Consistency::Linearizable)
        },
        ReadConsistency::Bounded(Staleness::Positions(k)) => WireLevel {
            max_lag_positions: Some(k),
            ..c(Consistency::Bounded)
        },
        ReadConsistency::Bounded(Staleness::Millis(ms)) => WireLevel {
            max_staleness_ms: Some(ms),
            ..c(Consistency::Bounded)
        },
        ReadConsistency::Prefix => c(Consistency::Prefix),
        ReadConsistency::Session => c(Consistency::Session),
        ReadConsistency::Eventual => c(Consistency::Eventual),
    }
}

/// The level a request asks for; one that names none (`UNSPECIFIED`) gets `default`.
pub fn from_wire(w: WireLevel, default: ReadConsistency) -> Result<ReadConsistency, KvError> {
    let bad = |m: String| Err(KvError::InvalidArgument(m));
    let level = match Consistency::try_from(w.consistency) {
        Ok(Consistency::Unspecified) => default,
        Ok(Consistency::Linearizable) if w.follower_read => ReadConsistency::LinearizableFollower,
        Ok(Consistency::Linearizable) => ReadConsistency::Linearizable,
        Ok(Consistency::Prefix) => ReadConsistency::Prefix,
        Ok(Consistency::Session) => ReadConsistency::Session,
        Ok(Consistency::Eventual) => ReadConsistency::Eventual,
        Ok(Consistency::Bounded) => match (w.max_lag_positions, w.max_staleness_ms) {
            (Some(k), None) => ReadConsistency::Bounded(Staleness::Positions(k)),
            (None, Some(ms)) if ms <= STALENESS_MS_MAX => {
                ReadConsistency::Bounded(Staleness::Millis(ms))
            }
            (None, Some(ms)) => {
                return bad(format!(
                    "max_staleness_ms {ms} is above the limit of {STALENESS_MS_MAX}"
                ))
            }
            _ => {
                return bad("a bounded read needs exactly one of max_lag_positions and \
                     max_staleness_ms"
                    .into())
            }
        },
        Err(_) => {
            return bad(format!(
                "unknown consistency level {}; supported: linearizable (1), prefix (2), \
                 bounded (3), session (4), eventual (5)",
                w.consistency
            ))
        }
    };
    if !matches!(level, ReadConsistency::Bounded(_))
        && (w.max_lag_positions.is_some() || w.max_staleness_ms.is_some())
    {
        return bad(format!(
            "a staleness bound is only for bounded reads, not {level}"
        ));
    }
    if w.follower_read && level != ReadConsistency::LinearizableFollower {
        return bad(format!(
            "follower_read is only for linearizable reads, not {level}"
        ));
    }
    Ok(level)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_round_trip_a_missing_one_is_the_default_and_an_unknown_one_is_refused() {
        for level in [
            ReadConsistency::Linearizable,
            ReadConsistency::LinearizableFollower,
            ReadConsistency::Bounded(Staleness::Positions(0)),
            ReadConsistency::Bounded(Staleness::Positions(7)),
            ReadConsistency::Bounded(Staleness::Millis(250)),
            ReadConsistency::Session,
            ReadConsistency::Prefix,
            ReadConsistency::Eventual,
        ] {
            assert_eq!(
                from_wire(to_wire(level), ReadConsistency::Session),
                Ok(level)
            );
            let unspecified = WireLevel::default();
            assert_eq!(from_wire(unspecified, level), Ok(level));
        }
        let refused = |w: WireLevel| {
            let err = from_wire(w, ReadConsistency::Linearizable).unwrap_err();
            assert!(matches!(err, KvError::InvalidArgument(_)), "{w:?}: {err:?}");
        };
        for unknown in [6, -1] {
            refused(WireLevel {
                consistency: unknown,
                ..WireLevel::default()
            });
        }
        let bounded = Consistency::Bounded as i32;
        // Bounded needs exactly one bound, and a time within the limit.
        refused(WireLevel {
            consistency: bounded,
            ..WireLevel::default()
        });
        refused(WireLevel {
            consistency: bounded,
            max_lag_positions: Some(1),
            max_staleness_ms: Some(1),
            ..WireLevel::default()
        });
        refused(WireLevel {
            consistency: bounded,
            max_staleness_ms: Some(STALENESS_MS_MAX + 1),
            ..WireLevel::default()
        });
        // A bound or follower_read on a level they do not belong to.
        refused(WireLevel {
            consistency: Consistency::Prefix as i32,
            max_staleness_ms: Some(10),
            ..WireLevel::default()
        });
        refused(WireLevel {
            consistency: Consistency::Session as i32,
            follower_read: true,
            ..WireLevel::default()
        });
    }
}
