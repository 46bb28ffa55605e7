//! The one backoff every retry uses: a wait that starts at `first`, doubles after each failure up
//! to `max`, and is spread ±50% so that callers that failed together (a database, a broker or a
//! gateway gone for all of them at once) do not all come back in the same instant.
//!
//! The spread comes from a small PRNG (SplitMix64) per thread, seeded once from the kernel's
//! random source: a retry costs no system call. It only spreads waits; nothing secret depends on
//! it.

use std::cell::Cell;
use std::time::Duration;

/// Exponential backoff with jitter. [`Backoff::next_wait`] gives the wait to make now and doubles the
/// one after; [`Backoff::reset`] starts over once a call succeeds.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    /// The wait before jitter the next call of [`Backoff::next_wait`] spreads.
    current: Duration,
}

impl Backoff {
    /// Waits from `first` (spread ±50%), doubling to `max`.
    pub const fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max,
            current: first,
        }
    }

    /// The wait to make now (spread); the next one is twice as long, up to `max`.
    pub fn next_wait(&mut self) -> Duration {
        let wait = spread(self.current);
        self.current = self.current.saturating_mul(2).min(self.max);
        wait
    }

    /// The next wait starts again from `first` (a call succeeded).
    pub fn reset(&mut self) {
        self.current = self.first;
    }

    /// The wait after `failures` failed attempts (the first failure waits about `first`), for a
    /// schedule kept as data rather than as a running `Backoff` (one per order owing money).
    pub fn after_failures(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(32);
        let base = self
            .first
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.max);
        spread(base)
    }
}

/// `wait` spread evenly over [wait/2, wait*3/2].
fn spread(wait: Duration) -> Duration {
    let nanos = u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX);
    if nanos < 2 {
        return wait;
    }
    let half = nanos / 2;
    Duration::from_nanos(half + fast_u64() % (nanos + 1))
}

thread_local! {
    /// This thread's SplitMix64 state (0: not seeded yet).
    static STATE: Cell<u64> = const { Cell::new(0) };
}

/// A fast pseudo-random number (SplitMix64), per thread, seeded once from the kernel.
fn fast_u64() -> u64 {
    STATE.with(|state| {
        let mut s = state.get();
        if s == 0 {
            s = crate::random::random_bytes(8)
                .ok()
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map_or_else(fallback_seed, u64::from_le_bytes)
                | 1;
        }
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        state.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    })
}

/// A seed when the kernel gives none: the time and this thread's stack address (jitter only).
fn fallback_seed() -> u64 {
    let marker = 0u8;
    let time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    time ^ (std::ptr::addr_of!(marker) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn waits_double_to_the_cap_and_are_spread_around_each_step() {
        // Proves: each wait lies within ±50% of its step, the steps double up to the cap, reset
        // starts over, and waits of one step are spread (not all the same).
        let ms = Duration::from_millis;
        let mut backoff = Backoff::new(ms(100), ms(1_000));
        for step in [100, 200, 400, 800, 1_000, 1_000] {
            let wait = backoff.next_wait();
            assert!(
                wait >= ms(step / 2) && wait <= ms(step * 3 / 2),
                "{step}: {wait:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_wait() <= ms(150));
        let spread: HashSet<Duration> = (0..64)
            .map(|_| Backoff::new(ms(100), ms(1_000)).next_wait())
            .collect();
        assert!(spread.len() > 32, "{spread:?}");
        let schedule = Backoff::new(ms(1_000), ms(60_000));
        for (failures, step) in [
            (1, 1_000),
            (2, 2_000),
            (3, 4_000),
            (7, 60_000),
            (40, 60_000),
        ] {
            let wait = schedule.after_failures(failures);
            assert!(
                wait >= ms(step / 2) && wait <= ms(step * 3 / 2),
                "{failures}: {wait:?}"
            );
        }
    }
}
