//! Hybrid logical clock (Kulkarni et al., 2014).
//!
//! A timestamp packs milliseconds since the Unix epoch in the high 48 bits and a logical
//! counter in the low 16 bits, so timestamps compare as plain `u64`s. A node's clock never
//! goes backwards and always moves past any timestamp it has observed.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const LOGICAL_BITS: u32 = 16;
const LOGICAL_MASK: u64 = (1 << LOGICAL_BITS) - 1;

/// A packed HLC timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HlcTimestamp(pub u64);

impl HlcTimestamp {
    pub fn from_parts(physical_ms: u64, logical: u16) -> Self {
        HlcTimestamp((physical_ms << LOGICAL_BITS) | u64::from(logical))
    }

    pub fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }

    pub fn logical(self) -> u16 {
        (self.0 & LOGICAL_MASK) as u16
    }

    /// The smallest timestamp greater than `self`.
    pub fn next(self) -> Self {
        HlcTimestamp(self.0.saturating_add(1))
    }
}

impl std::fmt::Display for HlcTimestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.physical_ms(), self.logical())
    }
}

/// A node's hybrid logical clock.
#[derive(Debug, Default)]
pub struct Hlc {
    last: AtomicU64,
    /// Added to the wall clock (fault injection: the `clock` nemesis jumps it either way).
    wall_offset_ms: AtomicI64,
}

impl Hlc {
    pub fn new() -> Self {
        Self::default()
    }

    fn wall_ms(&self) -> u64 {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        ms.saturating_add(self.wall_offset_ms.load(Ordering::Relaxed))
            .max(0) as u64
    }

    /// Makes the wall clock this HLC reads run `offset_ms` ahead (negative: behind) of the
    /// system's, as a jumped clock would. The HLC itself still never goes backwards.
    pub fn set_wall_offset_ms(&self, offset_ms: i64) {
        self.wall_offset_ms.store(offset_ms, Ordering::Relaxed);
    }

    pub fn wall_offset_ms(&self) -> i64 {
        self.wall_offset_ms.load(Ordering::Relaxed)
    }

    /// A timestamp greater than every one this clock returned or observed before.
    pub fn now(&self) -> HlcTimestamp {
        let wall = HlcTimestamp::from_parts(self.wall_ms(), 0).0;
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            let next = if wall > prev { wall } else { prev + 1 };
            match self
                .last
                .compare_exchange_weak(prev, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return HlcTimestamp(next),
                Err(actual) => prev = actual,
            }
        }
    }

    /// Moves the clock past a timestamp received from elsewhere.
    pub fn observe(&self, ts: HlcTimestamp) {
        self.last.fetch_max(ts.0, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_and_unpacks() {
        let ts = HlcTimestamp::from_parts(1_700_000_000_000, 7);
        assert_eq!(ts.physical_ms(), 1_700_000_000_000);
        assert_eq!(ts.logical(), 7);
        assert!(HlcTimestamp::from_parts(5, 0) > HlcTimestamp::from_parts(4, 65535));
    }

    #[test]
    fn never_goes_backwards_and_passes_observed_times() {
        let clock = Hlc::new();
        let mut last = clock.now();
        for _ in 0..10_000 {
            let ts = clock.now();
            assert!(ts > last);
            last = ts;
        }
        let future = HlcTimestamp::from_parts(last.physical_ms() + 60_000, 3);
        clock.observe(future);
        let after = clock.now();
        assert!(after > future, "{after} should pass {future}");
    }

    #[test]
    fn wall_clock_jumps_move_the_physical_part_but_never_back() {
        let clock = Hlc::new();
        let before = clock.now();
        clock.set_wall_offset_ms(3_600_000);
        let ahead = clock.now();
        assert!(ahead.physical_ms() >= before.physical_ms() + 3_600_000);
        // Jump back by two hours: the physical part stays where it was, the counter runs.
        clock.set_wall_offset_ms(-3_600_000);
        let mut last = ahead;
        for _ in 0..1000 {
            let ts = clock.now();
            assert!(ts > last, "{ts} after {last}");
            assert_eq!(ts.physical_ms(), ahead.physical_ms());
            last = ts;
        }
    }
}
