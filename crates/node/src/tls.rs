//! Optional (mutual) TLS from the `[tls]` section of the node config: the server's
//! certificate and key, and the CA its clients' certificates must be signed by; the
//! client's certificate and key, and the CA the peer's server certificate must be signed by.
//!
//! Every file is read and its PEM checked here, so a missing or wrong file is reported with
//! its path and the config field that names it before anything listens or connects.
//! The bearer token is checked on top of TLS, never instead of it.

use crate::config::TlsConfig;
use crate::NodeError;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

fn config_error(path: &Path, field: &str, message: impl std::fmt::Display) -> NodeError {
    NodeError::Config {
        path: path.to_path_buf(),
        message: format!("tls.{field}: {message}"),
    }
}

/// Reads a PEM file of one or more certificates named by config field `field`.
fn certificates(path: &Path, field: &str) -> Result<Vec<u8>, NodeError> {
    let bytes = std::fs::read(path).map_err(|e| {
        config_error(
            path,
            field,
            format!("cannot read the certificate file: {e}"),
        )
    })?;
    let mut count = 0;
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        cert.map_err(|e| config_error(path, field, format!("not a PEM certificate: {e}")))?;
        count += 1;
    }
    if count == 0 {
        return Err(config_error(
            path,
            field,
            "holds no `BEGIN CERTIFICATE` block; give a PEM certificate file",
        ));
    }
    Ok(bytes)
}

/// Reads a PEM private key file named by config field `field`.
fn private_key(path: &Path, field: &str) -> Result<Vec<u8>, NodeError> {
    let bytes = std::fs::read(path)
        .map_err(|e| config_error(path, field, format!("cannot read the key file: {e}")))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| {
        config_error(
            path,
            field,
            format!("holds no PEM private key ({e}); give a PKCS#8, PKCS#1 or SEC1 key file"),
        )
    })?;
    Ok(bytes)
}

/// The server's TLS settings, or `None` when `tls.server_cert` is unset (plain HTTP/2).
/// With `tls.client_ca`, clients must present a certificate signed by that CA.
pub fn server(c: &TlsConfig) -> Result<Option<ServerTlsConfig>, NodeError> {
    let (Some(cert), Some(key)) = (&c.server_cert, &c.server_key) else {
        return Ok(None);
    };
    let identity = Identity::from_pem(
        certificates(cert, "server_cert")?,
        private_key(key, "server_key")?,
    );
    let mut tls = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = &c.client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(certificates(ca, "client_ca")?));
    }
    Ok(Some(tls))
}

/// The client's TLS settings towards the peer, or `None` when `tls.server_ca` is unset.
/// With `tls.client_cert` and `tls.client_key`, the client presents that certificate.
pub fn client(c: &TlsConfig) -> Result<Option<ClientTlsConfig>, NodeError> {
    let Some(ca) = &c.server_ca else {
        return Ok(None);
    };
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(certificates(ca, "server_ca")?));
    if let (Some(cert), Some(key)) = (&c.client_cert, &c.client_key) {
        tls = tls.identity(Identity::from_pem(
            certificates(cert, "client_cert")?,
            private_key(key, "client_key")?,
        ));
    }
    if let Some(name) = &c.server_name {
        tls = tls.domain_name(name.clone());
    }
    Ok(Some(tls))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn missing_and_wrong_files_name_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let c = TlsConfig {
            server_cert: Some(missing.clone()),
            server_key: Some(missing.clone()),
            ..TlsConfig::default()
        };
        let err = server(&c).unwrap_err().to_string();
        assert!(
            err.contains("nope.pem") && err.contains("tls.server_cert"),
            "{err}"
        );

        let junk: PathBuf = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let c = TlsConfig {
            server_ca: Some(junk.clone()),
            ..TlsConfig::default()
        };
        let err = client(&c).unwrap_err().to_string();
        assert!(
            err.contains("junk.pem") && err.contains("tls.server_ca"),
            "{err}"
        );
        assert!(err.contains("BEGIN CERTIFICATE"), "{err}");
    }

    #[test]
    fn no_tls_without_the_fields() {
        assert!(server(&TlsConfig::default()).unwrap().is_none());
        assert!(client(&TlsConfig::default()).unwrap().is_none());
    }
}
