//! The randomness behind every jittered delay of ipamd and its providers,
//! from one place: the operating system's entropy normally, or a seed for
//! a simulation that must give the same figures twice
//! ([`seed_this_thread`]; a paused-clock simulation runs on one thread).

use std::cell::RefCell;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

thread_local! {
    static SEEDED: RefCell<Option<StdRng>> = const { RefCell::new(None) };
}

/// Makes every jitter drawn on this thread come from `seed`.
pub fn seed_this_thread(seed: u64) {
    SEEDED.with(|s| *s.borrow_mut() = Some(StdRng::seed_from_u64(seed)));
}

/// A number in `low..=high` (milliseconds, usually).
pub fn between(low: u64, high: u64) -> u64 {
    let (low, high) = (low.min(high), low.max(high));
    SEEDED.with(|s| match s.borrow_mut().as_mut() {
        Some(rng) => rng.random_range(low..=high),
        None => rand::rng().random_range(low..=high),
    })
}

/// Full jitter over the upper half of `d`: somewhere in `d/2..=d`.
pub fn upper_half(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(between(ms / 2, ms.max(1)))
}

/// `d` give or take a fifth.
pub fn about(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(between(ms * 4 / 5, ms * 6 / 5 + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_draws_and_bounds_hold() {
        seed_this_thread(7);
        let a: Vec<u64> = (0..20).map(|_| between(10, 1000)).collect();
        seed_this_thread(7);
        let b: Vec<u64> = (0..20).map(|_| between(10, 1000)).collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|x| (10..=1000).contains(x)));
        let d = upper_half(Duration::from_millis(400));
        assert!(d >= Duration::from_millis(200) && d <= Duration::from_millis(400));
        let d = about(Duration::from_secs(10));
        assert!(d >= Duration::from_secs(8) && d <= Duration::from_millis(12_001));
    }
}
