//! Reaching a provider: one attempt ([`attempt`]: send, classify, hold-back), its stream relayed
//! to the caller ([`relay`]), and the clients it is sent with (here): HTTP/1.1 over TCP ([`h1`]),
//! pooled HTTP/1.1 and HTTP/2 over TLS, or the in-process mock provider; [`transport`] holds what
//! every client shares.

pub mod attempt;
pub mod h1;
pub mod relay;
pub mod transport;

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

use self::h1::{H1Body, Pool};
use self::transport::{BoxError, SendError, UPSTREAM_READ_BUFFER, error_chain};
use crate::config::{Format, MockOptions};
use crate::mock_provider::MockStats;

pub type HttpClient = Client<TimeoutConnector, Full<Bytes>>;
/// A client for requests forwarded as they are, their bodies streamed.
pub type ForwardClient = Client<TimeoutConnector, axum::body::Body>;

/// Where a target's attempts go: its conversation URL, and the other URLs under its base URL.
#[derive(Clone, Debug)]
pub enum TargetClient {
    /// `https://`: hyper's pooled client, HTTP/2 where the upstream offers it.
    Http {
        client: Arc<HttpClient>,
        conversation: Uri,
        /// The base URL, without a trailing slash.
        base: Arc<str>,
    },
    /// `http://`: HTTP/1.1, each connection driven by the request's own task.
    Plain {
        pool: Arc<Pool>,
        /// Origin-form, as the request line has it.
        conversation: Uri,
        /// The base URL's path, without a trailing slash.
        base_path: Arc<str>,
        host: HeaderValue,
    },
    /// The built-in fake provider, served in-process by its own router.
    Mock { router: axum::Router, conversation: Uri, base_path: &'static str },
}

impl TargetClient {
    /// Builds the upstream for a target's base URL and conversation URL.
    pub fn http(clients: &Clients, base: &str, conversation: Uri, connect_timeout: Duration) -> TargetClient {
        if conversation.scheme() == Some(&http::uri::Scheme::HTTP)
            && let Some((path, host, authority)) = h1::origin_form(&conversation)
        {
            let base_path =
                base.parse::<Uri>().map_or_else(|_| String::new(), |b| b.path().trim_end_matches('/').to_string());
            return TargetClient::Plain {
                pool: clients.plain(authority, connect_timeout),
                conversation: path,
                base_path: base_path.into(),
                host,
            };
        }
        TargetClient::Http {
            client: clients.get(connect_timeout),
            conversation,
            base: base.trim_end_matches('/').into(),
        }
    }

    /// The in-process fake provider speaking `format`, counting its requests in `stats`.
    pub fn mock(format: Format, options: Arc<MockOptions>, stats: Arc<MockStats>) -> TargetClient {
        let (base_path, conversation) = match format {
            Format::OpenAi => ("/v1", "/v1/chat/completions"),
            Format::Anthropic => ("", "/v1/messages"),
        };
        let router = crate::mock_provider::router(options, stats);
        TargetClient::Mock { router, conversation: Uri::from_static(conversation), base_path }
    }

    /// Sends a POST to the upstream's conversation URL, or with `under`, to that path under its
    /// base URL (`/embeddings`, `/v1/messages/count_tokens`), and waits for the response headers.
    /// One future for both: the request path moves it whole, so a wrapper would cost copies.
    pub async fn send(
        &self,
        under: Option<&str>,
        mut request: Request<Full<Bytes>>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let owned;
        let uri = match (under, self) {
            (Some(path), _) => {
                owned = self.uri_of(path)?;
                &owned
            }
            (None, TargetClient::Http { conversation, .. })
            | (None, TargetClient::Plain { conversation, .. })
            | (None, TargetClient::Mock { conversation, .. }) => conversation,
        };
        match self {
            TargetClient::Plain { pool, host, .. } => {
                pool.send(request, uri, host).await.map(|r| r.map(UpstreamBody::Plain))
            }
            TargetClient::Http { client, .. } => {
                *request.uri_mut() = uri.clone();
                client.request(request).await.map(|r| r.map(UpstreamBody::Http)).map_err(classify)
            }
            TargetClient::Mock { router, .. } => {
                *request.uri_mut() = uri.clone();
                Ok(call_mock(router, request.map(axum::body::Body::new)).await)
            }
        }
    }

    /// The URI of `path` (with any query) under the base URL, in the form the client sends.
    pub fn uri_of(&self, path: &str) -> Result<Uri, SendError> {
        let base: &str = match self {
            TargetClient::Http { base, .. } => base,
            TargetClient::Plain { base_path, .. } => base_path,
            TargetClient::Mock { base_path, .. } => base_path,
        };
        let uri = format!("{base}{path}");
        uri.parse().map_err(|e| SendError::Connect(format!("{uri}: {e}")))
    }

    /// Forwards a request as it is (any method, its body streamed) to `path` (with its query)
    /// under the base URL, with `forward`ing client for HTTP upstreams.
    pub async fn forward(
        &self,
        forward: &ForwardClient,
        path: &str,
        mut request: Request<axum::body::Body>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let uri = match self {
            TargetClient::Plain { host, base_path, .. } => {
                let uri = format!("http://{}{base_path}{path}", host.to_str().unwrap_or_default());
                uri.parse().map_err(|e| SendError::Connect(format!("{uri}: {e}")))?
            }
            _ => self.uri_of(path)?,
        };
        *request.uri_mut() = uri;
        match self {
            TargetClient::Mock { router, .. } => Ok(call_mock(router, request).await),
            _ => forward.request(request).await.map(|r| r.map(UpstreamBody::Http)).map_err(classify),
        }
    }
}

async fn call_mock(router: &axum::Router, request: Request<axum::body::Body>) -> Response<UpstreamBody> {
    use tower_service::Service;
    // The router is always ready, and its errors are infallible.
    let mut router = router.clone();
    match router.call(request).await {
        Ok(response) => response.map(UpstreamBody::Mock),
        Err(never) => match never {},
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
    forwarding: Mutex<HashMap<Duration, Arc<ForwardClient>>>,
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
        Ok(Clients { tls, by_connect_timeout: Mutex::default(), forwarding: Mutex::default(), plain: Mutex::default() })
    }

    pub fn get(&self, connect_timeout: Duration) -> Arc<HttpClient> {
        let mut clients = self.by_connect_timeout.lock().unwrap_or_else(|e| e.into_inner());
        clients.entry(connect_timeout).or_insert_with(|| Arc::new(self.new_client(connect_timeout))).clone()
    }

    /// The client for requests forwarded as they are (see [`TargetClient::forward`]).
    pub fn forwarding(&self, connect_timeout: Duration) -> Arc<ForwardClient> {
        let mut clients = self.forwarding.lock().unwrap_or_else(|e| e.into_inner());
        clients.entry(connect_timeout).or_insert_with(|| Arc::new(self.new_client(connect_timeout))).clone()
    }

    /// The pool of plain HTTP/1.1 connections to `authority` (`host:port`).
    pub fn plain(&self, authority: String, connect_timeout: Duration) -> Arc<Pool> {
        let mut pools = self.plain.lock().unwrap_or_else(|e| e.into_inner());
        pools.entry((authority, connect_timeout)).or_insert_with_key(|(a, t)| Pool::new(a.clone(), *t)).clone()
    }

    /// A connector for `http://` and `https://` URLs, trusting what upstream clients trust.
    pub fn connector(&self) -> HttpsConnector<HttpConnector> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        // ALPN offers h2 and http/1.1: HTTP/2 wherever the upstream supports it over TLS.
        hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(self.tls.clone())
            .https_or_http()
            .enable_all_versions()
            .wrap_connector(http)
    }

    fn new_client<B>(&self, connect_timeout: Duration) -> Client<TimeoutConnector, B>
    where
        B: Body + Send + 'static,
        B::Data: Send,
    {
        let https = self.connector();
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
