//! Role `all` (the embedded default): both halves in one process, shipping over loopback to
//! its own server, end with the GPU half holding exactly the accepted conversations; also
//! with mutual TLS and a token, where the shipper is a TLS client with a certificate.

use qatflow_node::{client, NodeConfig};
use qatflow_proto::v1::StatusRequest;
use std::path::Path;
use std::time::{Duration, Instant};

mod common;

#[test]
fn one_process_ships_to_itself() {
    let dir = tempfile::tempdir().unwrap();
    ships_to_itself(dir.path(), "");
}

#[test]
fn one_process_ships_to_itself_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = common::Ca::new(d, "ca");
    let (cert, key) = ca.leaf(d, "node", &["localhost", "127.0.0.1"]);
    std::fs::write(d.join("token"), "all-role-token").unwrap();
    let files = |p: &Path| p.display().to_string();
    ships_to_itself(
        d,
        &format!(
            "[auth]\ntoken_file = {:?}\n[tls]\nserver_cert = {c:?}\nserver_key = {k:?}\nclient_ca = {ca:?}\n\
             server_ca = {ca:?}\nclient_cert = {c:?}\nclient_key = {k:?}\n",
            files(&d.join("token")),
            c = files(&cert),
            k = files(&key),
            ca = files(&ca.pem),
        ),
    );
}

/// Runs a role-`all` node with `extra` appended to its config until everything generated
/// is shipped and committed.
fn ships_to_itself(dir: &Path, extra: &str) {
    let config = NodeConfig::from_toml(&format!(
        "name = \"local\"\nrole = \"all\"\ndata_dir = {:?}\n[server]\nlisten = \"127.0.0.1:0\"\n\
         [teacher]\ncount = 2\nper_batch = 2\n[shipper]\nmax_conversations = 4\npoll_ms = 50\n{extra}",
        dir.join("node").display().to_string()
    ))
    .unwrap();
    let token = config.token().unwrap();
    let tls = qatflow_node::tls::client(&config.tls).unwrap();
    let scheme = config.scheme();
    qatflow_node::system(Some(2)).block_on(async {
        let node = qatflow_node::start(&config).await.unwrap();
        let url = format!("{scheme}://{}", node.addr);
        let mut c =
            client::NodeClient::new(client::secure_channel(&url, token.as_deref(), tls).unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        let nodes = loop {
            let nodes = c
                .status(StatusRequest { include_peer: true })
                .await
                .unwrap()
                .into_inner()
                .nodes;
            let (ws, spark) = (&nodes[0], &nodes[1]);
            if ws.teacher.starts_with("finished")
                && ws.accepted_conversations > 0
                && ws.shards_shipped == ws.shards_sealed
                && spark.stored_conversations == ws.accepted_conversations
            {
                break nodes;
            }
            assert!(Instant::now() < deadline, "not done: {nodes:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(nodes[0].name, "local/workstation");
        assert_eq!(nodes[1].name, "local/spark");
        assert_eq!(nodes[1].shards_committed, nodes[0].shards_sealed);
        assert!(nodes[0].shards_sealed >= 2, "{:?}", nodes[0]);
        node.stop().await.unwrap();
    });
}
