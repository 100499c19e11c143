//! Read levels on the wire (`kv.Consistency`) <-> `ReadConsistency`, for the client and
//! the server alike.

use capkv_types::{KvError, ReadConsistency};

use crate::kv::Consistency;

pub fn to_wire(level: ReadConsistency) -> i32 {
    let c = match level {
        ReadConsistency::Linearizable => Consistency::Linearizable,
        ReadConsistency::Prefix => Consistency::Prefix,
        ReadConsistency::Session => Consistency::Session,
        ReadConsistency::Eventual => Consistency::Eventual,
    };
    c as i32
}

/// The level a request asks for; one that names none (`UNSPECIFIED`) gets `default`.
pub fn from_wire(c: i32, default: ReadConsistency) -> Result<ReadConsistency, KvError> {
    match Consistency::try_from(c) {
        Ok(Consistency::Unspecified) => Ok(default),
        Ok(Consistency::Linearizable) => Ok(ReadConsistency::Linearizable),
        Ok(Consistency::Prefix) => Ok(ReadConsistency::Prefix),
        Ok(Consistency::Session) => Ok(ReadConsistency::Session),
        Ok(Consistency::Eventual) => Ok(ReadConsistency::Eventual),
        Err(_) => Err(KvError::InvalidArgument(format!(
            "unknown consistency level {c}; supported: linearizable (1), prefix (2), \
             session (4), eventual (5)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_round_trip_a_missing_one_is_the_default_and_an_unknown_one_is_refused() {
        for level in [
            ReadConsistency::Linearizable,
            ReadConsistency::Session,
            ReadConsistency::Prefix,
            ReadConsistency::Eventual,
        ] {
            assert_eq!(
                from_wire(to_wire(level), ReadConsistency::Session),
                Ok(level)
            );
            assert_eq!(from_wire(Consistency::Unspecified as i32, level), Ok(level));
        }
        // 3 is reserved for bounded.
        for unknown in [3, 6, -1] {
            let err = from_wire(unknown, ReadConsistency::Linearizable).unwrap_err();
            assert!(matches!(err, KvError::InvalidArgument(_)), "{err:?}");
        }
    }
}
