//! A spark node in this process, called with no token, a wrong token, an oversized chunk and
//! a path-like shard id: each is refused with the right gRPC status and nothing is written.
//! A well-formed upload with the token is accepted and imported. Mutual TLS: [`tls`].

use qatflow_node::client;
use qatflow_node::NodeConfig;
use qatflow_proto::v1::{CommitShardRequest, QueryShardRequest, ShardChunk};
use qatflow_shards::{ShardId, ShardLine};
use std::path::Path;
use tonic::Code;

mod common;
#[path = "security/tls.rs"]
mod tls;

const TOKEN: &str = "test-token-123";

fn spark_config(dir: &Path) -> NodeConfig {
    let mut c = NodeConfig::from_toml(&format!(
        "name = \"spark\"\nrole = \"spark\"\ndata_dir = {:?}\n[server]\nlisten = \"127.0.0.1:0\"\n[auth]\ntoken_env = \"QATFLOW_SECURITY_TEST_TOKEN\"\n",
        dir.display().to_string()
    ))
    .unwrap();
    let token_file = dir.join("token");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&token_file, TOKEN).unwrap();
    c.auth.token_file = Some(token_file);
    c
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for sub in ["partial", "shards"] {
        if let Ok(rd) = std::fs::read_dir(dir.join("spark/inbox").join(sub)) {
            out.extend(rd.map(|e| e.unwrap().path().display().to_string()));
        }
    }
    out
}

fn chunk(id: &str, data: Vec<u8>, total: u64) -> ShardChunk {
    ShardChunk {
        shard_id: id.into(),
        offset: 0,
        data,
        total_size: total,
    }
}

fn system() -> actix::SystemRunner {
    qatflow_node::system(Some(2))
}

#[test]
fn bad_requests_are_refused_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = spark_config(dir.path());
    system().block_on(async {
        let node = qatflow_node::start(&config).await.unwrap();
        let url = format!("http://{}", node.addr);
        let good_id = ShardId::of_bytes(b"x").to_string();

        for token in [None, Some("wrong-token")] {
            let mut c = client::shards(&url, token).unwrap();
            let q = c
                .query_shard(QueryShardRequest {
                    shard_id: good_id.clone(),
                })
                .await
                .unwrap_err();
            assert_eq!(q.code(), Code::Unauthenticated, "{token:?}: {q}");
            let up = c
                .upload_shard(tokio_stream::iter(vec![chunk(&good_id, vec![1; 10], 10)]))
                .await
                .unwrap_err();
            assert_eq!(up.code(), Code::Unauthenticated, "{token:?}: {up}");
            let mut n = client::node(&url, token).unwrap();
            let s = n
                .health(qatflow_proto::v1::HealthRequest {})
                .await
                .unwrap_err();
            assert_eq!(s.code(), Code::Unauthenticated);
        }

        let mut c = client::shards(&url, Some(TOKEN)).unwrap();
        let limit = qatflow_proto::MAX_CHUNK_BYTES;
        let over = c
            .upload_shard(tokio_stream::iter(vec![chunk(
                &good_id,
                vec![0; limit + 1],
                4 << 20,
            )]))
            .await
            .unwrap_err();
        assert_eq!(over.code(), Code::InvalidArgument, "{over}");
        assert!(over.message().contains("exceeds the limit"), "{over}");
        // Far past the decoding limit, tonic refuses the message itself.
        let huge = c
            .upload_shard(tokio_stream::iter(vec![chunk(
                &good_id,
                vec![0; 2 * limit],
                4 << 20,
            )]))
            .await
            .unwrap_err();
        assert!(
            matches!(
                huge.code(),
                Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument
            ),
            "{huge}"
        );

        for evil in ["../../etc/x", "/etc/passwd", "shard-1", ""] {
            let q = c
                .query_shard(QueryShardRequest {
                    shard_id: evil.into(),
                })
                .await
                .unwrap_err();
            assert_eq!(q.code(), Code::InvalidArgument, "{evil}: {q}");
            let up = c
                .upload_shard(tokio_stream::iter(vec![chunk(evil, b"data".to_vec(), 4)]))
                .await
                .unwrap_err();
            assert_eq!(up.code(), Code::InvalidArgument, "{evil}: {up}");
            let cm = c
                .commit_shard(CommitShardRequest {
                    shard_id: evil.into(),
                    size: 4,
                })
                .await
                .unwrap_err();
            assert_eq!(cm.code(), Code::InvalidArgument, "{evil}: {cm}");
        }
        assert_eq!(
            files_under(dir.path()),
            Vec::<String>::new(),
            "nothing written"
        );
        assert!(!dir.path().join("etc").exists());

        // The same client with a real shard: accepted, verified, imported, idempotent.
        let bytes = qatflow_shards::encode(&[ShardLine {
            category: Some("c".into()),
            source: None,
            conversation: r#"{"messages":[{"role":"user","content":"hi"}]}"#.into(),
        }])
        .unwrap();
        let id = ShardId::of_bytes(&bytes).to_string();
        let (a, b) = bytes.split_at(bytes.len() / 2);
        c.upload_shard(tokio_stream::iter(vec![ShardChunk {
            shard_id: id.clone(),
            offset: 0,
            data: a.to_vec(),
            total_size: bytes.len() as u64,
        }]))
        .await
        .unwrap();
        let q = c
            .query_shard(QueryShardRequest {
                shard_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(q.committed_offset, a.len() as u64);
        let wrong_offset = c
            .upload_shard(tokio_stream::iter(vec![ShardChunk {
                shard_id: id.clone(),
                offset: 0,
                data: b.to_vec(),
                total_size: bytes.len() as u64,
            }]))
            .await
            .unwrap_err();
        assert_eq!(
            wrong_offset.code(),
            Code::FailedPrecondition,
            "{wrong_offset}"
        );
        c.upload_shard(tokio_stream::iter(vec![ShardChunk {
            shard_id: id.clone(),
            offset: a.len() as u64,
            data: b.to_vec(),
            total_size: bytes.len() as u64,
        }]))
        .await
        .unwrap();
        let commit = CommitShardRequest {
            shard_id: id.clone(),
            size: bytes.len() as u64,
        };
        let first = c.commit_shard(commit.clone()).await.unwrap().into_inner();
        assert_eq!((first.imported, first.already_committed), (1, false));
        let again = c.commit_shard(commit).await.unwrap().into_inner();
        assert!(again.already_committed);

        let mut n = client::node(&url, Some(TOKEN)).unwrap();
        let status = n
            .status(qatflow_proto::v1::StatusRequest { include_peer: true })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(status.nodes.len(), 1);
        assert_eq!(status.nodes[0].shards_committed, 1);
        assert_eq!(status.nodes[0].stored_conversations, 1);
        node.stop().await.unwrap();
    });
}

#[test]
fn a_public_bind_without_a_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = spark_config(dir.path());
    config.auth.token_file = None;
    config.server.listen = "0.0.0.0:0".parse().unwrap();
    let err = system()
        .block_on(async { qatflow_node::start(&config).await.err().unwrap() })
        .to_string();
    // A configured variable that is unset is named, never taken for "no auth".
    assert!(
        err.contains("QATFLOW_SECURITY_TEST_TOKEN") && err.contains("unset or empty"),
        "{err}"
    );
    config.auth.token_env = None;
    let err = system()
        .block_on(async { qatflow_node::start(&config).await.err().unwrap() })
        .to_string();
    assert!(err.contains("without a token"), "{err}");
}

/// A correctly checksummed shard whose content cannot be imported (a zstd bomb) is
/// quarantined, and every later query or commit answers "rejected" with the marker the
/// shipper stops on, instead of `offset = size, committed = false` forever.
#[test]
fn a_rejected_shard_is_answered_rejected_for_good() {
    let dir = tempfile::tempdir().unwrap();
    let config = spark_config(dir.path());
    system().block_on(async {
        let node = qatflow_node::start(&config).await.unwrap();
        let url = format!("http://{}", node.addr);
        let mut c = client::shards(&url, Some(TOKEN)).unwrap();
        // 32 MiB of JSONL that compresses to a few KiB: past the ratio cap.
        let bomb = qatflow_shards::encode(&[ShardLine {
            category: None,
            source: None,
            conversation: format!(r#"{{"pad":"{}"}}"#, "x".repeat(32 << 20)),
        }])
        .unwrap();
        let id = ShardId::of_bytes(&bomb).to_string();
        c.upload_shard(tokio_stream::iter(vec![chunk(
            &id,
            bomb.clone(),
            bomb.len() as u64,
        )]))
        .await
        .unwrap();
        let commit = CommitShardRequest {
            shard_id: id.clone(),
            size: bomb.len() as u64,
        };
        for _ in 0..2 {
            let err = c.commit_shard(commit.clone()).await.unwrap_err();
            assert!(qatflow_node::server::is_rejection(&err), "{err}");
            assert!(err.message().contains(&id), "names the shard: {err}");
        }
        let q = c
            .query_shard(QueryShardRequest {
                shard_id: id.clone(),
            })
            .await
            .unwrap_err();
        assert!(qatflow_node::server::is_rejection(&q), "{q}");
        assert!(
            files_under(dir.path()).is_empty(),
            "no leftover in inbox/shards"
        );
        assert!(dir
            .path()
            .join("spark/inbox/quarantine")
            .join(format!("{id}.jsonl.zst"))
            .exists());
        node.stop().await.unwrap();
    });
}
