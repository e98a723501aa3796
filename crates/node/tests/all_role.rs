//! Role `all` (the embedded default): both halves in one process, shipping over loopback to
//! its own server, end with the GPU half holding exactly the accepted conversations.

use qatflow_node::{client, NodeConfig};
use qatflow_proto::v1::StatusRequest;
use std::time::{Duration, Instant};

#[test]
fn one_process_ships_to_itself() {
    let dir = tempfile::tempdir().unwrap();
    let config = NodeConfig::from_toml(&format!(
        "name = \"local\"\nrole = \"all\"\ndata_dir = {:?}\n[server]\nlisten = \"127.0.0.1:0\"\n\
         [teacher]\ncount = 2\nper_batch = 2\n[shipper]\nmax_conversations = 4\npoll_ms = 50\n",
        dir.path().display().to_string()
    ))
    .unwrap();
    actix::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
    .block_on(async {
        let node = qatflow_node::start(&config).await.unwrap();
        let mut c = client::node(&format!("http://{}", node.addr), None).unwrap();
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
