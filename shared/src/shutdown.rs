//! One future that completes on SIGTERM or Ctrl-C, for graceful shutdown.

/// Waits for SIGTERM or SIGINT (Ctrl-C). If a handler cannot be installed the other one still
/// works; if neither can, the future never completes (the process is then stopped the hard
/// way, which the system tolerates by design).
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// A shutdown trigger shared by all tasks of a process: set by a signal or by a test.
#[derive(Clone, Debug)]
pub struct Shutdown {
    tx: tokio::sync::watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    /// A trigger that has not fired.
    pub fn new() -> Self {
        let (tx, _) = tokio::sync::watch::channel(false);
        Self { tx }
    }

    /// A trigger that fires on SIGTERM or Ctrl-C.
    pub fn on_signals() -> Self {
        let s = Self::new();
        let fire = s.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received; draining");
            fire.trigger();
        });
        s
    }

    /// Fires the trigger (idempotent).
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// True once fired.
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }

    /// Completes when the trigger fires (at once if it already has).
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(|fired| *fired).await;
    }
}
