//! The outbox relay alone, on the test's database and vhost: the relay tests drive it
//! without a scheduler or correlator around it, and run two at once.

use deadpool_postgres::Pool;
use lc_shared::amqp::BrokerLink;
use lc_shared::shutdown::Shutdown;
use lc_worker::relay::{self, OutboxDb, RelayMetrics};
use lc_worker::runtime::config::RelayArgs;

use super::{TestEnv, WAIT};

impl TestEnv {
    /// Starts a relay with `args` on `pool` (a pool of this test's database) and its own
    /// broker link, once the link is connected.
    pub async fn start_relay(&self, pool: &Pool, args: RelayArgs) -> RunningRelay {
        let link = BrokerLink::start(self.vhost.url(), "relay-test", 2);
        link.wait_ready(WAIT).await.expect("broker ready");
        // Unexported: two relays in one test would clash in one registry.
        let metrics = RelayMetrics::unexported().expect("metrics");
        let shutdown = Shutdown::new();
        let db = OutboxDb::new(pool.clone(), &self.db.url()).expect("outbox db");
        let task = tokio::spawn(relay::run(
            db,
            link.clone(),
            args,
            metrics.clone(),
            shutdown.clone(),
        ));
        RunningRelay {
            link,
            metrics,
            shutdown,
            task,
        }
    }
}

/// A relay started by [`TestEnv::start_relay`].
pub struct RunningRelay {
    /// Its broker link (tests wait for it to notice an outage).
    pub link: BrokerLink,
    /// Its metrics.
    pub metrics: RelayMetrics,
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

impl RunningRelay {
    /// Stops it (it must stop within [`WAIT`]) and closes its link.
    pub async fn stop(self) {
        self.shutdown.trigger();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("relay stops in time")
            .expect("relay task");
        self.link.close().await;
    }

    /// Events it published, of the types the relay tests write.
    pub fn published_total(&self) -> u64 {
        ["identity.linked", "first_message.sent"]
            .iter()
            .map(|t| self.metrics.published.with_label_values(&[*t]).get())
            .sum()
    }
}
