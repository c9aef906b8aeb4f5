//! The soak's markdown table: per service and allocator, idle RSS, peak, RSS after settling,
//! and descriptors and threads over the first and the last hundred cycles, against the goals
//! of the footprint issue.

use std::fmt::Write;

use imagemesh_tests::SERVICES;

use crate::{Run, Sample, Settings};

const MB: f64 = 1024.0 * 1024.0;
/// The idle goal: every service at most this resident.
pub const IDLE_GOAL_MB: f64 = 30.0;

fn mark(run: &Run, what: &str) -> f64 {
    run.marks
        .iter()
        .find(|(_, m)| m == what)
        .map_or(f64::MAX, |(t, _)| *t)
}

fn of(run: &Run, service: usize) -> impl Iterator<Item = &Sample> {
    run.samples.iter().filter(move |s| s.service == service)
}

/// One service's numbers in one run.
pub struct Row {
    pub idle: f64,
    pub peak: f64,
    pub after: f64,
    /// What "given back" allows: 1.5 × idle, plus the mounter's caches.
    pub allowed: f64,
    /// (fds, threads) over the first and the last hundred cycles of the small image.
    pub small: ((u64, u64), (u64, u64)),
    /// The same for the large image.
    pub large: ((u64, u64), (u64, u64)),
}

impl Row {
    fn no_growth(&self) -> bool {
        [self.small, self.large]
            .iter()
            .all(|(first, last)| last.0 <= first.0 && last.1 <= first.1)
    }
}

pub fn row(run: &Run, service: usize) -> Row {
    let images = mark(run, "images");
    let cycles = mark(run, "small cycles");
    let copies = mark(run, "copies");
    let idle = of(run, service)
        .filter(|s| s.t < images)
        .last()
        .map_or(0.0, |s| s.footprint.rss_bytes as f64 / MB);
    let peak = of(run, service)
        .map(|s| s.footprint.rss_bytes)
        .max()
        .unwrap_or(0) as f64
        / MB;
    let after = of(run, service)
        .last()
        .map_or(0.0, |s| s.footprint.rss_bytes as f64 / MB);
    let cache = if SERVICES[service] == "mounter" {
        run.cache_bytes as f64 / MB
    } else {
        0.0
    };
    let large = mark(run, "large cycles");
    // Within each image's cycles, the most seen while its first and its last hundred ran.
    let window = |from: f64, to: f64, keep: &dyn Fn(usize) -> bool| {
        of(run, service)
            .filter(|s| s.t >= from && s.t < to && keep(s.cycles_done))
            .fold((0, 0), |(fds, threads), s| {
                (fds.max(s.footprint.fds), threads.max(s.footprint.threads))
            })
    };
    let each = run.cycles / 2;
    let hundred = 100.min(each);
    Row {
        idle,
        peak,
        after,
        allowed: 1.5 * idle + cache,
        small: (
            window(cycles, large, &|done| done < hundred),
            window(cycles, large, &|done| done >= each - hundred),
        ),
        large: (
            window(large, copies, &|done| done < each + hundred),
            window(large, copies, &|done| done >= 2 * each - hundred),
        ),
    }
}

fn ok(good: bool) -> &'static str {
    if good { "yes" } else { "**no**" }
}

pub fn markdown(runs: &[Run], settings: &Settings) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} mount → read → unmount cycles of a small image (busybox) and {} of a {} MiB image, \
         {} at a time, then {} copy builds (each indexed), then {} s idle. RSS in MiB; \
         descriptors and threads are the most seen while the first and the last hundred cycles of each image ran.\n",
        settings.cycles,
        settings.cycles,
        settings.large_mb,
        settings.at_once,
        settings.copies,
        settings.settle.as_secs()
    );
    let _ = writeln!(
        out,
        "| service | allocator | idle RSS | ≤ {IDLE_GOAL_MB} MiB | peak RSS | RSS {} s after | allowed (1.5 × idle + caches) | given back | small: fds, threads first → last 100 | large: fds, threads first → last 100 | no growth |",
        settings.settle.as_secs()
    );
    let _ = writeln!(out, "|---|---|---:|---|---:|---:|---:|---|---|---|---|");
    for (service, name) in SERVICES.iter().enumerate() {
        for run in runs {
            let r = row(run, service);
            let _ = writeln!(
                out,
                "| {name} | {} | {:.1} | {} | {:.1} | {:.1} | {:.1} | {} | {}, {} → {}, {} | {}, {} → {}, {} | {} |",
                run.allocator,
                r.idle,
                ok(r.idle <= IDLE_GOAL_MB),
                r.peak,
                r.after,
                r.allowed,
                ok(r.after <= r.allowed),
                r.small.0.0,
                r.small.0.1,
                r.small.1.0,
                r.small.1.1,
                r.large.0.0,
                r.large.0.1,
                r.large.1.0,
                r.large.1.1,
                ok(r.no_growth()),
            );
        }
    }
    let _ = writeln!(out);
    for run in runs {
        let phases: Vec<String> = run
            .durations
            .iter()
            .map(|(phase, secs)| format!("{phase} {secs:.1} s"))
            .collect();
        let _ = writeln!(
            out,
            "- {}: {}; mounter caches after settling {:.1} MiB",
            run.allocator,
            phases.join(", "),
            run.cache_bytes as f64 / MB
        );
    }
    out
}
