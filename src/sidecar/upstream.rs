//! Sending one attempt to an upstream: HTTP/1.1 over TCP (`h1.rs`), pooled HTTP/1.1 and HTTP/2
//! over TLS, or the in-process mock provider.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming};
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tokio::net::TcpStream;

use super::h1::{self, H1Body, Pool};
use super::transport::{BoxError, SendError, UPSTREAM_READ_BUFFER, error_chain};
use crate::config::{Format, MockOptions};
use crate::mock_provider::{MockStats, chat_completion, count_tokens, messages};

pub type HttpClient = Client<TimeoutConnector, Full<Bytes>>;

/// Where a target's attempts go.
#[derive(Clone, Debug)]
pub enum TargetClient {
    /// `https://`: hyper's pooled client, HTTP/2 where the upstream offers it.
    Http {
        client: Arc<HttpClient>,
        uri: Uri,
    },
    /// `http://`: HTTP/1.1, each connection driven by the request's own task.
    Plain {
        pool: Arc<Pool>,
        path: Uri,
        host: HeaderValue,
    },
    Mock {
        format: Format,
        options: Arc<MockOptions>,
        stats: Arc<MockStats>,
    },
}

impl TargetClient {
    /// Builds the upstream for a target's chat completions URL.
    pub fn http(clients: &Clients, url: Uri, connect_timeout: Duration) -> TargetClient {
        if url.scheme() == Some(&http::uri::Scheme::HTTP)
            && let Some((path, host, authority)) = h1::origin_form(&url)
        {
            return TargetClient::Plain { pool: clients.plain(authority, connect_timeout), path, host };
        }
        TargetClient::Http { client: clients.get(connect_timeout), uri: url }
    }

    /// Sends a request to the upstream's URL and waits for the response headers.
    pub async fn send(&self, mut request: Request<Full<Bytes>>) -> Result<Response<UpstreamBody>, SendError> {
        match self {
            TargetClient::Plain { pool, path, host } => {
                pool.send(request, path, host).await.map(|r| r.map(UpstreamBody::Plain))
            }
            TargetClient::Http { client, uri } => {
                *request.uri_mut() = uri.clone();
                client.request(request).await.map(|r| r.map(UpstreamBody::Http)).map_err(classify)
            }
            TargetClient::Mock { format, options, stats } => {
                let (parts, body) = request.into_parts();
                // Full<Bytes> holds the whole body; collecting it cannot fail or wait.
                let body = http_body_util::BodyExt::collect(body).await.map(|c| c.to_bytes()).unwrap_or_default();
                let response = match format {
                    Format::OpenAi => chat_completion(options, stats, &parts.headers, &body).await,
                    Format::Anthropic => messages(options, stats, &parts.headers, &body).await,
                };
                Ok(response.map(UpstreamBody::Mock))
            }
        }
    }
}

impl TargetClient {
    /// Sends a request to a URL beside the target's conversation URL: that URL with `suffix`
    /// appended (`/v1/messages` + `/count_tokens`).
    pub async fn send_beside(
        &self,
        suffix: &str,
        mut request: Request<Full<Bytes>>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let beside = |uri: &Uri| -> Result<Uri, SendError> {
            format!("{uri}{suffix}").parse().map_err(|e| SendError::Connect(format!("{uri}{suffix}: {e}")))
        };
        match self {
            TargetClient::Plain { pool, path, host } => {
                pool.send(request, &beside(path)?, host).await.map(|r| r.map(UpstreamBody::Plain))
            }
            TargetClient::Http { client, uri } => {
                *request.uri_mut() = beside(uri)?;
                client.request(request).await.map(|r| r.map(UpstreamBody::Http)).map_err(classify)
            }
            TargetClient::Mock { options, stats, .. } => {
                let (parts, body) = request.into_parts();
                let body = http_body_util::BodyExt::collect(body).await.map(|c| c.to_bytes()).unwrap_or_default();
                Ok(count_tokens(options, stats, &parts.headers, &body).await.map(UpstreamBody::Mock))
            }
        }
    }
}

fn classify(e: hyper_util::client::legacy::Error) -> SendError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(err) = source {
        if err.is::<ConnectTimeout>() {
            return SendError::ConnectTimeout;
        }
        source = err.source();
    }
    SendError::Connect(error_chain(&e))
}

/// A response body from either kind of upstream, without boxing the HTTP one.
pub enum UpstreamBody {
    Plain(H1Body),
    Http(Incoming),
    Mock(axum::body::Body),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Plain(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Http(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Mock(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Plain(b) => b.is_end_stream(),
            UpstreamBody::Http(b) => b.is_end_stream(),
            UpstreamBody::Mock(b) => b.is_end_stream(),
        }
    }
}

/// HTTP clients by connect timeout. A client owns a connection pool, so clients live across
/// configuration reloads and targets with the same connect timeout share one.
pub struct Clients {
    tls: rustls::ClientConfig,
    by_connect_timeout: Mutex<HashMap<Duration, Arc<HttpClient>>>,
    plain: Mutex<HashMap<(String, Duration), Arc<Pool>>>,
}

impl Clients {
    /// Clients that trust the Mozilla roots bundled in the binary, plus the PEM certificates in
    /// `extra_roots` (for providers behind a private CA).
    pub fn new(extra_roots: Option<&Path>) -> Result<Clients, String> {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = extra_roots {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{} holds no PEM certificate", path.display()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS configuration: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Clients { tls, by_connect_timeout: Mutex::default(), plain: Mutex::default() })
    }

    pub fn get(&self, connect_timeout: Duration) -> Arc<HttpClient> {
        let mut clients = self.by_connect_timeout.lock().unwrap_or_else(|e| e.into_inner());
        clients.entry(connect_timeout).or_insert_with(|| Arc::new(self.new_client(connect_timeout))).clone()
    }

    /// The pool of plain HTTP/1.1 connections to `authority` (`host:port`).
    pub fn plain(&self, authority: String, connect_timeout: Duration) -> Arc<Pool> {
        let mut pools = self.plain.lock().unwrap_or_else(|e| e.into_inner());
        pools.entry((authority, connect_timeout)).or_insert_with_key(|(a, t)| Pool::new(a.clone(), *t)).clone()
    }

    fn new_client(&self, connect_timeout: Duration) -> HttpClient {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        // ALPN offers h2 and http/1.1: HTTP/2 wherever the upstream supports it over TLS.
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(self.tls.clone())
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http);
        Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            // Answers are read as they stream; a small fixed buffer per connection keeps a thousand
            // open streams cheap (hyper would start at 8 KiB and grow).
            .http1_read_buf_exact_size(UPSTREAM_READ_BUFFER)
            .build(TimeoutConnector { inner: https, timeout: connect_timeout })
    }
}

/// Bounds TCP connect plus TLS handshake, and marks the failure so it is told apart from a refusal.
#[derive(Clone)]
pub struct TimeoutConnector {
    inner: HttpsConnector<HttpConnector>,
    timeout: Duration,
}

#[derive(Debug)]
struct ConnectTimeout;

impl std::fmt::Display for ConnectTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connect timeout")
    }
}

impl std::error::Error for ConnectTimeout {}

impl tower_service::Service<Uri> for TimeoutConnector {
    type Response = MaybeHttpsStream<TokioIo<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let connecting = self.inner.call(uri);
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, connecting).await {
                Ok(result) => result,
                Err(_) => Err(Box::new(ConnectTimeout) as BoxError),
            }
        })
    }
}
