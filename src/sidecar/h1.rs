//! HTTP/1.1 to plain `http://` upstreams (model servers in the cluster, the benchmark's upstream),
//! with each connection driven by the task of the request that uses it.
//!
//! hyper's pooled client runs every connection in a task of its own and hands each request, its
//! response and each body frame across through channels: several task wake-ups per request. Here
//! the request's own task polls the connection while it waits for the response and while it reads
//! the body, and an idle connection waits in the pool unpolled, as nginx's upstream keep-alive does.
//! A connection that the upstream closed while idle is noticed when it is next taken, and the
//! request goes to another one; only a request that was never written is sent again.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming};
use hyper::client::conn::http1::{Builder, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::upstream::{BoxError, SendError, UPSTREAM_READ_BUFFER, error_chain};

/// How long an unused connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream; more are closed when returned.
const MAX_IDLE: usize = 1024;

/// The idle connections to one upstream (`host:port`), shared by every target that uses it with
/// the same connect timeout, across configuration reloads.
pub struct Pool {
    authority: String,
    connect_timeout: Duration,
    idle: Mutex<VecDeque<(Box<Conn>, Instant)>>,
    reaper: AtomicBool,
}

/// One connection: the handle requests are sent with, and the future that does its I/O. Boxed once
/// when connected, so that moving it between pool and requests copies a pointer.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// None once the connection has closed. Dropping it hands a request still queued on it back
    /// to its sender with an error, so nothing waits on a closed connection.
    driver: Option<Connection<TokioIo<TcpStream>, Full<Bytes>>>,
}

impl Conn {
    /// Does whatever I/O the connection has to do, registering the task's waker.
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(driver) = &mut self.driver
            && Pin::new(driver).poll(cx).is_ready()
        {
            self.driver = None;
        }
    }

    /// Ready to take a request; an error when the connection closed (a reused one may have).
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        self.drive(cx);
        if self.driver.is_none() {
            return Poll::Ready(Err("connection closed".into()));
        }
        self.sender.poll_ready(cx).map_err(|e| error_chain(&e))
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("authority", &self.authority).finish_non_exhaustive()
    }
}

impl Pool {
    pub fn new(authority: String, connect_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool { authority, connect_timeout, idle: Mutex::default(), reaper: AtomicBool::new(false) })
    }

    /// Sends `request` (origin-form URI, Host header set) and waits for the response headers.
    pub async fn send(self: &Arc<Self>, mut request: Request<Full<Bytes>>) -> Result<Response<H1Body>, SendError> {
        loop {
            let (mut conn, reused) = match self.take() {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            if let Err(e) = poll_fn(|cx| conn.poll_ready(cx)).await {
                if reused {
                    continue;
                }
                return Err(SendError::Connect(e));
            }
            let result = {
                let mut sending = pin!(conn.sender.try_send_request(request));
                poll_fn(|cx| {
                    conn.drive(cx);
                    sending.as_mut().poll(cx)
                })
                .await
            };
            match result {
                Ok(response) => {
                    let pool = Arc::downgrade(self);
                    return Ok(response.map(|incoming| H1Body { incoming, conn: Some(conn), pool }));
                }
                Err(mut e) => match e.take_message() {
                    // Never written: the idle connection had closed; try the next.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(SendError::Connect(error_chain(e.error()))),
                },
            }
        }
    }

    async fn connect(&self) -> Result<Box<Conn>, SendError> {
        let connecting = async {
            let tcp = TcpStream::connect(self.authority.as_str())
                .await
                .map_err(|e| SendError::Connect(format!("tcp connect error: {e}")))?;
            // Requests and streamed events are small writes that must leave at once.
            let _ = tcp.set_nodelay(true);
            let (sender, driver) = Builder::new()
                .read_buf_exact_size(Some(UPSTREAM_READ_BUFFER))
                .handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| SendError::Connect(error_chain(&e)))?;
            Ok(Box::new(Conn { sender, driver: Some(driver) }))
        };
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(result) => result,
            Err(_) => Err(SendError::ConnectTimeout),
        }
    }

    /// The most recently used idle connection that is not too old.
    fn take(&self) -> Option<Box<Conn>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let (conn, since) = idle.pop_back()?;
        if since.elapsed() > IDLE_TIMEOUT {
            // The newest is the youngest: all of them are too old.
            idle.clear();
            return None;
        }
        Some(conn)
    }

    fn put(self: &Arc<Self>, conn: Box<Conn>) {
        let now = Instant::now();
        {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            while idle.front().is_some_and(|(_, since)| now.duration_since(*since) > IDLE_TIMEOUT) {
                idle.pop_front();
            }
            if idle.len() >= MAX_IDLE {
                return;
            }
            idle.push_back((conn, now));
        }
        self.start_reaper();
    }

    /// Closes connections that stayed idle too long even when no request comes to notice them;
    /// runs only while the pool holds connections.
    fn start_reaper(self: &Arc<Self>) {
        if self.reaper.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.reaper.store(false, Ordering::Release);
            return;
        };
        let pool: Weak<Pool> = Arc::downgrade(self);
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(IDLE_TIMEOUT / 3).await;
                let Some(pool) = pool.upgrade() else { return };
                let mut idle = pool.idle.lock().unwrap_or_else(|e| e.into_inner());
                idle.retain(|(_, since)| since.elapsed() <= IDLE_TIMEOUT);
                if idle.is_empty() {
                    pool.reaper.store(false, Ordering::Release);
                    return;
                }
            }
        });
    }
}

/// The origin-form URI and Host header of a plain `http://` URL, as HTTP/1.1 sends them.
pub fn origin_form(url: &Uri) -> Option<(Uri, HeaderValue, String)> {
    let authority = url.authority()?;
    let path = url.path_and_query().map_or("/", |p| p.as_str()).parse().ok()?;
    let host = HeaderValue::from_str(authority.as_str()).ok()?;
    let port = authority.port_u16().unwrap_or(80);
    // host() keeps an IPv6 address's brackets, as connecting by "host:port" needs them.
    Some((path, host, format!("{}:{port}", authority.host())))
}

/// Sets the Host header that HTTP/1.1 requires.
pub fn set_host(request: &mut Request<Full<Bytes>>, host: &HeaderValue) {
    request.headers_mut().insert(HOST, host.clone());
}

/// A response body that drives its connection while it is read, and gives the connection back to
/// the pool once the body has ended. Dropped before the end, it closes the connection.
pub struct H1Body {
    incoming: Incoming,
    conn: Option<Box<Conn>>,
    pool: Weak<Pool>,
}

impl H1Body {
    fn release(&mut self) {
        if let Some(conn) = self.conn.take()
            && conn.driver.is_some()
            && let Some(pool) = self.pool.upgrade()
        {
            pool.put(conn);
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(conn) = &mut this.conn {
            conn.drive(cx);
        }
        let frame = ready!(Pin::new(&mut this.incoming).poll_frame(cx));
        match &frame {
            None => this.release(),
            Some(Ok(_)) if this.incoming.is_end_stream() => this.release(),
            Some(Err(_)) => this.conn = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_become_origin_form_host_and_connect_address() {
        let cases = [
            ("http://127.0.0.1:8000/v1/chat/completions", "/v1/chat/completions", "127.0.0.1:8000", "127.0.0.1:8000"),
            (
                "http://vllm.models.svc/v1/chat/completions?x=1",
                "/v1/chat/completions?x=1",
                "vllm.models.svc",
                "vllm.models.svc:80",
            ),
            ("http://[::1]:9/chat/completions", "/chat/completions", "[::1]:9", "[::1]:9"),
        ];
        for (url, path, host, address) in cases {
            let (p, h, a) = origin_form(&url.parse().unwrap()).unwrap();
            assert_eq!((p.to_string().as_str(), h.to_str().unwrap(), a.as_str()), (path, host, address), "{url}");
            assert!(a.parse::<std::net::SocketAddr>().is_ok() || a.starts_with("vllm"), "{a}");
        }
    }
}
