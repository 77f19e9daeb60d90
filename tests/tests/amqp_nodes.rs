//! `AMQP_URL` with several nodes: the supervised link connects to any live one, and when its
//! node dies it moves on to the next instead of waiting for the dead one.

use std::time::Duration;

use lc_shared::amqp::BrokerLink;
use lc_testkit::harness::TestVhost;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// A TCP forwarder standing in for a broker node: it relays to the real broker until
/// killed, when every relayed connection drops and the port stops answering.
struct Node {
    port: u16,
    tasks: JoinSet<()>,
}

impl Node {
    async fn start(broker: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let mut tasks = JoinSet::new();
        tasks.spawn(async move {
            let mut relays = JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let broker = broker.clone();
                relays.spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(broker).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
            }
        });
        Self { port, tasks }
    }

    /// Drops the listener and every relayed connection, as a `kill -9` of a node would.
    async fn kill(mut self) {
        self.tasks.shutdown().await;
    }
}

/// `url` with its `host:port` replaced by 127.0.0.1:`port`.
fn via(url: &str, port: u16) -> String {
    let (scheme_user, rest) = url.split_once('@').expect("url with user");
    let (_, path) = rest.split_once('/').expect("url with vhost");
    format!("{scheme_user}@127.0.0.1:{port}/{path}")
}

/// The real broker's `host:port` in `url`.
fn authority(url: &str) -> String {
    let rest = url.split_once('@').expect("user").1;
    rest.split_once('/').expect("vhost").0.to_owned()
}

#[tokio::test]
async fn the_link_skips_a_dead_node_and_moves_on_when_its_node_dies() {
    let vhost = TestVhost::create();
    let real = vhost.url();
    // A port nobody listens on: the first node is down from the start.
    let dead = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let dead_port = dead.local_addr().expect("addr").port();
    drop(dead);
    let node_a = Node::start(authority(&real)).await;
    let a_port = node_a.port;
    let url = format!("{},{},{}", via(&real, dead_port), via(&real, a_port), real);

    let link = BrokerLink::start(&url, "amqp-nodes-test", 2);
    link.wait_ready(Duration::from_secs(30))
        .await
        .expect("connected past the dead node");
    let node = link.connected_node().expect("connected");
    assert!(node.contains(&format!(":{a_port}/")), "{node}");
    assert!(
        !node.contains("guest:guest"),
        "the password is hidden: {node}"
    );

    node_a.kill().await;
    link.wait_down(Duration::from_secs(30))
        .await
        .expect("the link noticed its node died");
    link.wait_ready(Duration::from_secs(30))
        .await
        .expect("reconnected to another node");
    let node = link.connected_node().expect("connected");
    assert!(
        !node.contains(&format!(":{a_port}/")) && !node.contains(&format!(":{dead_port}/")),
        "moved on to the live node: {node}"
    );
    link.lease(Duration::from_secs(5))
        .await
        .expect("a channel on the new node");
    link.close().await;
}
