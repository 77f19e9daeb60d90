//! Starting while the database does not answer yet: a worker restarted during a failover or
//! a server restart waits for its database instead of exiting (the fault suite's database
//! failover restarted a correlator half a second after the primary was killed, and it exited
//! six times before the standby was promoted); a setting that cannot work still ends the
//! start at once (`db_tls.rs`, `pgbouncer.rs`).

use std::net::SocketAddr;

use lc_testkit::pipeline::{TestEnv, count};
use tokio::net::{TcpListener, TcpStream};

/// The address of `url`'s server: the `host:port` between `@` and the next `/`.
fn server_of(url: &str) -> SocketAddr {
    let after_at = url.rsplit_once('@').expect("user@host in the URL").1;
    let host_port = after_at.split('/').next().expect("host:port");
    host_port.parse().expect("an IP address and port")
}

#[tokio::test]
async fn a_worker_started_before_its_database_answers_waits_for_it() {
    let env = TestEnv::new().await;
    let server = server_of(&env.db.url());
    // A stand-in for a server that is not up yet: the first connection is closed at once,
    // every later one is passed through to PostgreSQL.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let stand_in = listener.local_addr().expect("address");
    let gate = tokio::spawn(async move {
        let (first, _) = listener.accept().await.expect("the worker's first attempt");
        drop(first);
        let mut turned_away = 1;
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return turned_away;
            };
            let Ok(mut outbound) = TcpStream::connect(server).await else {
                turned_away += 1;
                continue;
            };
            tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    let mut args = env.worker_args();
    args.database.database_url = env
        .db
        .url()
        .replace(&server.to_string(), &stand_in.to_string());
    assert_ne!(args.database.database_url, env.db.url());

    let pool = args
        .prepare_database()
        .await
        .expect("the worker waits for its database and then starts");
    let client = pool.get().await.expect("a pooled connection");
    let sql = env.sql().await;
    assert!(
        count(
            &sql,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'optins'"
        )
        .await
            == 1,
        "migrated once the database answered"
    );
    drop(client);
    gate.abort();
}
