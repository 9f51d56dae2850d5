//! The standard `process_*` metrics, with CPU time to the clock tick.
//!
//! prometheus' own process collector counts `process_cpu_seconds_total` in whole
//! seconds, so a proxy using a tenth of a core reads as 0 with a jump every ten seconds;
//! this one reports the same families with the CPU time as the kernel keeps it (1/100 s
//! on Linux), as the other languages' client libraries do.

use prometheus::core::{Collector, Desc};
use prometheus::process_collector::ProcessCollector;
use prometheus::proto::{Counter, MetricFamily};

const CPU: &str = "process_cpu_seconds_total";

pub struct Process(ProcessCollector);

impl Process {
    pub fn for_self() -> Process {
        Process(ProcessCollector::for_self())
    }
}

/// User and system CPU time of this process so far, in seconds.
fn cpu_seconds() -> Option<f64> {
    let stat = procfs::process::Process::myself().ok()?.stat().ok()?;
    let ticks = procfs::ticks_per_second();
    (ticks > 0).then(|| (stat.utime + stat.stime) as f64 / ticks as f64)
}

impl Collector for Process {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.0.collect();
        let Some(seconds) = cpu_seconds() else {
            return families;
        };
        for family in families.iter_mut().filter(|f| f.name() == CPU) {
            for metric in family.mut_metric() {
                let mut counter = Counter::default();
                counter.set_value(seconds);
                metric.set_counter(counter);
            }
        }
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
