//! Several hosts in `DATABASE_URL` with `target_session_attrs=read-write`: the pool finds the
//! primary among them, and after the primary dies and its standby is promoted, finds the new
//! one without any change of configuration.

use std::path::PathBuf;
use std::time::Duration;

use lc_shared::db;
use lc_testkit::private::PrivateCluster;

/// A primary and its streaming standby (synchronous: a commit returns only once the standby
/// has it), removed on drop.
struct Pair {
    primary: PrivateCluster,
    standby: PrivateCluster,
    dir: PathBuf,
}

impl Pair {
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "lc-db-failover-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let primary = PrivateCluster::start(&dir.join("a")).expect("primary");
        let standby = primary
            .start_standby(&dir.join("b"), "lc_standby")
            .expect("standby");
        primary
            .set("synchronous_standby_names", "lc_standby")
            .await
            .expect("synchronous replication");
        Self {
            primary,
            standby,
            dir,
        }
    }

    /// The standby first: a client that took the first host that answers would land on a
    /// read-only server.
    fn url(&self) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/lc_failover?target_session_attrs=read-write&connect_timeout=5",
            self.standby.port, self.primary.port
        )
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        self.standby.stop(false);
        self.primary.stop(false);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn the_pool_finds_the_primary_among_several_hosts_and_the_promoted_standby_after_a_failover()
{
    let pair = Pair::start().await;
    let url = pair.url();
    // Creating the database and migrating work through the multi-host URL: on the primary.
    db::ensure_database(&url).await.expect("database created");
    let pool = db::pool(&url, 2).expect("pool");
    db::migrate(&pool).await.expect("migrations");
    let client = pool.get().await.expect("connection");
    client
        .execute(
            "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at) \
             VALUES ('1', 'before-failover', now(), now() + interval '1 day', now(), 'pending', now())",
            &[],
        )
        .await
        .expect("a write on the primary (committed on the standby too: synchronous)");
    drop(client);

    pair.primary.kill().expect("primary down");
    pair.standby.promote().expect("standby promoted");

    // Connections to the dead primary fail once each and are dropped by the pool; a new one
    // goes through the host list again and finds the promoted standby. Bounded, not timed.
    let mut found = None;
    for _ in 0..20 {
        let Ok(client) = pool.get().await else {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        };
        match client
            .query_one(
                "SELECT count(*) FROM optins WHERE login_id = 'before-failover'",
                &[],
            )
            .await
        {
            Ok(row) => {
                client
                    .execute(
                        "INSERT INTO optins (page_id, login_id, opted_in_at, deadline, send_at, state, next_attempt_at) \
                         VALUES ('1', 'after-failover', now(), now() + interval '1 day', now(), 'pending', now())",
                        &[],
                    )
                    .await
                    .expect("a write on the promoted standby");
                found = Some(row.get::<_, i64>(0));
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    assert_eq!(
        found,
        Some(1),
        "the promoted standby was found through the same URL and had the committed row"
    );
}
