//! Is a series flat or growing? A least-squares line through the samples, its slope's 95 %
//! confidence interval from the slope's standard error (Student's t with n − 2 degrees of
//! freedom), and a verdict that needs both statistics and size: a series is growing only when
//! the interval excludes zero **and** the fitted growth over the run exceeds a small share of
//! its level, so a tiny but very regular creep (a few kB on 30 MB) is not called a leak and a
//! large but noisy swing is not either.

use std::fmt;

/// The verdict on one series.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No significant or no sizeable change.
    Flat,
    /// Significantly and sizeably up.
    Growing,
    /// Significantly and sizeably down (e.g. a backlog draining after warm-up).
    Falling,
    /// Fewer than three samples: no interval can be computed.
    TooFewSamples,
}

impl Verdict {
    /// Its word in the report.
    pub fn word(self) -> &'static str {
        match self {
            Self::Flat => "flat",
            Self::Growing => "growing",
            Self::Falling => "falling",
            Self::TooFewSamples => "too few samples",
        }
    }
}

/// A least-squares fit of `y` against `x` and what it says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Trend {
    /// Samples fitted.
    pub n: usize,
    /// Slope, units of `y` per unit of `x` (per minute in the soak).
    pub slope: f64,
    /// Half-width of the slope's 95 % confidence interval (`t × SE`); infinite when n < 3.
    pub ci95: f64,
    /// Mean of `y`.
    pub mean: f64,
    /// Fitted change over the samples' span: `slope × (x_last − x_first)`.
    pub change: f64,
    /// The verdict.
    pub verdict: Verdict,
}

impl fmt::Display for Trend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: slope {} ± {} per minute (95 % CI, n = {}), change over the fit {} on a mean of {}",
            self.verdict.word(),
            sig(self.slope),
            sig(self.ci95),
            self.n,
            sig(self.change),
            sig(self.mean)
        )
    }
}

/// Fits `points` (x, y) and judges them: growing or falling when the 95 % interval of the
/// slope excludes zero and `|change|` exceeds `relative × max(|mean|, floor)`. `floor` is the
/// size below which a series counts as near zero (a queue of a few messages), so a rise from
/// 0 to 3 is not "300 %".
pub fn fit(points: &[(f64, f64)], relative: f64, floor: f64) -> Trend {
    let n = points.len();
    let nf = n as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / nf.max(1.0);
    let mean = points.iter().map(|p| p.1).sum::<f64>() / nf.max(1.0);
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean)).sum();
    let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
    let span = match (points.first(), points.last()) {
        (Some(a), Some(b)) => b.0 - a.0,
        _ => 0.0,
    };
    let change = slope * span;
    if n < 3 || sxx <= 0.0 {
        return Trend {
            n,
            slope,
            ci95: f64::INFINITY,
            mean,
            change,
            verdict: Verdict::TooFewSamples,
        };
    }
    let intercept = mean - slope * mean_x;
    let ssr: f64 = points
        .iter()
        .map(|p| (p.1 - (intercept + slope * p.0)).powi(2))
        .sum();
    let se = (ssr / (nf - 2.0)).sqrt() / sxx.sqrt();
    let ci95 = t975(n - 2) * se;
    let significant = slope.abs() > ci95;
    let sizeable = change.abs() > relative * mean.abs().max(floor);
    let verdict = match (significant && sizeable, slope > 0.0) {
        (false, _) => Verdict::Flat,
        (true, true) => Verdict::Growing,
        (true, false) => Verdict::Falling,
    };
    Trend {
        n,
        slope,
        ci95,
        mean,
        change,
        verdict,
    }
}

/// The 97.5th percentile of Student's t with `df` degrees of freedom (two-sided 95 %):
/// tabulated to 30, then the Cornish–Fisher expansion `z + (z³ + z) / 4df` (within 0.002).
pub fn t975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
        2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
        2.052, 2.048, 2.045, 2.042,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => TABLE[df - 1],
        _ => {
            let z = 1.959_964;
            z + (z * z * z + z) / (4.0 * df as f64)
        }
    }
}

/// Four significant digits, for the verdict lines.
fn sig(v: f64) -> String {
    if !v.is_finite() {
        return "∞".into();
    }
    if v == 0.0 {
        return "0".into();
    }
    let digits = (3 - v.abs().log10().floor() as i32).clamp(0, 6) as usize;
    format!("{v:.digits$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(n: usize, a: f64, b: f64, noise: impl Fn(usize) -> f64) -> Vec<(f64, f64)> {
        (0..n)
            .map(|i| (i as f64, a + b * i as f64 + noise(i)))
            .collect()
    }

    #[test]
    fn an_exact_line_has_its_slope_and_no_uncertainty() {
        let t = fit(&line(10, 100.0, 2.0, |_| 0.0), 0.05, 1.0);
        assert!((t.slope - 2.0).abs() < 1e-12, "{t}");
        assert!(t.ci95 < 1e-9, "{t}");
        assert!((t.change - 18.0).abs() < 1e-9);
        assert!((t.mean - 109.0).abs() < 1e-9);
        assert_eq!(t.verdict, Verdict::Growing, "{t}");
    }

    #[test]
    fn the_interval_matches_a_hand_computed_fit() {
        // x = 0..4, y = 1, 3, 2, 5, 4: Sxy = 8, Sxx = 10, slope 0.8, intercept 1.4,
        // residuals −0.4 0.8 −1.0 1.2 −0.6, SSR 3.6, s² = 1.2, SE = √0.12, t(3) = 3.182.
        let pts = [(0.0, 1.0), (1.0, 3.0), (2.0, 2.0), (3.0, 5.0), (4.0, 4.0)];
        let t = fit(&pts, 0.05, 1.0);
        assert!((t.slope - 0.8).abs() < 1e-12);
        assert!((t.ci95 - 3.182 * 0.12f64.sqrt()).abs() < 1e-9, "{t}");
        // 0.8 < 1.102: the interval includes zero.
        assert_eq!(t.verdict, Verdict::Flat, "{t}");
    }

    #[test]
    fn noise_around_a_level_is_flat() {
        let wobble = |i: usize| if i.is_multiple_of(2) { 3.0 } else { -3.0 };
        let t = fit(&line(30, 500.0, 0.0, wobble), 0.05, 1.0);
        assert_eq!(t.verdict, Verdict::Flat, "{t}");
        assert!(t.slope.abs() <= t.ci95, "{t}");
    }

    #[test]
    fn a_significant_but_tiny_creep_is_flat() {
        // 30 MB creeping 1 kB a minute, perfectly regularly: significant, not sizeable.
        let t = fit(&line(30, 30_000.0, 1.0, |_| 0.0), 0.05, 1.0);
        assert!(t.slope > t.ci95);
        assert_eq!(t.verdict, Verdict::Flat, "{t}");
    }

    #[test]
    fn a_leak_through_noise_is_growing_and_a_drain_is_falling() {
        let wobble = |i: usize| if i.is_multiple_of(2) { 50.0 } else { -50.0 };
        let leak = fit(&line(30, 30_000.0, 100.0, wobble), 0.05, 1.0);
        assert_eq!(leak.verdict, Verdict::Growing, "{leak}");
        assert!((leak.slope - 100.0).abs() < 10.0, "{leak}");
        let drain = fit(&line(10, 1000.0, -100.0, |_| 0.0), 0.05, 1.0);
        assert_eq!(drain.verdict, Verdict::Falling, "{drain}");
    }

    #[test]
    fn the_floor_keeps_near_zero_series_flat() {
        // A queue going 0, 1, 2, 3 messages: significant and twice its mean, but a rise of 3
        // is not 5 % of a 100-message floor.
        let t = fit(&line(4, 0.0, 1.0, |_| 0.0), 0.05, 100.0);
        assert_eq!(t.verdict, Verdict::Flat, "{t}");
        let t = fit(&line(4, 0.0, 1.0, |_| 0.0), 0.05, 10.0);
        assert_eq!(t.verdict, Verdict::Growing, "3 > 5 % of a floor of 10: {t}");
    }

    #[test]
    fn too_few_samples_say_so() {
        assert_eq!(fit(&[], 0.05, 1.0).verdict, Verdict::TooFewSamples);
        assert_eq!(
            fit(&[(0.0, 1.0), (1.0, 2.0)], 0.05, 1.0).verdict,
            Verdict::TooFewSamples
        );
        assert_eq!(
            fit(&[(1.0, 1.0), (1.0, 2.0), (1.0, 3.0)], 0.05, 1.0).verdict,
            Verdict::TooFewSamples,
            "no spread in x"
        );
    }

    #[test]
    fn t_quantiles() {
        assert!((t975(1) - 12.706).abs() < 1e-9);
        assert!((t975(30) - 2.042).abs() < 1e-9);
        assert!((t975(60) - 2.000).abs() < 0.002, "{}", t975(60));
        assert!((t975(120) - 1.980).abs() < 0.002, "{}", t975(120));
        assert!(t975(0).is_infinite());
    }
}
