//! Connecting to a node: a lazily connecting channel with the bearer token and trace
//! context on every call.

use crate::auth::ClientAuth;
use crate::NodeError;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

pub use qatflow_proto::v1::jobs_client::JobsClient;
pub use qatflow_proto::v1::node_client::NodeClient;
pub use qatflow_proto::v1::shards_client::ShardsClient;

/// A channel that adds the token and `traceparent` to every call.
pub type AuthChannel = InterceptedService<Channel, ClientAuth>;

/// A channel to `url` (`http://127.0.0.1:7441`) that connects on first use and reconnects
/// after failures.
pub fn channel(url: &str, token: Option<&str>) -> Result<AuthChannel, NodeError> {
    let err = |message: String| NodeError::Connect {
        url: url.to_string(),
        message,
    };
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| err(format!("not a URL ({e}); expected http://HOST:PORT")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let auth = ClientAuth::new(token).map_err(err)?;
    Ok(InterceptedService::new(endpoint.connect_lazy(), auth))
}

/// A `Shards` client for `url`.
pub fn shards(url: &str, token: Option<&str>) -> Result<ShardsClient<AuthChannel>, NodeError> {
    Ok(ShardsClient::new(channel(url, token)?))
}

/// A `Node` client for `url`.
pub fn node(url: &str, token: Option<&str>) -> Result<NodeClient<AuthChannel>, NodeError> {
    Ok(NodeClient::new(channel(url, token)?))
}

/// A `Jobs` client for `url`.
pub fn jobs(url: &str, token: Option<&str>) -> Result<JobsClient<AuthChannel>, NodeError> {
    Ok(JobsClient::new(channel(url, token)?))
}
