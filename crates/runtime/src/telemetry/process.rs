//! What a process holds of the node: resident memory, open descriptors and threads, read from
//! `/proc` — by each service about itself (exported as gauges, [`register_gauges`]) and by the
//! footprint test and the soak benchmark about the services they run.

use std::path::{Path, PathBuf};

/// One reading of a process's footprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Footprint {
    /// Resident set size, bytes (`VmRSS`).
    pub rss_bytes: u64,
    /// Open file descriptors (entries of `fd/`).
    pub fds: u64,
    /// Threads (`Threads`).
    pub threads: u64,
}

impl Footprint {
    /// This process.
    pub fn of_self() -> Option<Self> {
        Self::read(Path::new("/proc/self"))
    }

    /// Process `pid`; `None` once it is gone.
    pub fn of_pid(pid: u32) -> Option<Self> {
        Self::read(&PathBuf::from(format!("/proc/{pid}")))
    }

    fn read(dir: &Path) -> Option<Self> {
        let status = std::fs::read_to_string(dir.join("status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse::<u64>().ok())
        };
        let fds = std::fs::read_dir(dir.join("fd")).ok()?.count() as u64;
        Some(Self {
            rss_bytes: field("VmRSS:")? * 1024,
            fds,
            threads: field("Threads:")?,
        })
    }
}

/// Keeps gauges' registrations for the life of the process.
static GAUGES: std::sync::Mutex<Vec<opentelemetry::metrics::ObservableGauge<u64>>> =
    std::sync::Mutex::new(Vec::new());

/// Registers a gauge whose value `observe` reads at each export (on the exporter's thread; it
/// must be cheap and must not block on the async runtime).
pub fn gauge(
    name: &'static str,
    unit: &'static str,
    description: &'static str,
    observe: impl Fn() -> Option<u64> + Send + Sync + 'static,
) {
    let gauge = opentelemetry::global::meter("imagemesh")
        .u64_observable_gauge(name)
        .with_unit(unit)
        .with_description(description)
        .with_callback(move |observer| {
            if let Some(value) = observe() {
                observer.observe(value, &[]);
            }
        })
        .build();
    GAUGES.lock().expect("gauges lock").push(gauge);
}

/// The process gauges every service exports: `process.memory.usage` (RSS, bytes),
/// `process.open_file_descriptor.count` and `process.thread.count` (the OpenTelemetry semantic
/// conventions' names).
pub fn register_gauges() {
    gauge(
        "process.memory.usage",
        "By",
        "resident memory of the process",
        || Footprint::of_self().map(|f| f.rss_bytes),
    );
    gauge(
        "process.open_file_descriptor.count",
        "{file_descriptor}",
        "open file descriptors of the process",
        || Footprint::of_self().map(|f| f.fds),
    );
    gauge(
        "process.thread.count",
        "{thread}",
        "threads of the process",
        || Footprint::of_self().map(|f| f.threads),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_reads_its_own_footprint() {
        let me = Footprint::of_self().expect("/proc/self");
        assert!(me.rss_bytes > 1024 * 1024, "{me:?}");
        assert!(me.fds >= 3, "{me:?}");
        assert!(me.threads >= 1, "{me:?}");
        let by_pid = Footprint::of_pid(std::process::id()).expect("/proc/<pid>");
        assert!(by_pid.threads >= 1);
        assert_eq!(Footprint::of_pid(u32::MAX), None);
    }
}
