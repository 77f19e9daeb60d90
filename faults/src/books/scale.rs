//! The scale-out checks (issue 13): each page's send budget at Graph, small pages against a
//! big page's backlog, and a replaced token taken up by every replica. Each runs only when
//! its data exists: a configured `PAGE_RATE_LIMIT`, a skewed load, the token fault.

use std::collections::HashMap;

use lc_testkit::fake_graph::RecordedCall;
use time::{Duration, OffsetDateTime};

use super::counts::timeline_of;
use super::{Check, Context, Key, Snapshot};

/// A big-page opt-in that waited longer than this for its first call shows a backlog.
const BACKLOG_WAIT: Duration = Duration::seconds(5);
/// After the new token is in place, every replica has it within this (they look every
/// second; a call already past its last checks may still carry the old one).
const TOKEN_GRACE: Duration = Duration::seconds(3);
/// After the new token is in place, the page's waiting opt-ins are called again within this
/// (a pause written by a replica that still had the old token is lifted by the next sync of
/// one with the new token, every 10 s at the latest).
const RECOVERY_BOUND: Duration = Duration::seconds(15);

fn secs(d: Duration) -> f64 {
    d.as_seconds_f64()
}

/// The most calls in any window of `width` (half-open, starting at a call), and the index of
/// the window's first call. `times` must be sorted.
fn densest(times: &[OffsetDateTime], width: Duration) -> (usize, usize) {
    let mut best = (0, 0);
    let mut end = 0;
    for start in 0..times.len() {
        end = end.max(start);
        while end < times.len() && times[end] - times[start] < width {
            end += 1;
        }
        if end - start > best.0 {
            best = (end - start, start);
        }
    }
    best
}

/// Send API calls per page, in arrival order.
fn calls_by_page<'c>(sends: &[&'c RecordedCall]) -> HashMap<&'c str, Vec<&'c RecordedCall>> {
    let mut by_page: HashMap<&str, Vec<&RecordedCall>> = HashMap::new();
    for c in sends {
        by_page.entry(c.page_id.as_str()).or_default().push(c);
    }
    for calls in by_page.values_mut() {
        calls.sort_by_key(|c| c.at);
    }
    by_page
}

/// (a) Per page, the Send API calls that arrived at Graph in any one-second window (sliding)
/// stay within `PAGE_RATE_LIMIT`, whichever replica made them. With a skewed load, the big
/// page must also have come near its limit, or the run proved nothing about it.
pub(super) fn page_rate(ctx: &Context<'_>, sends: &[&RecordedCall]) -> Option<Check> {
    let limit = ctx.page_rate_limit?;
    let rel = |t: OffsetDateTime| secs(t - ctx.run_start);
    let by_page = calls_by_page(sends);
    let mut problems = Vec::new();
    let mut peaks: Vec<(usize, &str)> = Vec::new();
    for (page, calls) in &by_page {
        let times: Vec<OffsetDateTime> = calls.iter().map(|c| c.at).collect();
        let (n, first) = densest(&times, Duration::SECOND);
        peaks.push((n, page));
        if n > usize::try_from(limit).unwrap_or(usize::MAX) {
            let window: Vec<String> = calls[first..first + n]
                .iter()
                .map(|c| format!("+{:.3}", secs(c.at - calls[first].at)))
                .collect();
            problems.push(format!(
                "page {page}: {n} calls in the second from {:.3}s (limit {limit}): {}",
                rel(calls[first].at),
                window.join(" ")
            ));
        }
    }
    peaks.sort_unstable_by(|a, b| b.cmp(a));
    let mut detail = format!(
        "PAGE_RATE_LIMIT {limit}/s; {} send calls on {} pages; peak in any 1 s: {}",
        sends.len(),
        by_page.len(),
        peaks
            .first()
            .map_or("-".into(), |(n, page)| format!("{n} (page {page})"))
    );
    if let Some(big) = ctx.big_page {
        let calls = by_page.get(big).cloned().unwrap_or_default();
        let times: Vec<OffsetDateTime> = calls.iter().map(|c| c.at).collect();
        let (peak, _) = densest(&times, Duration::SECOND);
        let (ten, _) = densest(&times, Duration::seconds(10));
        let small_peak = peaks
            .iter()
            .find(|(_, page)| *page != big)
            .map_or(0, |(n, _)| *n);
        detail.push_str(&format!(
            "; big page {big}: {} calls, peak {peak} in 1 s, {:.1}/s over its busiest 10 s; busiest small page: {small_peak} in 1 s",
            calls.len(),
            ten as f64 / 10.0
        ));
        if (peak as f64) < 0.8 * f64::from(limit) {
            problems.push(format!(
                "the big page never came near its limit (peak {peak} in 1 s, limit {limit}): the run proves nothing about the limit"
            ));
        }
    }
    Some(Check::new(
        "per page, at most PAGE_RATE_LIMIT send calls in any one second at Graph",
        problems,
        detail,
    ))
}

/// (b) While the big page has a backlog, a small page's opt-in waits little: from its row
/// being recorded to its first Send API call, at most `ctx.small_wait_bound`. A small-page
/// opt-in that expired uncalled although it was sendable for longer than the bound counts
/// as an endless wait. The page of the token fault is left out if it is a small one (its
/// opt-ins wait for the new token by design).
pub(super) fn small_page_wait(
    ctx: &Context<'_>,
    s: &Snapshot,
    all_calls: &HashMap<Key, Vec<&RecordedCall>>,
) -> Option<Check> {
    let big = ctx.big_page?;
    let bound = ctx.small_wait_bound;
    let rel = |t: OffsetDateTime| secs(t - ctx.run_start);
    let token_page = ctx.timeline.token_change.as_ref().map(|t| t.page.as_str());
    let first_call = |key: &Key| {
        all_calls
            .get(key)
            .and_then(|calls| calls.iter().map(|c| c.at).min())
    };
    // The big page's backlog: from the first of its opt-ins that waited long to the last
    // first call of those.
    let mut big_longest = Duration::ZERO;
    let mut backlog: Option<(OffsetDateTime, OffsetDateTime)> = None;
    for (key, row) in s.optins.iter().filter(|(k, _)| k.0 == big) {
        let Some(at) = first_call(key) else { continue };
        let wait = at - row.created_at;
        big_longest = big_longest.max(wait);
        if wait > BACKLOG_WAIT {
            backlog = Some(match backlog {
                None => (row.created_at, at),
                Some((from, to)) => (from.min(row.created_at), to.max(at)),
            });
        }
    }
    let mut problems = Vec::new();
    let mut waits: Vec<(Duration, &Key)> = Vec::new();
    let mut during_backlog = 0usize;
    for (key, row) in &s.optins {
        let small =
            key.0 != big && Some(key.0.as_str()) != token_page && ctx.known_pages.contains(&key.0);
        if !small {
            continue;
        }
        match first_call(key) {
            Some(at) => {
                let wait = at - row.created_at;
                if backlog.is_some_and(|(from, to)| row.created_at >= from && row.created_at <= to)
                {
                    during_backlog += 1;
                }
                waits.push((wait, key));
                if wait > bound {
                    problems.push(format!(
                        "{} of small page {} waited {:.1}s (recorded at {:.1}s): {}",
                        key.1,
                        key.0,
                        secs(wait),
                        rel(row.created_at),
                        timeline_of(ctx, s, key, all_calls)
                    ));
                }
            }
            None => {
                let sendable_for = row.deadline - ctx.margin - row.created_at;
                if row.state == "expired" && sendable_for > bound {
                    problems.push(format!(
                        "{} of small page {} expired without a call although sendable for {:.1}s after it was recorded at {:.1}s",
                        key.1,
                        key.0,
                        secs(sendable_for),
                        rel(row.created_at)
                    ));
                }
            }
        }
    }
    waits.sort_unstable_by_key(|(w, _)| *w);
    let pct = |p: f64| {
        let i = ((waits.len() as f64 - 1.0) * p).round().max(0.0) as usize;
        waits.get(i).map_or(0.0, |(w, _)| secs(*w))
    };
    let longest = waits.last().map_or("-".into(), |(w, key)| {
        format!("{:.2}s ({} of page {})", secs(*w), key.1, key.0)
    });
    let backlog_text = match backlog {
        Some((from, to)) => format!("{:.0}s to {:.0}s", rel(from), rel(to)),
        None => "none".into(),
    };
    if backlog.is_none() || during_backlog == 0 {
        problems.push(format!(
            "no small-page opt-in was recorded while the big page had a backlog (its longest wait {:.1}s): nothing to compare",
            secs(big_longest)
        ));
    }
    Some(Check::new(
        "small pages wait little while the big page has a backlog",
        problems,
        format!(
            "bound {:.0}s; {} small-page opt-ins called ({during_backlog} recorded during the big page's backlog, {backlog_text}); wait from row to first call: median {:.2}s, p99 {:.2}s, longest {longest}; big page's longest wait {:.1}s{}",
            secs(bound),
            waits.len(),
            pct(0.5),
            pct(0.99),
            secs(big_longest),
            token_page
                .filter(|p| *p != big)
                .map_or(String::new(), |p| format!(
                    "; page {p} left out (token fault)"
                ))
        ),
    ))
}

/// (e) After the token fault: no call carries the old token once every replica had time to
/// take the new one, and the page is called with the new token soon.
pub(super) fn token_taken_up(
    ctx: &Context<'_>,
    s: &Snapshot,
    sends: &[&RecordedCall],
) -> Option<Check> {
    let change = ctx.timeline.token_change.as_ref()?;
    let fixed_at = change.fixed_at?;
    let rel = |t: OffsetDateTime| secs(t - ctx.run_start);
    let page_calls: Vec<&RecordedCall> = sends
        .iter()
        .copied()
        .filter(|c| c.page_id == change.page)
        .collect();
    let old_header = format!("Bearer {}", change.old_token);
    let carries_old = |c: &RecordedCall| c.authorization.as_deref() == Some(old_header.as_str());
    let refused: Vec<&&RecordedCall> = page_calls
        .iter()
        .filter(|c| c.outcome.starts_with("error:190"))
        .collect();
    let new_header = format!("Bearer {}", change.new_token);
    let first_new = page_calls
        .iter()
        .find(|c| c.authorization.as_deref() == Some(new_header.as_str()))
        .map_or("none".into(), |c| format!("{:.2}s", secs(c.at - fixed_at)));
    let old_after_break = page_calls
        .iter()
        .filter(|c| c.at >= change.broken_at && carries_old(c))
        .count();
    let mut problems: Vec<String> = page_calls
        .iter()
        .filter(|c| c.at > fixed_at + TOKEN_GRACE && carries_old(c))
        .map(|c| {
            format!(
                "call for {} at {:.2}s carried the old token {:.2}s after the new one was in place",
                c.login_id.as_deref().unwrap_or("?"),
                rel(c.at),
                secs(c.at - fixed_at)
            )
        })
        .collect();
    // Opt-ins of the page recorded before the fix: the first call Graph accepted after it.
    let resumed = page_calls
        .iter()
        .filter(|c| c.at >= fixed_at && c.outcome == "ok")
        .filter(|c| {
            let key = (c.page_id.clone(), c.login_id.clone().unwrap_or_default());
            s.optins.get(&key).is_some_and(|r| r.created_at < fixed_at)
        })
        .map(|c| c.at)
        .min();
    // The bound is on the page being called again with the new token: when Graph first
    // *accepts* one of its waiting opt-ins also depends on the run's transient failures and
    // on app-wide throttles (code 4) elsewhere in the run, so that is reported, not judged.
    let first_new_at = page_calls
        .iter()
        .filter(|c| c.at >= fixed_at)
        .find(|c| c.authorization.as_deref() == Some(new_header.as_str()))
        .map(|c| c.at);
    let waiting = page_calls.iter().any(|c| {
        let key = (c.page_id.clone(), c.login_id.clone().unwrap_or_default());
        s.optins.get(&key).is_some_and(|r| r.created_at < fixed_at)
    });
    match first_new_at {
        Some(at) if at - fixed_at > RECOVERY_BOUND => problems.push(format!(
            "the page was called with the new token only {:.1}s after it was in place (bound {:.0}s)",
            secs(at - fixed_at),
            secs(RECOVERY_BOUND)
        )),
        None if waiting => problems.push(
            "the page was never called with the new token although opt-ins were waiting".into(),
        ),
        _ => {}
    }
    let recovery = match resumed {
        Some(at) => format!("{:.2}s", secs(at - fixed_at)),
        None => "- (no waiting opt-in accepted)".into(),
    };
    Some(Check::new(
        "a replaced token is taken up by every replica",
        problems,
        format!(
            "page {} broken at {:.1}s, replaced at {:.1}s by {}; {old_after_break} calls with the old token after the break, {} refused with code 190 (first at {}); first call with the new token {first_new} after the replacement, first accepted call of a waiting opt-in {recovery} after it; grace {:.0}s, bound {:.0}s",
            change.page,
            rel(change.broken_at),
            rel(fixed_at),
            change.how,
            refused.len(),
            refused
                .first()
                .map_or("-".into(), |c| format!("{:.2}s", rel(c.at))),
            secs(TOKEN_GRACE),
            secs(RECOVERY_BOUND)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn densest_counts_a_half_open_sliding_window() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let ms = |m: i64| t0 + Duration::milliseconds(m);
        let times = vec![
            ms(0),
            ms(400),
            ms(999),
            ms(1000),
            ms(1500),
            ms(1999),
            ms(2100),
        ];
        // [0, 1000) holds 3; [400, 1400) holds 3; [999, 1999) holds 3 (1999 is out);
        // [1000, 2000) holds 3.
        assert_eq!(densest(&times, Duration::SECOND).0, 3);
        let burst = vec![ms(0), ms(1), ms(2), ms(5000)];
        assert_eq!(densest(&burst, Duration::SECOND), (3, 0));
        assert_eq!(densest(&[], Duration::SECOND), (0, 0));
    }
}
