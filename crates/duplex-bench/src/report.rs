//! Latency samples and what a scenario prints: a table for people and one JSON line for
//! the runner.

use serde_json::{Map, Value};

/// Latency samples in nanoseconds.
#[derive(Default)]
pub struct Samples(pub Vec<u32>);

impl Samples {
    pub fn with_capacity(n: usize) -> Samples {
        Samples(Vec::with_capacity(n))
    }

    pub fn push(&mut self, d: std::time::Duration) {
        self.0.push(d.as_nanos().min(u32::MAX as u128) as u32);
    }

    pub fn extend(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sorts once; then [`Sorted::pct`] reads any percentile.
    pub fn sorted(mut self) -> Sorted {
        self.0.sort_unstable();
        Sorted(self.0)
    }
}

pub struct Sorted(Vec<u32>);

impl Sorted {
    /// The `p`-th percentile (nearest rank), in microseconds; 0 with no samples.
    pub fn pct_us(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        let i = rank.clamp(1, self.0.len()) - 1;
        self.0[i] as f64 / 1000.0
    }

    pub fn max_us(&self) -> f64 {
        self.0.last().map_or(0.0, |&v| v as f64 / 1000.0)
    }

    pub fn mean_us(&self) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.iter().map(|&v| v as f64).sum::<f64>() / self.0.len() as f64 / 1000.0
    }
}

/// Rounds for display and JSON: 3 significant decimals is plenty for any figure here.
pub fn round(v: f64) -> f64 {
    if v.abs() >= 100.0 {
        v.round()
    } else if v.abs() >= 1.0 {
        (v * 100.0).round() / 100.0
    } else {
        (v * 10000.0).round() / 10000.0
    }
}

/// The result of one scenario run.
pub struct Outcome {
    pub scenario: String,
    pub label: String,
    pub ok: bool,
    /// Rows of the printed table: name, value, unit.
    rows: Vec<(String, Value, String)>,
    /// Every field of the JSON line, in order.
    json: Map<String, Value>,
    pub errors: Vec<String>,
}

impl Outcome {
    pub fn new(scenario: &str, label: &str) -> Outcome {
        let mut json = Map::new();
        json.insert("scenario".into(), scenario.into());
        json.insert("target".into(), label.into());
        Outcome {
            scenario: scenario.into(),
            label: label.into(),
            ok: true,
            rows: Vec::new(),
            json,
            errors: Vec::new(),
        }
    }

    /// A figure shown in the table and put in the JSON line.
    pub fn metric(&mut self, key: &str, value: impl Into<Value>, unit: &str) {
        let mut v: Value = value.into();
        if let Some(f) = v.as_f64().filter(|_| !v.is_i64() && !v.is_u64()) {
            v = Value::from(round(f));
        }
        self.rows.push((key.into(), v.clone(), unit.into()));
        self.json.insert(key.into(), v);
    }

    /// A field in the JSON line only (parameters of the run).
    pub fn param(&mut self, key: &str, value: impl Into<Value>) {
        self.json.insert(key.into(), value.into());
    }

    /// Records a failure: the scenario exits non-zero.
    pub fn fail(&mut self, what: impl Into<String>) {
        self.ok = false;
        let what = what.into();
        if self.errors.len() < 20 {
            self.errors.push(what);
        }
    }

    pub fn json(&self) -> Value {
        let mut j = self.json.clone();
        j.insert("ok".into(), self.ok.into());
        j.insert(
            "errors".into(),
            Value::Array(self.errors.iter().map(|e| e.as_str().into()).collect()),
        );
        Value::Object(j)
    }

    /// The table, then the JSON line (always the last line).
    pub fn render(&self) -> String {
        let mut s = format!("{} through {}\n", self.scenario, self.label);
        let w = self.rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        for (k, v, unit) in &self.rows {
            s.push_str(&format!("  {k:<w$}  {v:>12} {unit}\n"));
        }
        for e in &self.errors {
            s.push_str(&format!("  error: {e}\n"));
        }
        s.push_str(if self.ok { "  ok\n" } else { "  FAILED\n" });
        s.push_str(&self.json().to_string());
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn nearest_rank_percentiles() {
        let mut s = Samples::default();
        for us in 1..=100u64 {
            s.push(Duration::from_micros(us));
        }
        let s = s.sorted();
        assert_eq!(s.pct_us(50.0), 50.0);
        assert_eq!(s.pct_us(99.0), 99.0);
        assert_eq!(s.pct_us(100.0), 100.0);
        assert_eq!(s.max_us(), 100.0);
    }

    #[test]
    fn the_json_line_comes_last() {
        let mut o = Outcome::new("latency", "direct");
        o.metric("p50_us", 25.123456, "us");
        o.fail("boom");
        let text = o.render();
        let last = text.lines().last().unwrap();
        let v: Value = serde_json::from_str(last).unwrap();
        assert_eq!(v["p50_us"], 25.12);
        assert_eq!(v["ok"], false);
    }
}
