//! The dispatcher's periodic sweeps, run every poll interval before it claims: leases that
//! expired, and pending opt-ins that can no longer be sent before their deadline.

use lc_shared::optin::OptinState;

use super::Dispatcher;
use crate::scheduler::store::{self, rescue::UnknownOutcome};

impl Dispatcher {
    /// Resolves claims whose lease expired (a replica died or stalled): never-called rows go
    /// back to `pending`, started calls are resolved by the unknown-outcome policy.
    pub(super) async fn rescue(&self) {
        let mut client = match self.pool.get().await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot rescue expired leases");
                return;
            }
        };
        match store::rescue::rescue_expired_leases(&mut client, self.settings.unknown_outcome, 500)
            .await
        {
            Ok(r) => {
                self.metrics
                    .leases_rescued
                    .inc_by((r.returned + r.unknown) as u64);
                if self.settings.unknown_outcome == UnknownOutcome::Fail {
                    self.metrics
                        .terminal_of(OptinState::Failed)
                        .inc_by(r.unknown as u64);
                }
            }
            Err(e) => tracing::error!(error = %e, "rescuing expired leases failed"),
        }
    }

    /// Expires pending opt-ins that can no longer be sent, in bulk, so that under overload
    /// no send slot is spent on a row that is already dead.
    pub(super) async fn expire_overdue(&self) {
        let mut client = match self.pool.get().await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot expire overdue opt-ins");
                return;
            }
        };
        loop {
            match store::expire_overdue(&mut client, self.settings.timing.safety_margin, 1000).await
            {
                Ok(0) => return,
                Ok(n) => {
                    self.metrics
                        .terminal_of(OptinState::Expired)
                        .inc_by(n as u64);
                    tracing::warn!(
                        expired = n,
                        "opt-ins expired before they could be sent (backlog beyond capacity?)"
                    );
                    if n < 1000 {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "expiring overdue opt-ins failed");
                    return;
                }
            }
        }
    }
}
