//! The sidecar's client of the operator's budget ledger: JSON calls over one long-lived HTTP/2
//! connection (TLS, the ledger's CA), authenticated with the pod's projected ServiceAccount
//! token, following the leader when a replica that does not lead says where it is.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::budget::protocol::Refused;
use crate::config::LedgerEndpoint;
use crate::metrics::{Counter, Histogram};

/// The header a replica that does not lead names the leader's URL in.
pub const LEADER_HEADER: &str = "x-sideyard-ledger-leader";
/// How long one call may take, connecting included: past it the ledger counts as unreachable.
/// A busy ledger answers after its next status write, up to two write intervals (2 s) later.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// A projected token is rotated by the kubelet well before it expires; reading it this often
/// follows the rotation.
const TOKEN_REFRESH: Duration = Duration::from_secs(60);
const MAX_ANSWER_BYTES: usize = 1 << 20;
/// Interval and timeout of HTTP/2 pings on the connection.
const KEEP_ALIVE: Duration = Duration::from_secs(10);

/// Why a call got no answer to use.
#[derive(Debug)]
pub enum CallError {
    /// The ledger answered with a refusal (402, 429, 404).
    Refused(Refused),
    /// No answer: connection, TLS, timeout, or a ledger that cannot serve now (503).
    Unreachable(String),
    /// The ledger rejected the call itself (401, 403, 400): no retry will help.
    Rejected { status: u16, message: String },
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Refused(r) => write!(f, "refused: {r:?}"),
            CallError::Unreachable(m) => write!(f, "unreachable: {m}"),
            CallError::Rejected { status, message } => write!(f, "rejected ({status}): {message}"),
        }
    }
}

/// The ledger calls, for metric labels.
pub const CALLS: [&str; 6] = ["lease", "report", "reserve", "settle", "debt", "holdings"];

/// Per call: outcomes and round trips.
#[derive(Default)]
pub struct CallMetrics {
    /// By call, then `ok`, `refused`, `unreachable`, `rejected`.
    pub results: [[Counter; 4]; CALLS.len()],
    pub round_trip: [Histogram; CALLS.len()],
}

pub const RESULTS: [&str; 4] = ["ok", "refused", "unreachable", "rejected"];

pub struct LedgerClient {
    pub endpoint: LedgerEndpoint,
    /// The Service's authority (`host:port`), dialled unless a leader was named.
    authority: String,
    /// The name the certificate is checked against, whoever is dialled.
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    token_file: PathBuf,
    token: Mutex<Option<(Instant, HeaderValue)>>,
    /// The leader's authority, once a replica named it; forgotten when it fails.
    leader: Mutex<Option<String>>,
    /// The open connection and the authority it goes to.
    connection: tokio::sync::Mutex<Option<(String, SendRequest<Full<Bytes>>)>>,
    pub metrics: Arc<CallMetrics>,
}

impl LedgerClient {
    pub fn new(endpoint: LedgerEndpoint, token_file: PathBuf, metrics: Arc<CallMetrics>) -> Result<Self, String> {
        let uri: Uri = endpoint.url.parse().map_err(|e| format!("ledger URL {:?}: {e}", endpoint.url))?;
        if uri.scheme_str() != Some("https") {
            return Err(format!("ledger URL {:?}: must be https://", endpoint.url));
        }
        let host = uri.host().ok_or_else(|| format!("ledger URL {:?}: no host", endpoint.url))?;
        let port = uri.port_u16().unwrap_or(443);
        let bare = host.trim_start_matches('[').trim_end_matches(']').to_string();
        let server_name =
            ServerName::try_from(bare).map_err(|e| format!("ledger URL {:?}: host: {e}", endpoint.url))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(endpoint.ca_bundle.as_bytes()) {
            let cert = cert.map_err(|e| format!("ledger CA bundle: {e}"))?;
            roots.add(cert).map_err(|e| format!("ledger CA bundle: {e}"))?;
        }
        if roots.is_empty() {
            return Err("ledger CA bundle: no certificate".into());
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(LedgerClient {
            authority: format!("{host}:{port}"),
            endpoint,
            server_name,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            token_file,
            token: Mutex::default(),
            leader: Mutex::default(),
            connection: tokio::sync::Mutex::default(),
            metrics,
        })
    }

    /// Calls `POST /ledger/v1/<call>` with `body`, following the leader once if told where it is.
    pub async fn call<T: DeserializeOwned>(&self, call: usize, body: &impl Serialize) -> Result<T, CallError> {
        let started = Instant::now();
        let result = self.post(&format!("/ledger/v1/{}", CALLS[call]), body).await.and_then(|bytes| {
            serde_json::from_slice(&bytes).map_err(|e| CallError::Unreachable(format!("unreadable answer: {e}")))
        });
        let outcome = match &result {
            Ok(_) => 0,
            Err(CallError::Refused(_)) => 1,
            Err(CallError::Unreachable(_)) => 2,
            Err(CallError::Rejected { .. }) => 3,
        };
        self.metrics.results[call][outcome].inc();
        self.metrics.round_trip[call].observe(started.elapsed());
        result
    }

    /// `POST <path>` with `body` in JSON: the answer's body, following the leader once if told
    /// where it is.
    pub async fn post(&self, path: &str, body: &impl Serialize) -> Result<Bytes, CallError> {
        let body = Bytes::from(serde_json::to_vec(body).unwrap_or_default());
        let response = self.request(Method::POST, path, body).await?;
        match tokio::time::timeout(CALL_TIMEOUT, read_answer(response.into_body())).await {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(e)) => Err(self.failed(e).await),
            Err(_) => Err(self.failed(format!("no answer within {CALL_TIMEOUT:?}")).await),
        }
    }

    /// Opens `GET <path>` and hands back the body as it streams, once the answer is 200.
    pub async fn stream(&self, path: &str) -> Result<Incoming, CallError> {
        Ok(self.request(Method::GET, path, Bytes::new()).await?.into_body())
    }

    /// Sends a request and waits for a 200's head, following the leader once if told where it is.
    async fn request(&self, method: Method, path: &str, body: Bytes) -> Result<http::Response<Incoming>, CallError> {
        let mut result = self.request_once(&method, path, body.clone()).await;
        if let Err(Redirect::Leader) = result {
            result = self.request_once(&method, path, body).await;
        }
        result.map_err(|r| match r {
            Redirect::Leader => CallError::Unreachable("the ledger's leader moved twice during one call".into()),
            Redirect::Failed(e) => e,
        })
    }

    async fn request_once(
        &self,
        method: &Method,
        path: &str,
        body: Bytes,
    ) -> Result<http::Response<Incoming>, Redirect> {
        let token = self.token().map_err(|e| Redirect::Failed(CallError::Rejected { status: 401, message: e }))?;
        let attempt = async {
            let (dialled, mut sender) = self.connect().await?;
            let request = Request::builder()
                .method(method.clone())
                .uri(format!("https://{}{path}", self.authority))
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::AUTHORIZATION, token)
                .body(Full::new(body))
                .map_err(|e| e.to_string())?;
            let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((dialled, response))
        };
        let (dialled, response) = match tokio::time::timeout(CALL_TIMEOUT, attempt).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) => return Err(Redirect::Failed(self.failed(e).await)),
            Err(_) => return Err(Redirect::Failed(self.failed(format!("no answer within {CALL_TIMEOUT:?}")).await)),
        };
        if response.status().is_success() {
            return Ok(response);
        }
        let (parts, incoming) = response.into_parts();
        let bytes = match tokio::time::timeout(CALL_TIMEOUT, read_answer(incoming)).await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => return Err(Redirect::Failed(self.failed(e).await)),
            Err(_) => return Err(Redirect::Failed(self.failed(format!("no answer within {CALL_TIMEOUT:?}")).await)),
        };
        // A replica that does not lead names the leader: remembered for every later call, and
        // this call goes there at once, unless it was already sent there (a leader that no
        // longer leads is a real failure). Calls in flight together are each redirected.
        if let Some(leader) = parts.headers.get(LEADER_HEADER).and_then(|v| v.to_str().ok())
            && let Some(authority) = leader.parse::<Uri>().ok().and_then(|u| u.authority().map(|a| a.to_string()))
        {
            let redirect = authority != dialled;
            *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = Some(authority);
            if redirect {
                return Err(Redirect::Leader);
            }
        }
        Err(Redirect::Failed(error_of(parts.status, &bytes)))
    }

    /// Forgets the connection (and a leader that failed) after a failure.
    async fn failed(&self, message: String) -> CallError {
        *self.connection.lock().await = None;
        let leader = self.leader.lock().unwrap_or_else(|e| e.into_inner()).take();
        let at = leader.unwrap_or_else(|| self.authority.clone());
        CallError::Unreachable(format!("{at}: {message}"))
    }

    /// The open HTTP/2 connection to the leader (or the Service), opened if needed, and the
    /// authority it goes to.
    async fn connect(&self) -> Result<(String, SendRequest<Full<Bytes>>), String> {
        let target = self.leader.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let target = target.unwrap_or_else(|| self.authority.clone());
        let mut connection = self.connection.lock().await;
        if let Some((to, sender)) = connection.as_ref()
            && *to == target
            && !sender.is_closed()
        {
            return Ok((target, sender.clone()));
        }
        let tcp = tokio::net::TcpStream::connect(&target).await.map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let tls = self.tls.connect(self.server_name.clone(), tcp).await.map_err(|e| format!("TLS: {e}"))?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err("the ledger did not agree to HTTP/2".into());
        }
        // Pings find a peer that vanished without closing, which a long-lived stream would
        // otherwise wait on forever.
        let (sender, driver) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(KEEP_ALIVE)
            .keep_alive_timeout(KEEP_ALIVE)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP/2: {e}"))?;
        tokio::spawn(driver);
        *connection = Some((target.clone(), sender.clone()));
        Ok((target, sender))
    }

    /// `Bearer <token>` from the token file, re-read as the kubelet rotates it.
    fn token(&self) -> Result<HeaderValue, String> {
        let mut cached = self.token.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((read, value)) = cached.as_ref()
            && read.elapsed() < TOKEN_REFRESH
        {
            return Ok(value.clone());
        }
        let file = &self.token_file;
        let token = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read the ledger token {}: {e}", file.display()))?;
        let mut value = HeaderValue::try_from(format!("Bearer {}", token.trim()))
            .map_err(|_| format!("the ledger token {} is not a header value", file.display()))?;
        value.set_sensitive(true);
        *cached = Some((Instant::now(), value.clone()));
        Ok(value)
    }
}

/// A whole (small) answer body.
async fn read_answer(body: Incoming) -> Result<Bytes, String> {
    Ok(Limited::new(body, MAX_ANSWER_BYTES).collect().await.map_err(|e| format!("reading the answer: {e}"))?.to_bytes())
}

enum Redirect {
    /// Told where the leader is: call again.
    Leader,
    Failed(CallError),
}

/// The ledger's error body, `{"error": {"message", "code", "refusal"?}}`, as a [`CallError`]:
/// each part read on its own, so that a refusal counts whatever else the body holds.
fn error_of(status: StatusCode, body: &[u8]) -> CallError {
    // Any JSON may come back, a bare number too: read it without indexing that could panic.
    let error =
        serde_json::from_slice::<serde_json::Value>(body).ok().and_then(|mut v| v.get_mut("error").map(|e| e.take()));
    let refusal = error.as_ref().and_then(|e| serde_json::from_value::<Refused>(e["refusal"].clone()).ok());
    if let Some(refusal) = refusal {
        return CallError::Refused(refusal);
    }
    let message =
        error.as_ref().and_then(|e| e["message"].as_str()).map_or_else(|| format!("HTTP {status}"), String::from);
    match status.as_u16() {
        401 | 403 | 400 | 413 => CallError::Rejected { status: status.as_u16(), message },
        _ => CallError::Unreachable(format!("HTTP {status}: {message}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_errors_become_refusals_rejections_or_unreachability() {
        let refusal = br#"{"error":{"message":"m","code":"insufficient_credits","refusal":{"reason":"insufficientCredits","remaining":5}}}"#;
        assert!(matches!(
            error_of(StatusCode::PAYMENT_REQUIRED, refusal),
            CallError::Refused(Refused::InsufficientCredits { remaining: 5, budget: None })
        ));
        let forbidden = br#"{"error":{"message":"another namespace","code":"forbidden"}}"#;
        assert!(matches!(
            error_of(StatusCode::FORBIDDEN, forbidden),
            CallError::Rejected { status: 403, message } if message == "another namespace"
        ));
        assert!(matches!(error_of(StatusCode::SERVICE_UNAVAILABLE, b"<html>"), CallError::Unreachable(_)));
    }

    mod properties {
        use super::*;
        use crate::providers::arbitrary::{json, mutated};
        use proptest::prelude::*;

        /// Error bodies as the ledger writes them, and whatever a proxy in between might.
        fn body() -> impl Strategy<Value = Vec<u8>> {
            let refusal = prop_oneof![
                (0..u64::MAX).prop_map(|r| serde_json::json!({"reason": "insufficientCredits", "remaining": r})),
                Just(serde_json::json!({"reason": "unknownLease"})),
                json(),
            ];
            let shaped = (refusal, json()).prop_map(|(refusal, message)| {
                serde_json::to_vec(&serde_json::json!({"error": {"message": message, "code": "x", "refusal": refusal}}))
                    .unwrap_or_default()
            });
            let either = prop_oneof![Just(false), Just(true)];
            let body = (shaped, either).prop_flat_map(
                |(bytes, bend)| {
                    if bend { mutated(bytes).boxed() } else { Just(bytes).boxed() }
                },
            );
            prop_oneof![body, prop::collection::vec(any::<u8>(), 0..64)]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn any_answer_is_a_call_error_and_only_a_refusal_is_a_refusal(status in 100u16..600, body in body()) {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
                let parsed = serde_json::from_slice::<serde_json::Value>(&body).ok();
                let refusal = parsed.as_ref().and_then(|v| serde_json::from_value::<Refused>(v["error"]["refusal"].clone()).ok());
                match error_of(status, &body) {
                    CallError::Refused(r) => prop_assert_eq!(Some(r), refusal),
                    CallError::Rejected { status, .. } => prop_assert!([400, 401, 403, 413].contains(&status)),
                    CallError::Unreachable(_) => prop_assert!(refusal.is_none()),
                }
            }
        }
    }
}
