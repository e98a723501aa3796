//! Shard streaming throughput on loopback: a synthetic dataset is sealed into shards
//! (zstd + sha256), shipped to a spark node in this process over gRPC with the token
//! (query, upload in 1 MiB chunks, commit with checksum verification and import), and
//! compared with a plain copy of the same JSONL file on the same disk.

use crate::client;
use crate::config::NodeConfig;
use crate::NodeError;
use qatflow_proto::v1::{CommitShardRequest, QueryShardRequest, ShardChunk};
use qatflow_proto::MAX_CHUNK_BYTES;
use qatflow_shards::{ShardId, ShardLine};
use std::path::Path;
use std::time::Instant;

/// What [`shard_throughput`] measured; rates are of uncompressed dataset bytes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShardBench {
    /// Uncompressed JSONL bytes of the dataset.
    pub dataset_bytes: u64,
    /// Conversations in it.
    pub conversations: u64,
    /// Shards it was sealed into.
    pub shards: u64,
    /// Compressed bytes sent.
    pub shard_bytes: u64,
    /// Sealing (zstd + sha256), MB/s.
    pub seal_mb_s: f64,
    /// Query + upload + commit (checksum, import into sled), MB/s.
    pub ship_mb_s: f64,
    /// Upload alone (bytes on the wire into the receiver's partial files), MB/s.
    pub upload_mb_s: f64,
    /// `std::fs::copy` of the JSONL file, MB/s.
    pub copy_mb_s: f64,
}

const WORDS: [&str; 24] = [
    "search", "memory", "weather", "tomorrow", "stock", "price", "NVIDIA", "calendar", "meeting",
    "remind", "dinner", "Paris", "capital", "answer", "short", "tool", "result", "today", "news",
    "music", "timer", "minutes", "degrees", "rain",
];

/// A synthetic conversation of about 1.5 KB whose words vary with `i` (so zstd does not
/// compress it to nothing).
fn conversation(i: u64) -> String {
    let mut state = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut text = |n: usize| {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                WORDS[(state % WORDS.len() as u64) as usize]
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    let user = text(40);
    let reply = text(150);
    format!(
        r#"{{"messages":[{{"role":"user","content":"{i} {user}"}},{{"role":"assistant","content":"<think>\n</think>\n{reply}."}}]}}"#
    )
}

fn mb_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / 1e6 / secs.max(1e-9)
}

/// Runs the benchmark in `dir` with a dataset of about `dataset_mb` MB, shards of
/// `shard_mb` MB (uncompressed). Call inside an actix System on a multi-thread runtime.
pub async fn shard_throughput(
    dir: &Path,
    dataset_mb: u64,
    shard_mb: u64,
) -> Result<ShardBench, NodeError> {
    let io = |e: std::io::Error| NodeError::Runtime(format!("{}: {e}", dir.display()));
    let target = dataset_mb * 1_000_000;
    let mut jsonl = Vec::with_capacity(target as usize + 4096);
    let mut lines = Vec::new();
    let mut i = 0u64;
    while (jsonl.len() as u64) < target {
        let c = conversation(i);
        jsonl.extend_from_slice(c.as_bytes());
        jsonl.push(b'\n');
        lines.push(ShardLine {
            category: Some("bench".into()),
            source: Some("bench".into()),
            conversation: c,
        });
        i += 1;
    }
    let jsonl_path = dir.join("dataset.jsonl");
    std::fs::write(&jsonl_path, &jsonl).map_err(io)?;
    let t = Instant::now();
    std::fs::copy(&jsonl_path, dir.join("dataset-copy.jsonl")).map_err(io)?;
    std::fs::File::open(dir.join("dataset-copy.jsonl"))
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    let copy_s = t.elapsed().as_secs_f64();

    let per_shard = ((shard_mb * 1_000_000) / (jsonl.len() as u64 / lines.len() as u64)).max(1);
    let t = Instant::now();
    let mut shards = Vec::new();
    for group in lines.chunks(per_shard as usize) {
        let bytes = qatflow_shards::encode(group)?;
        shards.push((ShardId::of_bytes(&bytes), bytes));
    }
    let seal_s = t.elapsed().as_secs_f64();

    let token = "bench-token";
    std::fs::write(dir.join("token"), token).map_err(io)?;
    let config = NodeConfig::from_toml(&format!(
        "name = \"bench\"\nrole = \"spark\"\ndata_dir = {:?}\n[server]\nlisten = \"127.0.0.1:0\"\n[auth]\ntoken_file = {:?}\n[receiver]\nmax_shard_bytes = {}\n",
        dir.join("spark").display().to_string(),
        dir.join("token").display().to_string(),
        1u64 << 30
    ))
    .map_err(NodeError::Runtime)?;
    let node = crate::start(&config).await?;
    let mut c = client::shards(&format!("http://{}", node.addr), Some(token))?;
    let rpc = |s: tonic::Status| NodeError::Runtime(format!("{}: {}", s.code(), s.message()));
    let t = Instant::now();
    let mut upload_s = 0.0;
    for (id, bytes) in &shards {
        let q = c
            .query_shard(QueryShardRequest {
                shard_id: id.to_string(),
            })
            .await
            .map_err(rpc)?
            .into_inner();
        let start = q.committed_offset as usize;
        let chunks: Vec<ShardChunk> = bytes[start..]
            .chunks(MAX_CHUNK_BYTES)
            .enumerate()
            .map(|(k, data)| ShardChunk {
                shard_id: id.to_string(),
                offset: (start + k * MAX_CHUNK_BYTES) as u64,
                data: data.to_vec(),
                total_size: bytes.len() as u64,
            })
            .collect();
        let u = Instant::now();
        c.upload_shard(tokio_stream::iter(chunks))
            .await
            .map_err(rpc)?;
        upload_s += u.elapsed().as_secs_f64();
        c.commit_shard(CommitShardRequest {
            shard_id: id.to_string(),
            size: bytes.len() as u64,
        })
        .await
        .map_err(rpc)?;
    }
    let ship_s = t.elapsed().as_secs_f64();
    node.stop().await?;
    let shard_bytes: u64 = shards.iter().map(|(_, b)| b.len() as u64).sum();
    let n = jsonl.len() as u64;
    Ok(ShardBench {
        dataset_bytes: n,
        conversations: lines.len() as u64,
        shards: shards.len() as u64,
        shard_bytes,
        seal_mb_s: mb_s(n, seal_s),
        ship_mb_s: mb_s(n, ship_s),
        upload_mb_s: mb_s(n, upload_s),
        copy_mb_s: mb_s(n, copy_s),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_run_ships_everything() {
        let dir = tempfile::tempdir().unwrap();
        let report = crate::node::system(Some(2))
            .block_on(shard_throughput(dir.path(), 2, 1))
            .unwrap();
        assert!(report.dataset_bytes >= 2_000_000);
        assert!(report.shards >= 2);
        assert!(report.shard_bytes < report.dataset_bytes);
        let store = qatflow_store::Store::open(dir.path().join("spark/spark/db")).unwrap();
        assert_eq!(store.len() as u64, report.conversations);
    }
}
