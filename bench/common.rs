//! What every bench binary needs: settings from the environment, order statistics, and the
//! bus it measures on ([`bus`]: secured by default, open with `IMAGEMESH_BENCH_SECURED=0`).

pub mod bus;

pub use bus::{Bus, OPERATOR, Party, secured_from_env};

use std::str::FromStr;
use std::time::Duration;

/// The number in environment variable `name`, or `default` when unset or unparsable.
pub fn env_number<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The `p` quantile (0.0 to 1.0) of `sorted` (nearest rank).
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}
