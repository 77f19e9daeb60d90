//! HDR latency histograms (microsecond resolution) and the figures read from them.

use std::time::Duration;

use hdrhistogram::Histogram;

use crate::report::Report;

/// A latency histogram from 1 µs to one hour with three significant digits.
#[derive(Debug, Clone)]
pub struct Latency {
    hist: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    /// An empty histogram.
    pub fn new() -> Self {
        // Constant bounds that `new_with_bounds` accepts (low ≥ 1, high ≥ 2 × low, sigfig ≤ 5).
        let hist = Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid constant bounds");
        Self { hist }
    }

    /// Records one latency (saturating at the upper bound).
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        self.hist.saturating_record(us);
    }

    /// Records a latency given in (possibly negative, clock-skewed) seconds; negatives count
    /// as zero.
    pub fn record_secs(&mut self, secs: f64) {
        self.record(Duration::from_secs_f64(secs.max(0.0)));
    }

    /// Adds another histogram's samples.
    pub fn merge(&mut self, other: &Latency) {
        // Both have the same bounds, so adding cannot fail; saturate otherwise.
        if self.hist.add(&other.hist).is_err() {
            for v in other.hist.iter_recorded() {
                self.hist
                    .saturating_record_n(v.value_iterated_to(), v.count_at_value());
            }
        }
    }

    /// Number of samples.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The `q` quantile (0..=1) in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    /// Largest sample in milliseconds.
    pub fn max_ms(&self) -> f64 {
        self.hist.max() as f64 / 1000.0
    }

    /// Adds `<prefix>_p50_ms`, `_p90_ms`, `_p99_ms`, `_max_ms` to `report` (nothing when empty).
    pub fn report(&self, report: &mut Report, prefix: &str, what: &str) {
        if self.count() == 0 {
            report.note(format!("{prefix}: no latency samples"));
            return;
        }
        for (label, q) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99)] {
            report.add(
                format!("{prefix}_{label}_ms"),
                round3(self.quantile_ms(q)),
                "ms",
                format!("{what}, {label}"),
            );
        }
        report.add(
            format!("{prefix}_max_ms"),
            round3(self.max_ms()),
            "ms",
            format!("{what}, max"),
        );
    }
}

/// Rounds to three decimals (figures are printed, not computed with).
pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_out_in_milliseconds() {
        let mut h = Latency::new();
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        assert_eq!(h.count(), 100);
        assert!(
            (h.quantile_ms(0.5) - 50.0).abs() < 0.1,
            "{}",
            h.quantile_ms(0.5)
        );
        assert!((h.max_ms() - 100.0).abs() < 0.1);
        let mut other = Latency::new();
        other.record_secs(-1.0);
        h.merge(&other);
        assert_eq!(h.count(), 101);
    }
}
