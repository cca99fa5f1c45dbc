//! The store's clock: the database's, as near as this process can tell.
//!
//! Every timestamp the store writes and every deadline the pool compares
//! with them (boot and idle timeouts, node heartbeats, back-offs) comes from
//! [`now_millis`], so replicas on hosts whose clocks disagree still agree on
//! when a deadline has passed: [`PgStore`](crate::PgStore) measures the
//! offset of the database server's clock (`clock_timestamp()`) from this
//! host's at open and every [`RESYNC`], the round trip halved, and keeps it
//! in one process-wide atomic that [`now_millis`] adds. SQLite runs in this
//! process, so its clock is this host's: offset 0.
//!
//! **Invariant:** one process talks to one database (the offset is
//! process-wide); the offset only moves by a new measurement.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// How often a PostgreSQL store measures the offset again.
pub const RESYNC: Duration = Duration::from_secs(30);

/// The database's clock minus this host's, in milliseconds.
static OFFSET: AtomicI64 = AtomicI64::new(0);

/// A shift of this host's clock, for tests only ([`skew_local_clock`]).
static LOCAL_SKEW: AtomicI64 = AtomicI64::new(0);

/// Now by this host's clock (plus any test skew), in milliseconds since the
/// Unix epoch.
pub fn local_millis() -> i64 {
    let local = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    local + LOCAL_SKEW.load(Ordering::Relaxed)
}

/// Now by the database's clock, in milliseconds since the Unix epoch.
pub fn now_millis() -> i64 {
    local_millis() + OFFSET.load(Ordering::Relaxed)
}

/// The offset in use (the database's clock minus this host's).
pub fn offset_millis() -> i64 {
    OFFSET.load(Ordering::Relaxed)
}

pub(crate) fn set_offset(offset: i64) {
    OFFSET.store(offset, Ordering::Relaxed);
}

/// Test hook: pretends this host's clock is `skew_ms` off (positive: ahead).
/// Nothing but tests calls it; the next measurement of a PostgreSQL store
/// makes up for it, which is what the tests check.
#[doc(hidden)]
pub fn skew_local_clock(skew_ms: i64) {
    LOCAL_SKEW.store(skew_ms, Ordering::Relaxed);
}

/// The offset from three samples `(local before, database, local after)`:
/// the one with the shortest round trip, its database reading against the
/// middle of the round trip.
pub(crate) fn offset_from(samples: &[(i64, i64, i64)]) -> Option<i64> {
    samples
        .iter()
        .min_by_key(|(before, _, after)| after - before)
        .map(|(before, db, after)| db - (before + after) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shortest_round_trip_wins_and_is_halved() {
        // 100 ms round trip, database 1 000 ms ahead of its middle; a
        // slower sample (400 ms) says otherwise and is ignored.
        let samples = [(0, 1_050, 100), (1_000, 2_500, 1_400)];
        assert_eq!(offset_from(&samples), Some(1_000));
        assert_eq!(offset_from(&[]), None);
    }
}
