//! What a suite produces: named figures, notes and attachments, printed as a table and as
//! `name=value` lines, and written as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::machine::Machine;

/// One measured number.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Machine-readable name, `<suite>_<what>` in snake case; unique within a run.
    pub name: String,
    /// The value.
    pub value: f64,
    /// Unit: `events/s`, `ms`, `MB`, `ratio`, `count`…
    pub unit: &'static str,
    /// What it is, in a few words (for the table).
    pub what: String,
}

/// A target of the issue, checked against a figure (reported, never asserted).
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    /// What the target says, e.g. `ingest ≥ 0.8 × broker ceiling`.
    pub text: String,
    /// The figure it is checked against.
    pub figure: String,
    /// The measured value.
    pub measured: f64,
    /// Whether the measurement meets the target.
    pub met: bool,
}

/// Everything one suite measured.
#[derive(Debug, Clone)]
pub struct Report {
    /// Suite name (`ingest`, `scheduler`, `correlator`, `scale`).
    pub suite: String,
    /// Whether this was a `--quick` run.
    pub quick: bool,
    /// True when the services ran inside the bench process; false in process mode.
    pub in_process: bool,
    /// The machine and its load at the start and end of the suite.
    pub machine: Machine,
    /// The figures, in the order they were measured.
    pub figures: Vec<Figure>,
    /// Targets checked against figures.
    pub targets: Vec<Target>,
    /// Free-text remarks (set-up, caveats).
    pub notes: Vec<String>,
    /// Longer texts kept in the JSON only (e.g. `EXPLAIN` plans).
    pub attachments: BTreeMap<String, String>,
}

impl Report {
    /// An empty report of `suite`, recording the machine now.
    pub async fn new(suite: &str, quick: bool) -> Self {
        Self {
            suite: suite.to_owned(),
            quick,
            in_process: true,
            machine: Machine::probe().await,
            figures: Vec::new(),
            targets: Vec::new(),
            notes: vec![format!(
                "in-process: the services, the load generator and the fake Graph run in this one \
                 process on a {}-core machine shared with other work; peak RSS is one figure for all of them",
                crate::machine::cores()
            )],
            attachments: BTreeMap::new(),
        }
    }

    /// Adds a figure.
    pub fn add(
        &mut self,
        name: impl Into<String>,
        value: f64,
        unit: &'static str,
        what: impl Into<String>,
    ) {
        self.figures.push(Figure {
            name: name.into(),
            value,
            unit,
            what: what.into(),
        });
    }

    /// Marks the report as measuring services that ran as their own processes, replacing
    /// the in-process remark with `how`.
    pub fn out_of_process(&mut self, how: impl Into<String>) {
        self.in_process = false;
        if let Some(first) = self.notes.first_mut() {
            *first = how.into();
        }
    }

    /// Adds a remark.
    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// Keeps a long text (JSON only).
    pub fn attach(&mut self, name: impl Into<String>, text: impl Into<String>) {
        self.attachments.insert(name.into(), text.into());
    }

    /// The value of a figure, if measured.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.figures
            .iter()
            .find(|f| f.name == name)
            .map(|f| f.value)
    }

    /// Records a target: `figure` must be at least `min` (or at most, with `at_most`).
    pub fn target(&mut self, text: &str, figure: &str, bound: f64, at_most: bool) {
        if let Some(measured) = self.get(figure) {
            let met = if at_most {
                measured <= bound
            } else {
                measured >= bound
            };
            self.targets.push(Target {
                text: text.to_owned(),
                figure: figure.to_owned(),
                measured,
                met,
            });
        }
    }

    /// Appends another report's figures, targets, notes and attachments (for `all`).
    pub fn absorb(&mut self, other: Report) {
        self.figures.extend(other.figures);
        self.targets.extend(other.targets);
        self.notes.extend(other.notes.into_iter().skip(1));
        self.attachments.extend(other.attachments);
        self.machine.load_end = other.machine.load_end;
    }

    /// Records the end-of-suite machine state (load average, peak RSS).
    pub fn finish(&mut self) {
        self.machine.load_end = crate::machine::loadavg();
        let peak = crate::machine::peak_rss_kb();
        let what = if self.in_process {
            "peak RSS of the whole process during the suite (VmHWM; services + load generator + fake Graph)"
        } else {
            "peak RSS of the bench process (VmHWM; load generator + Graph stand-in, not the services)"
        };
        self.add(
            format!("{}_peak_rss_mb", self.suite),
            peak as f64 / 1024.0,
            "MB",
            what,
        );
    }

    /// The human-readable table followed by the `name=value` lines.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let m = &self.machine;
        let _ = writeln!(
            out,
            "== {} ({}, {}) ==",
            self.suite,
            if self.quick { "quick" } else { "full" },
            if self.in_process {
                "in-process"
            } else {
                "each service its own process"
            }
        );
        let _ = writeln!(
            out,
            "machine: {} cores ({}), {} MB RAM, load {} → {}, RabbitMQ {}, {} (autovacuum {})",
            m.cores,
            m.cpu_model,
            m.ram_mb,
            m.load_start,
            m.load_end,
            m.rabbitmq_version,
            m.postgres_version,
            m.postgres_autovacuum
        );
        let width = self
            .figures
            .iter()
            .map(|f| f.name.len())
            .max()
            .unwrap_or(10);
        for f in &self.figures {
            let _ = writeln!(
                out,
                "  {:<width$}  {:>12} {:<9} {}",
                f.name,
                format_value(f.value),
                f.unit,
                f.what
            );
        }
        if !self.targets.is_empty() {
            let _ = writeln!(out, "targets (reported, not asserted):");
            for t in &self.targets {
                let _ = writeln!(
                    out,
                    "  [{}] {} — {} = {}",
                    if t.met { "met" } else { "MISSED" },
                    t.text,
                    t.figure,
                    format_value(t.measured)
                );
            }
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        let _ = writeln!(out, "-- machine-readable --");
        for (k, v) in self.machine.pairs() {
            let _ = writeln!(out, "{k}={v}");
        }
        for f in &self.figures {
            let _ = writeln!(out, "{}={}", f.name, format_value(f.value));
        }
        out
    }

    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        let figures: serde_json::Map<String, Value> = self
            .figures
            .iter()
            .map(|f| (f.name.clone(), json!(f.value)))
            .collect();
        let details: Vec<Value> = self
            .figures
            .iter()
            .map(|f| json!({"name": f.name, "value": f.value, "unit": f.unit, "what": f.what}))
            .collect();
        let targets: Vec<Value> = self
            .targets
            .iter()
            .map(|t| json!({"target": t.text, "figure": t.figure, "measured": t.measured, "met": t.met}))
            .collect();
        json!({
            "suite": self.suite,
            "quick": self.quick,
            "in_process": self.in_process,
            "machine": self.machine.to_json(),
            "figures": figures,
            "figure_details": details,
            "targets": targets,
            "notes": self.notes,
            "attachments": self.attachments,
        })
    }

    /// Writes `<dir>/<suite>.json` and returns its path.
    pub fn write(&self, dir: &Path) -> anyhow::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{}.json", self.suite));
        std::fs::write(&path, serde_json::to_vec_pretty(&self.to_json())?)?;
        Ok(path)
    }
}

/// Integers without decimals, small numbers with three significant decimals.
pub fn format_value(v: f64) -> String {
    if !v.is_finite() {
        return "nan".into();
    }
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_formatted_compactly() {
        assert_eq!(format_value(2000.0), "2000");
        assert_eq!(format_value(1234.56), "1234.6");
        assert_eq!(format_value(0.8123), "0.812");
        assert_eq!(format_value(f64::NAN), "nan");
    }
}
