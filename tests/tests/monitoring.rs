//! The monitoring artefacts of `deploy/` checked against the code and the README: every
//! metric the Grafana dashboard and the Prometheus rules use is in README's `### Metrics`
//! table, and `observability.rs` proves that every metric of that table is really exported
//! by the binaries after a demo flow; so a dashboard panel or an alert on a misspelt or
//! removed metric fails here instead of staying silent in production. Each alert carries the
//! labels and annotations the README promises, its runbook anchor exists, and
//! `rules_test.yml` has a firing and a silent case for it (`promtool test rules` runs them).

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::Value;

/// Prometheus' own series, not exported by loginconnect.
const PROMETHEUS_SERIES: &[&str] = &["up"];

fn root(path: &str) -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

fn yaml(path: &str) -> Value {
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&root(path)).unwrap_or_else(|e| panic!("{path} is YAML: {e}"));
    serde_json::to_value(doc).expect("as JSON")
}

/// The first column of README's `### Metrics` table (the one `observability.rs` checks).
fn documented_metrics() -> BTreeSet<String> {
    let readme = root("README.md");
    let section = readme
        .split("\n### Metrics\n")
        .nth(1)
        .and_then(|s| s.split("\n### ").next())
        .expect("README has a ### Metrics section");
    section
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| l.split('`').nth(1))
        .map(str::to_owned)
        .collect()
}

/// PromQL words that are neither metrics nor functions (functions are followed by `(`).
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
];

/// Removes every `open … close` span (label matchers, ranges, strings), keeping the rest.
fn strip_spans(expr: &str, open: char, close: char) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut depth = 0usize;
    for c in expr.chars() {
        if c == open && (open != close || depth == 0) {
            depth += 1;
        } else if c == close && depth > 0 {
            depth -= 1;
        } else if depth == 0 {
            out.push(c);
        }
    }
    out
}

/// The metric (and recording-rule) names a PromQL expression selects: identifiers that are
/// not inside label matchers, strings or ranges, not in a `by (…)`-style label list, not a
/// function call, not a keyword and not a Grafana variable.
fn selected_names(expr: &str) -> BTreeSet<String> {
    let no_strings = strip_spans(expr, '"', '"');
    let no_labels = strip_spans(&no_strings, '{', '}');
    let mut text = strip_spans(&no_labels, '[', ']');
    // Label lists: `by (a, b)`, `on (a)`, `group_left (a)`, …
    for kw in [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        let mut out = String::new();
        let mut rest = text.as_str();
        while let Some(i) = find_word(rest, kw) {
            out.push_str(&rest[..i]);
            let after = rest[i + kw.len()..].trim_start();
            rest = match after.strip_prefix('(') {
                Some(list) => list.split_once(')').map_or("", |(_, r)| r),
                None => after,
            };
        }
        out.push_str(rest);
        text = out;
    }
    let mut names = BTreeSet::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '$' {
            // A Grafana variable such as `$__rate_interval` or `$page_id`.
            i += 1;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_digit() {
            // A number, or a duration like 5m: skip the whole token.
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                i += 1;
            }
            continue;
        }
        if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let next = chars[i..].iter().find(|c| !c.is_whitespace());
            let is_call = next == Some(&'(');
            if !is_call && !KEYWORDS.contains(&word.to_ascii_lowercase().as_str()) {
                names.insert(word);
            }
            continue;
        }
        i += 1;
    }
    names
}

/// Byte offset of `word` standing alone (not part of a longer identifier) in `text`.
fn find_word(text: &str, word: &str) -> Option<usize> {
    let ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut from = 0;
    while let Some(pos) = text[from..].find(word) {
        let i = from + pos;
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        if !before.is_some_and(ident) && !after.is_some_and(ident) {
            return Some(i);
        }
        from = i + word.len();
    }
    None
}

/// Every `expr` of the dashboard's panels (rows nest panels too).
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        for panel in panels.as_array().into_iter().flatten() {
            let title = panel["title"].as_str().unwrap_or("?").to_owned();
            for target in panel["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = target["expr"].as_str() {
                    out.push((title.clone(), expr.to_owned()));
                }
            }
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// `(alert or record name, expr)` of every rule of `rules.yml`.
fn rules() -> Vec<Value> {
    let doc = yaml("deploy/prometheus/rules.yml");
    doc["groups"]
        .as_array()
        .expect("rules.yml has groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn recording_rules() -> BTreeSet<String> {
    rules()
        .iter()
        .filter_map(|r| r["record"].as_str().map(str::to_owned))
        .collect()
}

/// The names `expr` uses that README's table does not document (histogram series are
/// checked under their family name).
fn undocumented(
    expr: &str,
    documented: &BTreeSet<String>,
    recorded: &BTreeSet<String>,
) -> Vec<String> {
    selected_names(expr)
        .into_iter()
        .filter(|name| !recorded.contains(name) && !PROMETHEUS_SERIES.contains(&name.as_str()))
        .filter(|name| {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|f| documented.contains(*f))
                .unwrap_or(name);
            !documented.contains(family)
        })
        .collect()
}

#[test]
fn the_name_extraction_finds_metrics_and_only_metrics() {
    let expr = "sum by (page_id, stage) (rate(scheduler_terminal_total{state=\"expired\", \
                queue=~\"a_b.dlq\"}[$__rate_interval] offset 5m)) / on (page_id) group_left \
                clamp_min(max(loginconnect:x:max) > bool 0.5, 1e-9) \
                + histogram_quantile(0.99, sum by (le) (rate(ingest_confirm_latency_seconds_bucket[5m])))";
    let names: Vec<String> = selected_names(expr).into_iter().collect();
    assert_eq!(
        names,
        [
            "ingest_confirm_latency_seconds_bucket",
            "loginconnect:x:max",
            "scheduler_terminal_total"
        ]
    );
    // A name the README does not document is reported (the check can fail).
    let documented: BTreeSet<String> = ["scheduler_terminal_total".to_owned()].into();
    assert_eq!(
        undocumented(
            "sum(rate(scheduler_terminal_total[5m])) + not_a_metric_total",
            &documented,
            &BTreeSet::new()
        ),
        ["not_a_metric_total"]
    );
}

#[test]
fn dashboard_and_rules_use_only_documented_metrics() {
    let documented = documented_metrics();
    let recorded = recording_rules();
    let dashboard: Value =
        serde_json::from_str(&root("deploy/grafana/loginconnect.json")).expect("dashboard JSON");
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() >= 25, "the dashboard's queries: {exprs:?}");
    for (title, expr) in &exprs {
        used.extend(selected_names(expr));
        for name in undocumented(expr, &documented, &recorded) {
            problems.push(format!("dashboard panel {title:?}: {name}"));
        }
    }
    for rule in rules() {
        let name = rule["alert"].as_str().or(rule["record"].as_str());
        let expr = rule["expr"].as_str().expect("every rule has an expr");
        used.extend(selected_names(expr));
        for metric in undocumented(expr, &documented, &recorded) {
            problems.push(format!("rule {name:?}: {metric}"));
        }
    }
    assert!(
        problems.is_empty(),
        "metrics not in README's ### Metrics table (so not proven exported): {problems:#?}"
    );
    // The panels are there: each of these families is queried somewhere.
    for family in [
        "scheduler_optins_recorded_total",
        "scheduler_send_api_calls_total",
        "scheduler_optins_at_risk",
        "scheduler_deadline_slack_seconds_bucket",
        "scheduler_terminal_total",
        "scheduler_paused_pages",
        "scheduler_queue_messages_ready",
        "scheduler_queue_consumers",
        "outbox_lag_seconds",
        "ingest_confirm_latency_seconds_bucket",
        "ingest_http_requests_total",
        "funnel_optins_24h",
    ] {
        assert!(used.contains(family), "nothing shows {family}");
    }
}

#[test]
fn dashboard_is_provisionable() {
    let dashboard: Value =
        serde_json::from_str(&root("deploy/grafana/loginconnect.json")).expect("dashboard JSON");
    assert!(dashboard["schemaVersion"].as_u64() >= Some(36));
    assert_eq!(dashboard["uid"], "loginconnect");
    let vars = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("the dashboard has a {name} variable"))
    };
    let ds = var("DS_PROMETHEUS");
    assert_eq!(ds["type"], "datasource");
    assert!(var("page_id")["includeAll"].as_bool().unwrap_or(false));
    // The provisioned data source is the variable's default.
    let sources = yaml("deploy/grafana/provisioning/datasources/prometheus.yml");
    let uid = sources["datasources"][0]["uid"].as_str().expect("uid");
    assert_eq!(ds["current"]["value"], uid);
    // Every panel asks the variable's data source; per-page panels filter by $page_id.
    let mut per_page = 0;
    fn panels(v: &Value) -> Vec<&Value> {
        let mut out = Vec::new();
        for p in v.as_array().into_iter().flatten() {
            out.push(p);
            out.extend(panels(&p["panels"]));
        }
        out
    }
    let mut ids = BTreeSet::new();
    for panel in panels(&dashboard["panels"]) {
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "panel ids are unique"
        );
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${DS_PROMETHEUS}",
            "{}",
            panel["title"]
        );
        let exprs: Vec<&str> = panel["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["expr"].as_str())
            .collect();
        if exprs.iter().any(|e| e.contains("page_id")) {
            per_page += 1;
            assert!(
                exprs.iter().all(|e| e.contains("$page_id")),
                "{} is per page but ignores $page_id",
                panel["title"]
            );
        }
    }
    assert!(per_page >= 5, "per-page panels: {per_page}");
}

/// The heading anchors of README (GitHub's: lower case, spaces to `-`, punctuation dropped).
fn readme_anchors() -> BTreeSet<String> {
    root("README.md")
        .lines()
        .filter_map(|l| l.strip_prefix('#'))
        .map(|h| {
            h.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn every_alert_is_documented_labelled_and_unit_tested() {
    let anchors = readme_anchors();
    let tests = yaml("deploy/prometheus/rules_test.yml");
    let mut firing = BTreeSet::new();
    let mut silent = BTreeSet::new();
    for case in tests["tests"].as_array().expect("tests") {
        for t in case["alert_rule_test"].as_array().into_iter().flatten() {
            let name = t["alertname"].as_str().expect("alertname").to_owned();
            if t["exp_alerts"].as_array().is_some_and(|a| !a.is_empty()) {
                firing.insert(name);
            } else {
                silent.insert(name);
            }
        }
    }
    let alerts: Vec<Value> = rules()
        .into_iter()
        .filter(|r| r.get("alert").is_some())
        .collect();
    assert!(alerts.len() >= 10, "alerts: {}", alerts.len());
    for rule in &alerts {
        let name = rule["alert"].as_str().expect("name");
        let severity = rule["labels"]["severity"].as_str();
        assert!(
            matches!(severity, Some("critical" | "warning")),
            "{name}: severity critical or warning, not {severity:?}"
        );
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                rule["annotations"][key].is_string(),
                "{name} has annotation {key}"
            );
        }
        let url = rule["annotations"]["runbook_url"].as_str().unwrap_or("");
        let anchor = url
            .strip_prefix("README.md#")
            .unwrap_or_else(|| panic!("{name}: runbook_url {url} points into README.md"));
        assert!(
            anchors.contains(anchor),
            "{name}: README has no heading for #{anchor}"
        );
        assert!(
            firing.contains(name),
            "{name}: no firing case in rules_test.yml"
        );
        assert!(
            silent.contains(name),
            "{name}: no silent case in rules_test.yml"
        );
    }
}

/// `promtool test rules` (Debian's `prometheus` package; `scripts/services.sh` installs it
/// where it can). `.ci/run` runs it too, this keeps `scripts/test` honest on its own.
#[test]
fn promtool_checks_and_unit_tests_pass() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    for args in [
        &["check", "config", "prometheus.yml"][..],
        &["test", "rules", "rules_test.yml"][..],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("promtool cannot run ({e}): apt-get install prometheus, or scripts/services.sh as root")
            });
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
