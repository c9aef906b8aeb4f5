//! Graceful shutdown.
//!
//! A [`Shutdown`] is a cancellation token shared by every task of a service. The binary cancels it
//! on SIGTERM or SIGINT; tests cancel it themselves. Long-running loops `select!` on
//! [`Shutdown::cancelled`] and their work.

use tokio_util::sync::CancellationToken;

/// Signals every task of a service to finish.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks every holder to stop.
    pub fn trigger(&self) {
        self.0.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Completes once shutdown has been triggered.
    pub async fn cancelled(&self) {
        self.0.cancelled().await
    }

    /// A token that triggers with this one and can also be triggered alone.
    pub fn child(&self) -> Shutdown {
        Shutdown(self.0.child_token())
    }

    /// Triggers this shutdown on the first SIGTERM or SIGINT.
    pub fn trigger_on_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let token = self.0.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
                _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
            }
            token.cancel();
        });
        Ok(())
    }
}
