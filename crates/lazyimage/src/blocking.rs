//! Where the blocking work of loading indexes and reading files runs: decoding index heads,
//! digests, inflating, disk cache reads and writes. It goes to tokio's blocking pool at most
//! one task per core at a time, across the process. The work is CPU-bound or short, so more at
//! once would not finish sooner; and the pool starts a thread for every task that finds none
//! idle, so without a bound eight readers of one large image kept eleven threads alive.
//!
//! Work given here must not wait for other work given here (it never does: none of it takes a
//! lock or a network round trip).

use std::sync::LazyLock;

use tokio::sync::Semaphore;
use tokio::task::JoinError;

static SLOTS: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(slots()));

/// How many blocking tasks run at once: one per core.
pub fn slots() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Runs `work` on tokio's blocking pool once a slot is free.
pub async fn run<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, JoinError> {
    let _slot = SLOTS.acquire().await.expect("never closed");
    tokio::task::spawn_blocking(work).await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_more_than_one_task_per_core_runs_at_once() {
        let slots = super::slots();
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..4 * slots + 4)
            .map(|_| {
                let (running, most) = (running.clone(), most.clone());
                tokio::spawn(super::run(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    // Long enough that every task is queued while the first ones run.
                    std::thread::sleep(Duration::from_millis(20));
                    running.fetch_sub(1, Ordering::SeqCst);
                }))
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), slots);
    }
}
