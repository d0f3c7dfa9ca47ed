//! HTTPS to upstreams: certificate verification, a private CA from `--upstream-ca-file`, and
//! HTTP/2 when the upstream offers it over ALPN.

mod common;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::{self, pki_types::PrivateKeyDer};

use common::*;

struct TlsUpstream {
    addr: SocketAddr,
    versions: Arc<Mutex<Vec<Version>>>,
}

/// A CA (as PEM) and an HTTPS upstream with a certificate for 127.0.0.1 that it signed, offering
/// the ALPN protocols given.
async fn tls_upstream(alpn: &[&[u8]]) -> (String, TlsUpstream) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let mut leaf_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf_params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &ca).unwrap();

    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone()], PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap())
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = TlsAcceptor::from(Arc::new(config));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = TlsUpstream { addr: listener.local_addr().unwrap(), versions: Arc::default() };
    let versions = upstream.versions.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, versions) = (acceptor.clone(), versions.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
                    let versions = versions.clone();
                    async move {
                        versions.lock().unwrap().push(request.version());
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        let streaming = String::from_utf8_lossy(&body).contains("\"stream\":true");
                        let response = if streaming {
                            Response::builder()
                                .header("content-type", "text/event-stream")
                                .body(Full::new(Bytes::from_static(b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n")))
                        } else {
                            Response::builder()
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from_static(b"{\"object\":\"chat.completion\",\"choices\":[]}")))
                        };
                        Ok::<_, Infallible>(response.unwrap())
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tls), service).await;
            });
        }
    });
    (ca.pem(), upstream)
}

fn route(addr: SocketAddr) -> String {
    route_yaml("secure", "", &[&format!("{{name: tls, baseUrl: \"https://{addr}/v1\"}}")])
}

#[tokio::test(flavor = "multi_thread")]
async fn speaks_http2_over_tls_to_an_upstream_that_offers_it() {
    let (ca, upstream) = tls_upstream(&[b"h2", b"http/1.1"]).await;
    let ca_file = temp_dir("tls").join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let sidecar = Sidecar::start_with(&route(upstream.addr), &["--upstream-ca-file", ca_file.to_str().unwrap()], &[]);

    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"secure"}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["object"], "chat.completion");
    let response = send(sidecar.api, "POST", "/v1/chat/completions", r#"{"model":"secure","stream":true}"#).await;
    assert_eq!(rest(&mut response.into_body()).await, "data: {\"choices\":[]}\n\ndata: [DONE]\n\n");
    assert_eq!(*upstream.versions.lock().unwrap(), [Version::HTTP_2, Version::HTTP_2]);
}

#[tokio::test(flavor = "multi_thread")]
async fn uses_http1_when_the_upstream_offers_only_that() {
    let (ca, upstream) = tls_upstream(&[b"http/1.1"]).await;
    let ca_file = temp_dir("tls").join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let sidecar = Sidecar::start_with(&route(upstream.addr), &["--upstream-ca-file", ca_file.to_str().unwrap()], &[]);
    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"secure"}"#).await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(*upstream.versions.lock().unwrap(), [Version::HTTP_11]);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_certificate_fails_the_attempt() {
    let (_, upstream) = tls_upstream(&[b"h2", b"http/1.1"]).await;
    let sidecar = Sidecar::start(&route(upstream.addr));
    let reply = post(sidecar.api, "/v1/chat/completions", r#"{"model":"secure"}"#).await;
    assert_eq!(reply.status, 502, "{}", reply.body);
    let attempt = &reply.json()["error"]["metadata"]["previous_errors"][0];
    assert_eq!(attempt["reason"], "connect");
    assert!(attempt["message"].as_str().unwrap().contains("UnknownIssuer"), "{attempt}");
    assert!(upstream.versions.lock().unwrap().is_empty());
}

#[test]
fn an_unreadable_ca_file_is_a_configuration_error() {
    let dir = temp_dir("tls-bad");
    let routes = dir.join("routes.yaml");
    std::fs::write(&routes, route("127.0.0.1:1".parse().unwrap())).unwrap();
    let not_pem = dir.join("ca.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    for ca in [not_pem.to_str().unwrap(), "/nonexistent/ca.pem"] {
        let (code, _, stderr) = run(&["sidecar", "-f", routes.to_str().unwrap(), "--upstream-ca-file", ca]);
        assert_eq!(code, Some(64), "{stderr}");
        assert!(stderr.contains("--upstream-ca-file: "), "{stderr}");
    }
}
