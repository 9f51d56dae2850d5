//! The standard `process_*` metrics, with CPU time to the clock tick.
//!
//! prometheus' own process collector counts `process_cpu_seconds_total` in whole
//! seconds, so a proxy using a tenth of a core reads as 0 with a jump every ten seconds;
//! this one reports the same families with the CPU time as the kernel keeps it (1/100 s
//! on Linux), as the other languages' client libraries do.
//!
//! Reading them takes file descriptors (`/proc/self` and its files). Out of descriptors,
//! the families would vanish, or some of them, just when `process_open_fds` matters most
//! (an alert on it would resolve at the limit): the last whole set read is given instead,
//! with `process_open_fds` at `process_max_fds`. (Any other failure to read `/proc` is
//! taken for the same.)

use std::sync::{Mutex, PoisonError};

use prometheus::core::{Collector, Desc};
use prometheus::process_collector::ProcessCollector;
use prometheus::proto::{Counter, MetricFamily};

const CPU: &str = "process_cpu_seconds_total";
const OPEN_FDS: &str = "process_open_fds";
const MAX_FDS: &str = "process_max_fds";

pub struct Process {
    inner: ProcessCollector,
    /// The families of the last read that worked.
    last: Mutex<Vec<MetricFamily>>,
}

impl Process {
    pub fn for_self() -> Process {
        let p = Process {
            inner: ProcessCollector::for_self(),
            last: Mutex::new(Vec::new()),
        };
        // Read once now, so that there is something to give should the first scrape come
        // when the process is out of descriptors.
        p.collect();
        p
    }
}

/// The one gauge value of family `name` in `families`.
fn gauge(families: &[MetricFamily], name: &str) -> Option<f64> {
    families
        .iter()
        .find(|f| f.name() == name)
        .and_then(|f| f.get_metric().first())
        .map(|m| m.get_gauge().get_value())
}

/// `families` as read when the process had every descriptor it may open in use.
fn at_the_limit(mut families: Vec<MetricFamily>) -> Vec<MetricFamily> {
    if let Some(max) = gauge(&families, MAX_FDS) {
        for family in families.iter_mut().filter(|f| f.name() == OPEN_FDS) {
            for metric in family.mut_metric() {
                let mut g = prometheus::proto::Gauge::default();
                g.set_value(max);
                metric.set_gauge(g);
            }
        }
    }
    families
}

/// User and system CPU time of this process so far, in seconds.
fn cpu_seconds() -> Option<f64> {
    let stat = procfs::process::Process::myself().ok()?.stat().ok()?;
    let ticks = procfs::ticks_per_second();
    (ticks > 0).then(|| (stat.utime + stat.stime) as f64 / ticks as f64)
}

impl Collector for Process {
    fn desc(&self) -> Vec<&Desc> {
        self.inner.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.inner.collect();
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let seconds = cpu_seconds();
        let whole =
            gauge(&families, OPEN_FDS).is_some() && families.iter().any(|f| f.name() == CPU);
        let (Some(seconds), true) = (seconds, whole) else {
            // `/proc/self` could not be read, or only in part (with one descriptor left,
            // opening it works and reading its files does not): out of descriptors.
            return at_the_limit(last.clone());
        };
        for family in families.iter_mut().filter(|f| f.name() == CPU) {
            for metric in family.mut_metric() {
                let mut counter = Counter::default();
                counter.set_value(seconds);
                metric.set_counter(counter);
            }
        }
        last.clone_from(&families);
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a read out of descriptors gives: the last families, the open count at the max.
    #[test]
    fn out_of_descriptors_the_last_values_stay_with_open_fds_at_the_max() {
        let p = Process::for_self();
        let first = p.collect();
        let max = gauge(&first, MAX_FDS).expect("process_max_fds");
        assert!(gauge(&first, OPEN_FDS).expect("process_open_fds") < max);
        let stale = at_the_limit(p.last.lock().expect("lock").clone());
        assert_eq!(gauge(&stale, OPEN_FDS), Some(max));
        assert_eq!(stale.len(), first.len(), "every family is still there");
    }

    /// After some work, the CPU time reads with a fraction, not in whole seconds.
    #[test]
    fn cpu_time_has_the_ticks_resolution() {
        let p = Process::for_self();
        let start = std::time::Instant::now();
        let mut x = 0u64;
        // Burn CPU until at least one tick past a whole second has been counted, bounded.
        let read = || {
            p.collect()
                .iter()
                .filter(|f| f.name() == CPU)
                .flat_map(|f| f.get_metric())
                .map(|m| m.get_counter().get_value())
                .next()
        };
        let mut seen = None;
        while start.elapsed() < std::time::Duration::from_secs(5) {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            let v = read().expect("the CPU family");
            if v.fract() != 0.0 {
                seen = Some(v);
                break;
            }
        }
        std::hint::black_box(x);
        assert!(seen.is_some(), "CPU time stayed in whole seconds");
    }
}
