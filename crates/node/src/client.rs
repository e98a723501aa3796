//! Connecting to a node: a lazily connecting channel with the bearer token and trace
//! context on every call, over TLS when given a [`ClientTlsConfig`] (see [`crate::tls`]).

use crate::auth::ClientAuth;
use crate::NodeError;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

pub use qatflow_proto::v1::jobs_client::JobsClient;
pub use qatflow_proto::v1::node_client::NodeClient;
pub use qatflow_proto::v1::shards_client::ShardsClient;

/// A channel that adds the token and `traceparent` to every call.
pub type AuthChannel = InterceptedService<Channel, ClientAuth>;

/// A plain HTTP/2 channel to `url` (`http://127.0.0.1:7441`) that connects on first use
/// and reconnects after failures.
pub fn channel(url: &str, token: Option<&str>) -> Result<AuthChannel, NodeError> {
    secure_channel(url, token, None)
}

/// A channel to `url` over TLS when `tls` is given (`url` must then be `https://`), else
/// over plain HTTP/2 (`http://`).
pub fn secure_channel(
    url: &str,
    token: Option<&str>,
    tls: Option<ClientTlsConfig>,
) -> Result<AuthChannel, NodeError> {
    let err = |message: String| NodeError::Connect {
        url: url.to_string(),
        message,
    };
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| err(format!("not a URL ({e}); expected http://HOST:PORT")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    match (tls, url.starts_with("https://")) {
        (Some(tls), true) => {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| err(format!("TLS setup failed: {e}")))?;
        }
        (None, false) => {}
        (Some(_), false) => {
            return Err(err("TLS is configured: use an https:// URL".into()));
        }
        (None, true) => {
            return Err(err(
                "an https:// URL needs TLS settings (tls.server_ca, or --tls-ca)".into(),
            ));
        }
    }
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
