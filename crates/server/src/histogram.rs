//! A latency histogram of relaxed atomics, for metrics: one bucket add, one
//! count add and one sum add per observation, no lock. Read (not quite
//! atomically as a whole, which a scrape tolerates) by the Prometheus
//! endpoint.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds in seconds: 50 µs to 5 s, roughly ×2.5 apart. A confirm
/// waits for an fsync, which is tens of µs on a fast SSD and tens of ms on
/// a slow disk.
pub const BOUNDS_SECONDS: [f64; 15] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Per bucket, not cumulative; the last is above every bound.
    buckets: [AtomicU64; BOUNDS_SECONDS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

/// A reading: sum in seconds, count, and (upper bound, count) per bucket,
/// `f64::MAX` for the last.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    pub sum_seconds: f64,
    pub count: u64,
    pub buckets: Vec<(f64, u64)>,
}

impl LatencyHistogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let bucket = BOUNDS_SECONDS.iter().position(|&bound| seconds <= bound).unwrap_or(BOUNDS_SECONDS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn read(&self) -> Reading {
        let bounds = BOUNDS_SECONDS.iter().copied().chain(std::iter::once(f64::MAX));
        let buckets: Vec<(f64, u64)> = bounds.zip(self.buckets.iter().map(|b| b.load(Ordering::Relaxed))).collect();
        // The buckets' total, so that `count` equals the +Inf bucket even
        // when an observation lands between the loads.
        let count = buckets.iter().map(|&(_, n)| n).sum();
        #[expect(clippy::cast_precision_loss, reason = "a metric: nanoseconds within f64's 52 bits for 52 days")]
        let sum_seconds = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        Reading { sum_seconds, count, buckets }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_first_bucket_that_holds_them() {
        let h = LatencyHistogram::default();
        h.observe(Duration::from_micros(40));
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_micros(101));
        h.observe(Duration::from_secs(9));
        let r = h.read();
        assert_eq!(r.count, 4);
        assert_eq!(r.buckets[0], (0.00005, 1));
        assert_eq!(r.buckets[1], (0.0001, 1), "a bound is inclusive, as Prometheus's le");
        assert_eq!(r.buckets[2], (0.00025, 1));
        assert_eq!(r.buckets.last(), Some(&(f64::MAX, 1)));
        assert!((r.sum_seconds - 9.000241).abs() < 1e-9, "{}", r.sum_seconds);
    }
}
