//! The offline optimum for deadline misses: earliest deadline first over the same deadlines
//! and capacity.
//!
//! Every opt-in is due at time 0 and needs one call that must *start* strictly before its last
//! send time `d_i`; `servers` calls run at once and each takes `service` seconds (capacity
//! `servers / service` calls per second). With equal call times and a common release time,
//! taking the jobs in deadline order and skipping those that can no longer start in time
//! maximises the number served, so its misses are the minimum any scheduler can achieve.

/// Minimum number of jobs that must expire (see the module doc). `deadlines` are seconds
/// from time 0, in any order.
pub fn min_expired(deadlines: &[f64], servers: usize, service: f64) -> usize {
    let mut sorted: Vec<f64> = deadlines.to_vec();
    sorted.sort_by(f64::total_cmp);
    let servers = servers.max(1);
    let mut served = 0usize;
    for d in sorted {
        // With equal call times, the k-th served call starts at ⌊k / servers⌋ × service.
        let start = (served / servers) as f64 * service;
        if start < d {
            served += 1;
        }
    }
    deadlines.len() - served
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_fits_with_enough_capacity() {
        assert_eq!(min_expired(&[1.0, 2.0, 3.0], 1, 0.5), 0);
    }

    #[test]
    fn late_jobs_are_skipped_not_waited_for() {
        // One server, one call per second: starts at 0, 1, 2… Deadlines 0.5, 0.5, 1.5, 2.5:
        // the second 0.5 cannot start before 0.5 (the first takes the slot at 0), the others can.
        assert_eq!(min_expired(&[2.5, 0.5, 1.5, 0.5], 1, 1.0), 1);
    }

    #[test]
    fn parallel_servers_multiply_capacity() {
        let deadlines = vec![1.0; 100];
        // 10 servers × 0.1 s calls: rounds start at 0, 0.1 … 0.9, ten rounds of ten.
        assert_eq!(min_expired(&deadlines, 10, 0.1), 0);
        // Half the servers: ten rounds of five before 1.0 s.
        assert_eq!(min_expired(&deadlines, 5, 0.1), 50);
    }
}
