//! qatflow-node: the two-node system as actix actors behind tonic services.
//!
//! - [`config`]: the node's TOML config and its checks (loopback bind without a token);
//! - [`auth`]: the bearer-token interceptor of the server and the client's token and
//!   `traceparent` injection;
//! - [`tls`]: optional mutual TLS of the server and the client from the `[tls]` section;
//! - [`trace`]: W3C trace context in gRPC metadata and a span per RPC;
//! - [`status`]: the status board the actors write and the `Status` RPC reads;
//! - [`actors`]: Teacher, Validator, ShardShipper (workstation); ShardReceiver,
//!   ServingSupervisor (spark);
//! - [`watchdog`]: heartbeats of long actor work and the restart of an actor that stalls;
//! - [`server`]: the `Node`, `Shards` and `Jobs` services;
//! - [`client`]: connecting to a node;
//! - [`bench`]: shard streaming throughput on loopback against a plain file copy;
//! - [`node`]: starting the actix System on a multi-thread tokio runtime with the roles of
//!   a config ([`run`]).
//!
//! The actors only schedule work: the teacher, the gates and the shard libraries do it, on
//! blocking threads, so a panic there becomes an error the actor logs before it restarts.

pub mod actors;
pub mod auth;
pub mod bench;
pub mod client;
pub mod config;
pub mod node;
pub mod server;
pub mod status;
pub mod tls;
pub mod trace;
pub mod watchdog;

pub use config::{NodeConfig, Role};
pub use node::{run, start, system, RunningNode};

use std::net::SocketAddr;
use std::path::PathBuf;

/// Errors of starting or running a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The config file is unreadable or wrong.
    #[error("{path}: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A non-loopback listen address without a token.
    #[error("refusing to listen on {listen} without a token: set auth.token_file or auth.token_env, or listen on 127.0.0.1")]
    InsecureBind {
        /// The address.
        listen: SocketAddr,
    },
    /// `auth.token_env` names a variable that is unset or empty (and no `auth.token_file`
    /// is configured).
    #[error("auth.token_env is {var:?}, but the variable {var} is unset or empty: export it with the token (or remove auth.token_env to run without authentication on 127.0.0.1)")]
    EmptyTokenEnv {
        /// The variable's name.
        var: String,
    },
    /// The listen address is unusable.
    #[error("cannot listen on {listen}: {source}; is another node running on that port?")]
    Bind {
        /// The address.
        listen: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The dataset store failed to open.
    #[error(transparent)]
    Store(#[from] qatflow_store::StoreError),
    /// The shard ledger failed to open.
    #[error(transparent)]
    Shards(#[from] qatflow_shards::ShardError),
    /// The teacher setup is wrong.
    #[error("teacher: {0}")]
    Teacher(String),
    /// A peer URL is unusable or unreachable.
    #[error("cannot connect to {url}: {message}")]
    Connect {
        /// The URL.
        url: String,
        /// What failed.
        message: String,
    },
    /// The runtime failed.
    #[error("node runtime: {0}")]
    Runtime(String),
}
