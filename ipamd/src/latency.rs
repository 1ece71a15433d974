//! Recent handler latencies, for introspection and the benchmark: what ipamd
//! itself spends on a call, apart from the transport and the client.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

const KEEP: usize = 65_536;

#[derive(Debug, Default)]
pub struct Recorder {
    samples: Mutex<VecDeque<u32>>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Percentiles {
    pub count: usize,
    pub p50_us: u32,
    pub p99_us: u32,
    pub max_us: u32,
}

impl Recorder {
    pub fn record(&self, d: Duration) {
        let us = d.as_micros().min(u32::MAX as u128) as u32;
        let mut s = self.samples.lock().expect("latency lock");
        if s.len() == KEEP {
            s.pop_front();
        }
        s.push_back(us);
    }

    /// Percentiles of the samples kept; `reset` starts a new window.
    pub fn percentiles(&self, reset: bool) -> Percentiles {
        let mut s = self.samples.lock().expect("latency lock");
        let mut v: Vec<u32> = s.iter().copied().collect();
        if reset {
            s.clear();
        }
        drop(s);
        if v.is_empty() {
            return Percentiles::default();
        }
        v.sort_unstable();
        let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        Percentiles {
            count: v.len(),
            p50_us: at(0.5),
            p99_us: at(0.99),
            max_us: *v.last().expect("non-empty"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_reset() {
        let r = Recorder::default();
        for us in 1..=100u64 {
            r.record(Duration::from_micros(us));
        }
        let p = r.percentiles(true);
        assert_eq!((p.count, p.p50_us, p.p99_us, p.max_us), (100, 51, 99, 100));
        assert_eq!(r.percentiles(false).count, 0);
    }
}
