//! Mutual TLS on loopback with certificates made here (rcgen): a spark node that requires
//! client certificates signed by its CA refuses a client without a certificate and one
//! whose certificate another CA signed, serves a client with the CA-signed certificate, and
//! still requires the bearer token from it.

use qatflow_node::client::{self, NodeClient};
use qatflow_node::config::TlsConfig;
use qatflow_node::NodeConfig;
use qatflow_proto::v1::HealthRequest;
use std::path::{Path, PathBuf};

use super::common::Ca;
use tonic::Code;

const TOKEN: &str = "tls-test-token";

fn client_tls(ca: &Path, identity: Option<&(PathBuf, PathBuf)>) -> TlsConfig {
    TlsConfig {
        server_ca: Some(ca.to_path_buf()),
        client_cert: identity.map(|i| i.0.clone()),
        client_key: identity.map(|i| i.1.clone()),
        ..TlsConfig::default()
    }
}

async fn health(url: &str, token: Option<&str>, tls: &TlsConfig) -> Result<(), tonic::Status> {
    let tls = qatflow_node::tls::client(tls).unwrap();
    let channel = client::secure_channel(url, token, tls).unwrap();
    NodeClient::new(channel)
        .health(HealthRequest {})
        .await
        .map(|_| ())
}

#[test]
fn mutual_tls_refuses_clients_without_a_ca_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new(d, "ca");
    let server = ca.leaf(d, "server", &["localhost", "127.0.0.1"]);
    let good = ca.leaf(d, "client", &["workstation"]);
    let rogue = Ca::new(d, "rogue-ca").leaf(d, "rogue", &["workstation"]);
    std::fs::write(d.join("token"), TOKEN).unwrap();
    let config = NodeConfig::from_toml(&format!(
        "name = \"spark\"\nrole = \"spark\"\ndata_dir = {data:?}\n[server]\nlisten = \"127.0.0.1:0\"\n\
         [auth]\ntoken_file = {token:?}\n\
         [tls]\nserver_cert = {cert:?}\nserver_key = {key:?}\nclient_ca = {ca:?}\n",
        data = d.join("node").display().to_string(),
        token = d.join("token").display().to_string(),
        cert = server.0.display().to_string(),
        key = server.1.display().to_string(),
        ca = ca.pem.display().to_string(),
    ))
    .unwrap();

    qatflow_node::system(Some(2)).block_on(async {
        let node = qatflow_node::start(&config).await.unwrap();
        let url = format!("https://{}", node.addr);

        health(&url, Some(TOKEN), &client_tls(&ca.pem, Some(&good)))
            .await
            .expect("a client with the CA-signed certificate and the token is served");

        let no_token = health(&url, None, &client_tls(&ca.pem, Some(&good)))
            .await
            .unwrap_err();
        assert_eq!(no_token.code(), Code::Unauthenticated, "{no_token}");

        for (what, tls) in [
            ("no client certificate", client_tls(&ca.pem, None)),
            (
                "a certificate of another CA",
                client_tls(&ca.pem, Some(&rogue)),
            ),
        ] {
            // Refused in the TLS handshake, before any handler or the token check: the
            // client sees a transport error (the server's alert or its closing the
            // connection, depending on when TLS 1.3 tells the client), never an answer.
            let err = health(&url, Some(TOKEN), &tls).await.unwrap_err();
            let transport = std::error::Error::source(&err)
                .is_some_and(|s| s.downcast_ref::<tonic::transport::Error>().is_some());
            assert!(transport, "{what}: {err}");
            assert_ne!(err.code(), Code::Unauthenticated, "{what}: {err}");
        }

        let plain = client::node(&format!("http://{}", node.addr), Some(TOKEN))
            .unwrap()
            .health(HealthRequest {})
            .await
            .unwrap_err();
        assert_ne!(
            plain.code(),
            Code::Ok,
            "plain HTTP/2 to a TLS server: {plain}"
        );

        node.stop().await.unwrap();
    });
}

#[test]
fn a_missing_certificate_file_names_the_file_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-server.pem");
    let config = NodeConfig::from_toml(&format!(
        "name = \"spark\"\nrole = \"spark\"\ndata_dir = {data:?}\n[server]\nlisten = \"127.0.0.1:0\"\n\
         [tls]\nserver_cert = {cert:?}\nserver_key = {cert:?}\n",
        data = dir.path().join("node").display().to_string(),
        cert = missing.display().to_string(),
    ))
    .unwrap();
    let err = actix::System::new()
        .block_on(async { qatflow_node::start(&config).await.map(|_| ()) })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("missing-server.pem") && err.contains("tls.server_cert"),
        "{err}"
    );
}
