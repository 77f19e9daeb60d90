//! The harness works end to end: the smallest scheduler suite (50 opt-ins through the real
//! scheduler, 50 rows through the bare database loop, a few seconds of skewed pages) produces
//! its figures. No timing is
//! asserted: these are measurements on a shared machine.

use lc_bench::scheduler::{SchedulerParams, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tiniest_scheduler_suite_produces_figures() {
    let report = run(&SchedulerParams::tiny(), true)
        .await
        .expect("scheduler suite runs");
    for name in [
        "scheduler_0ms_sends_per_s",
        "scheduler_0ms_optin_to_send_p99_ms",
        "scheduler_db_ceiling_rows_per_s",
        "scheduler_vs_db",
        "scheduler_peak_rss_mb",
        "skew_sends_per_s",
        "skew_peak_calls_in_1s",
        "skew_small_baseline_p99_ms",
        "skew_small_backlog_p99_ms",
    ] {
        let value = report
            .get(name)
            .unwrap_or_else(|| panic!("figure {name} missing:\n{}", report.render()));
        assert!(value.is_finite() && value > 0.0, "{name} = {value}");
    }
    let rendered = report.render();
    assert!(rendered.contains("in-process"), "{rendered}");
    assert!(rendered.contains("\nscheduler_vs_db="), "{rendered}");
    assert!(rendered.contains("machine_cores="), "{rendered}");
    let json = report.to_json();
    assert!(json["figures"]["scheduler_vs_db"].is_number(), "{json}");
    assert!(
        json["machine"]["postgres_version"]
            .as_str()
            .is_some_and(|v| v.contains("PostgreSQL")),
        "{json}"
    );
}
