//! Bearer tokens on every RPC: the server's check and the client's header.

use crate::trace::inject_current;
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The server side: refuses calls whose `authorization` header is not `Bearer <token>`.
/// Without a configured token every call passes (the node then listens on loopback only).
#[derive(Clone)]
pub struct ServerAuth {
    digest: Option<[u8; 32]>,
}

impl ServerAuth {
    /// Checks against `token`, or accepts everything when `None`.
    pub fn new(token: Option<&str>) -> ServerAuth {
        ServerAuth {
            digest: token.map(|t| Sha256::digest(t.as_bytes()).into()),
        }
    }
}

impl Interceptor for ServerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.digest else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "missing bearer token: send `authorization: Bearer <token>`",
                )
            })?;
        // Comparing digests keeps the comparison time independent of the token's content.
        let got: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        if got
            .iter()
            .zip(expected)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            != 0
        {
            return Err(Status::unauthenticated("wrong bearer token"));
        }
        Ok(request)
    }
}

/// The client side: adds the bearer token (when there is one) and the current span's
/// W3C `traceparent` to every call.
#[derive(Clone)]
pub struct ClientAuth {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl ClientAuth {
    /// Sends `token`, or no `authorization` header when `None`. A token that is not a valid
    /// header value is an error.
    pub fn new(token: Option<&str>) -> Result<ClientAuth, String> {
        let header = token
            .map(|t| {
                format!("Bearer {t}").parse().map_err(|_| {
                    "the token contains characters not allowed in a gRPC header".to_string()
                })
            })
            .transpose()?;
        Ok(ClientAuth { header })
    }
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            request.metadata_mut().insert("authorization", h.clone());
        }
        inject_current(request.metadata_mut());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_header(value: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(v) = value {
            r.metadata_mut().insert("authorization", v.parse().unwrap());
        }
        r
    }

    #[test]
    fn tokens_are_checked() {
        let mut auth = ServerAuth::new(Some("s3cret"));
        assert!(auth.call(with_header(Some("Bearer s3cret"))).is_ok());
        for bad in [
            None,
            Some("Bearer nope"),
            Some("s3cret"),
            Some("Basic s3cret"),
        ] {
            let err = auth.call(with_header(bad)).unwrap_err();
            assert_eq!(err.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert!(ServerAuth::new(None).call(with_header(None)).is_ok());
    }

    #[test]
    fn the_client_sends_what_the_server_expects() {
        let mut client = ClientAuth::new(Some("s3cret")).unwrap();
        let sent = client.call(Request::new(())).unwrap();
        assert!(ServerAuth::new(Some("s3cret")).call(sent).is_ok());
        assert!(ClientAuth::new(Some("bad\ntoken")).is_err());
    }
}
