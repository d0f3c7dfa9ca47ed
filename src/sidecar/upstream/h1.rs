//! HTTP/1.1 to plain `http://` upstreams (model servers in the cluster, the benchmark's upstream):
//! a small client for the one exchange the proxy makes, a POST with a known length and a response
//! read as it arrives.
//!
//! The request's own task writes the request and reads the response from the socket: no
//! connection task, no channels, no per-connection header buffer (what hyper's client costs per
//! open stream: see docs/benchmarks.md). The response head is parsed with httparse; the body is
//! framed by Content-Length, chunked encoding, or the end of the connection, and each read is
//! handed on as it comes, without waiting for more. Idle connections wait in a LIFO pool; one the
//! upstream closed (or sent anything on) while idle is dropped when taken, before a request is
//! written to it.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io::{ErrorKind, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::transport::{BoxError, SendError, UPSTREAM_READ_BUFFER};

/// How long an unused connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per upstream; more are closed when returned.
const MAX_IDLE: usize = 1024;
/// The largest response head accepted, and the most header fields.
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// The longest chunk-size line (with extensions) or trailer line accepted.
const MAX_LINE: usize = 4096;

/// The idle connections to one upstream (`host:port`), shared by every target that uses it with
/// the same connect timeout, across configuration reloads.
pub struct Pool {
    authority: String,
    connect_timeout: Duration,
    idle: Mutex<VecDeque<(Conn, Instant)>>,
    reaper: AtomicBool,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("authority", &self.authority).finish_non_exhaustive()
    }
}

/// One connection and the bytes read from it but not used yet.
struct Conn {
    tcp: TcpStream,
    buf: BytesMut,
}

impl Conn {
    /// Reads more into `buf`: the number of bytes, 0 at the end of the stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        loop {
            ready!(self.tcp.poll_read_ready(cx))?;
            if self.buf.capacity() - self.buf.len() < UPSTREAM_READ_BUFFER / 4 {
                self.buf.reserve(UPSTREAM_READ_BUFFER);
            }
            match self.tcp.try_read_buf(&mut self.buf) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
                result => return Poll::Ready(result),
            }
        }
    }

    /// Marks the socket as read dry when it goes idle with its response read in full, so that
    /// [`Conn::is_usable`] learns of anything arriving later from the runtime's readiness events
    /// instead of a `recv` per request. The runtime keeps a seen end of stream (`READ_CLOSED`)
    /// whatever this says, and ignores it if an event came in since readiness was last read.
    fn mark_read_dry(&self) {
        let _ = self.tcp.try_io(tokio::io::Interest::READABLE, || Err::<(), _>(ErrorKind::WouldBlock.into()));
    }

    /// An idle connection can take a request: the upstream has neither closed it nor sent
    /// anything on it. Only a socket that became readable while idle is probed with a read.
    fn is_usable(&self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if self.tcp.poll_read_ready(&mut cx).is_pending() {
            return true;
        }
        let mut probe = [0u8; 1];
        matches!(self.tcp.try_read(&mut probe), Err(e) if e.kind() == ErrorKind::WouldBlock)
    }

    /// Reads and parses the response head, skipping informational (1xx) responses.
    async fn read_head(&mut self) -> Result<(Response<()>, Framing, bool), HeadError> {
        let mut received = false;
        loop {
            if !self.buf.is_empty() {
                received = true;
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut parsed = httparse::Response::new(&mut fields);
                let answered = |message: String| HeadError { message, received: true };
                match parsed.parse(&self.buf) {
                    Ok(httparse::Status::Complete(len)) => {
                        let head = head_of(&parsed, &self.buf[..len]).map_err(answered)?;
                        self.buf.advance(len);
                        if let Some(head) = head {
                            return Ok(head);
                        }
                        continue;
                    }
                    Ok(httparse::Status::Partial) if self.buf.len() > MAX_HEAD => {
                        return Err(answered(format!("response head larger than {} KiB", MAX_HEAD / 1024)));
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(e) => return Err(answered(format!("invalid HTTP response: {e}"))),
                }
            }
            match poll_fn(|cx| self.poll_fill(cx)).await {
                Ok(0) => {
                    return Err(HeadError {
                        message: "connection closed before the response headers".into(),
                        received,
                    });
                }
                Ok(_) => {}
                Err(e) => return Err(HeadError { message: format!("read error: {e}"), received }),
            }
        }
    }
}

/// Why no response head was read, and whether any byte of an answer had arrived.
struct HeadError {
    message: String,
    received: bool,
}

/// How the response body ends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes the connection.
    Close,
    Done,
}

/// Where a chunked body's decoding is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

/// The response, its framing and whether the connection can be used again; None for a 1xx.
fn head_of(parsed: &httparse::Response<'_, '_>, raw: &[u8]) -> Result<Option<(Response<()>, Framing, bool)>, String> {
    let code = parsed.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| format!("invalid HTTP status {code}"))?;
    if status.is_informational() {
        return Ok(None);
    }
    // One copy of the head that every value shares, rather than an allocation per value.
    let shared = Bytes::copy_from_slice(raw);
    let offset = |field: &[u8]| field.as_ptr() as usize - raw.as_ptr() as usize;
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    for field in parsed.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| format!("invalid response header name {:?}", field.name))?;
        let start = offset(field.value);
        let value = HeaderValue::from_maybe_shared(shared.slice(start..start + field.value.len()))
            .map_err(|_| format!("invalid value in response header {:?}", field.name))?;
        headers.append(name, value);
    }
    let mut keep_alive = parsed.version == Some(1)
        && !headers.get_all(CONNECTION).iter().any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    let framing = if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Framing::Done
    } else if let Some(coding) = headers.get_all(TRANSFER_ENCODING).iter().next_back() {
        // Chunked must be the last coding; otherwise the body runs to the end of the connection.
        if coding
            .as_bytes()
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|c| c.trim_ascii().eq_ignore_ascii_case(b"chunked"))
        {
            Framing::Chunked(Chunk::Size)
        } else {
            Framing::Close
        }
    } else if let Some(length) = headers.get(CONTENT_LENGTH) {
        let length = std::str::from_utf8(length.as_bytes())
            .ok()
            .and_then(|l| l.trim().parse::<u64>().ok())
            .ok_or_else(|| format!("invalid Content-Length {length:?}"))?;
        let first = headers.get(CONTENT_LENGTH).map(|v| v.as_bytes().trim_ascii());
        if headers.get_all(CONTENT_LENGTH).iter().any(|other| Some(other.as_bytes().trim_ascii()) != first) {
            return Err("conflicting Content-Length headers".into());
        }
        Framing::Length(length)
    } else {
        Framing::Close
    };
    if framing == Framing::Close {
        keep_alive = false;
    }
    let mut response = Response::new(());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    Ok(Some((response, framing, keep_alive)))
}

impl Pool {
    pub fn new(authority: String, connect_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool { authority, connect_timeout, idle: Mutex::default(), reaper: AtomicBool::new(false) })
    }

    /// Sends `request` to `path` (origin-form) with the Host header `host`, and waits for the
    /// response headers. The request's own URI is not used.
    pub async fn send(
        self: &Arc<Self>,
        request: Request<Full<Bytes>>,
        path: &Uri,
        host: &HeaderValue,
    ) -> Result<Response<H1Body>, SendError> {
        let (parts, body) = request.into_parts();
        // A Full body is one frame in memory: collecting it takes it out without copying.
        let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
        let message = encode(path, host, &parts.headers, &body);
        let (mut conn, mut reused) = match self.take() {
            Some(conn) => (conn, true),
            None => (self.connect().await?, false),
        };
        let head = loop {
            let head = match conn.tcp.write_all(&message).await {
                Ok(()) => conn.read_head().await,
                Err(e) => Err(HeadError { message: format!("write error: {e}"), received: false }),
            };
            match head {
                // An upstream may close an idle connection at any time (HTTP/1.1 allows it
                // without `connection: close`), and the close can cross the request on the wire:
                // nothing of an answer came, so the upstream never took the request. A new
                // connection gets it, once.
                Err(e) if reused && !e.received => {
                    conn = self.connect().await?;
                    reused = false;
                }
                head => break head,
            }
        };
        let (response, framing, keep_alive) = head.map_err(|e| SendError::Connect(e.message))?;
        let pool = Arc::downgrade(self);
        Ok(response.map(|()| H1Body { conn: Some(conn), framing, keep_alive, pool }))
    }

    async fn connect(&self) -> Result<Conn, SendError> {
        let connecting = async {
            let tcp = TcpStream::connect(self.authority.as_str())
                .await
                .map_err(|e| SendError::Connect(format!("tcp connect error: {e}")))?;
            // Requests and streamed events are small writes that must leave at once.
            let _ = tcp.set_nodelay(true);
            Ok(Conn { tcp, buf: BytesMut::new() })
        };
        match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(result) => result,
            Err(_) => Err(SendError::ConnectTimeout),
        }
    }

    /// The most recently used idle connection that is young enough and still open.
    fn take(&self) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((conn, since)) = idle.pop_back() {
            if since.elapsed() > IDLE_TIMEOUT {
                // The newest is the youngest: all of them are too old.
                idle.clear();
                return None;
            }
            if conn.is_usable() {
                return Some(conn);
            }
        }
        None
    }

    fn put(self: &Arc<Self>, conn: Conn) {
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

/// The request as written: a POST with its Host and length; those and the hop-by-hop framing
/// headers are the client's, whatever `headers` says.
fn encode(uri: &Uri, host: &HeaderValue, headers: &HeaderMap, body: &Bytes) -> Vec<u8> {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = Vec::with_capacity(64 + path.len() + headers.len() * 48 + body.len());
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        if name == HOST || name == CONTENT_LENGTH || name == TRANSFER_ENCODING || name == CONNECTION {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    // Writing into a Vec cannot fail.
    let _ = write!(out, "content-length: {}\r\n\r\n", body.len());
    out.extend_from_slice(body);
    out
}

/// The origin-form URI and Host header of a plain `http://` URL, and the `host:port` to connect to.
pub fn origin_form(url: &Uri) -> Option<(Uri, HeaderValue, String)> {
    let authority = url.authority()?;
    let path = url.path_and_query().map_or("/", |p| p.as_str()).parse().ok()?;
    let host = HeaderValue::from_str(authority.as_str()).ok()?;
    let port = authority.port_u16().unwrap_or(80);
    // host() keeps an IPv6 address's brackets, as connecting by "host:port" needs them.
    Some((path, host, format!("{}:{port}", authority.host())))
}

/// A response body read from its connection as it arrives. The connection goes back to the pool
/// once the body has ended cleanly; a body dropped before its end closes it.
pub struct H1Body {
    conn: Option<Conn>,
    framing: Framing,
    keep_alive: bool,
    pool: Weak<Pool>,
}

impl H1Body {
    fn finish(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            // Bytes after the body mean the upstream does not frame its messages as it says.
            && conn.buf.is_empty()
            && let Some(pool) = self.pool.upgrade()
        {
            conn.mark_read_dry();
            pool.put(conn);
        }
    }

    fn fail(&mut self, message: String) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.framing = Framing::Done;
        self.conn = None;
        Poll::Ready(Some(Err(Box::new(std::io::Error::other(message)))))
    }

    /// The next data, or None when the body has ended; Pending after asking the socket for more.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else { return Poll::Ready(None) };
            // What the buffer already holds first.
            match self.framing {
                Framing::Done | Framing::Length(0) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Framing::Length(remaining) if !conn.buf.is_empty() => {
                    let n = remaining.min(conn.buf.len() as u64) as usize;
                    let data = conn.buf.split_to(n).freeze();
                    self.framing = Framing::Length(remaining - n as u64);
                    if remaining == n as u64 {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Close if !conn.buf.is_empty() => {
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Framing::Chunked(state) => match decode_chunk(&mut conn.buf, state) {
                    Ok(Decoded::Data(data, next)) => {
                        self.framing = Framing::Chunked(next);
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Ok(Decoded::Step(next)) => {
                        self.framing = Framing::Chunked(next);
                        continue;
                    }
                    Ok(Decoded::End) => {
                        self.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => {}
                    Err(message) => return self.fail(message),
                },
                Framing::Length(_) | Framing::Close => {}
            }
            // Then the socket.
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if self.framing == Framing::Close => {
                    self.framing = Framing::Done;
                    self.conn = None;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    let place = match self.framing {
                        Framing::Length(left) => format!("with {left} bytes of the response body to come"),
                        Framing::Chunked(Chunk::Size) => "during a chunk size line".into(),
                        Framing::Chunked(Chunk::Trailers) => "during the trailers".into(),
                        _ => "in the middle of a chunk".into(),
                    };
                    return self.fail(format!("connection closed {place}"));
                }
                Ok(_) => {}
                Err(e) => return self.fail(format!("read error: {e}")),
            }
        }
    }
}

enum Decoded {
    Data(Bytes, Chunk),
    Step(Chunk),
    End,
    NeedMore,
}

/// One step of chunked decoding over what `buf` holds.
fn decode_chunk(buf: &mut BytesMut, state: Chunk) -> Result<Decoded, String> {
    match state {
        Chunk::Size => {
            let Some(end) = memchr::memchr(b'\n', buf) else {
                return if buf.len() > MAX_LINE {
                    Err("chunk size line too long".into())
                } else {
                    Ok(Decoded::NeedMore)
                };
            };
            let line = &buf[..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let digits = line.split(|&b| b == b';').next().unwrap_or_default().trim_ascii();
            let size = std::str::from_utf8(digits)
                .ok()
                .filter(|d| !d.is_empty() && d.len() <= 15)
                .and_then(|d| u64::from_str_radix(d, 16).ok())
                .ok_or_else(|| format!("invalid chunk size {:?}", String::from_utf8_lossy(digits)))?;
            buf.advance(end + 1);
            Ok(Decoded::Step(if size == 0 { Chunk::Trailers } else { Chunk::Data(size) }))
        }
        Chunk::Data(remaining) => {
            if buf.is_empty() {
                return Ok(Decoded::NeedMore);
            }
            let n = remaining.min(buf.len() as u64) as usize;
            let data = buf.split_to(n).freeze();
            let next = if remaining == n as u64 { Chunk::DataEnd } else { Chunk::Data(remaining - n as u64) };
            Ok(Decoded::Data(data, next))
        }
        Chunk::DataEnd => {
            if buf.starts_with(b"\r\n") {
                buf.advance(2);
            } else if buf.starts_with(b"\n") {
                buf.advance(1);
            } else if buf.len() < 2 && (buf.is_empty() || buf[0] == b'\r') {
                return Ok(Decoded::NeedMore);
            } else {
                return Err("chunk data not followed by CRLF".into());
            }
            Ok(Decoded::Step(Chunk::Size))
        }
        Chunk::Trailers => {
            let Some(end) = memchr::memchr(b'\n', buf) else {
                return if buf.len() > MAX_LINE { Err("trailer line too long".into()) } else { Ok(Decoded::NeedMore) };
            };
            let empty = end == 0 || (end == 1 && buf[0] == b'\r');
            buf.advance(end + 1);
            // Trailers are not forwarded; the empty line ends the body.
            Ok(if empty { Decoded::End } else { Decoded::Step(Chunk::Trailers) })
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.get_mut().poll_next(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.framing == Framing::Done
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
        }
    }

    /// Decodes `wire` fed in pieces of `step` bytes: the data, and whether the body ended.
    fn dechunk(wire: &[u8], step: usize) -> Result<(Vec<u8>, bool), String> {
        let mut buf = BytesMut::new();
        let mut state = Chunk::Size;
        let mut out = Vec::new();
        let mut fed = 0;
        loop {
            match decode_chunk(&mut buf, state)? {
                Decoded::Data(data, next) => {
                    out.extend_from_slice(&data);
                    state = next;
                }
                Decoded::Step(next) => state = next,
                Decoded::End => return Ok((out, true)),
                Decoded::NeedMore if fed < wire.len() => {
                    let end = (fed + step).min(wire.len());
                    buf.extend_from_slice(&wire[fed..end]);
                    fed = end;
                }
                Decoded::NeedMore => return Ok((out, false)),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_however_they_are_split() {
        let wire = b"5;ext=1\r\nhello\r\n1A\r\n, world, in two chunks!!!!\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in [1, 2, 3, 7, wire.len()] {
            assert_eq!(
                dechunk(wire, step).unwrap(),
                (b"hello, world, in two chunks!!!!".to_vec(), true),
                "step {step}"
            );
        }
        assert_eq!(dechunk(b"3\nabc\n0\n\n", 1).unwrap(), (b"abc".to_vec(), true), "bare LF line ends");
        assert_eq!(dechunk(b"3\r\nab", 1).unwrap(), (b"ab".to_vec(), false), "cut short: not ended");
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for (wire, error) in [
            (&b"zz\r\nhello\r\n"[..], "invalid chunk size"),
            (b"\r\n", "invalid chunk size"),
            (b"ffffffffffffffff\r\n", "invalid chunk size"),
            (b"2\r\nabXY", "not followed by CRLF"),
        ] {
            let e = dechunk(wire, 1).unwrap_err();
            assert!(e.contains(error), "{:?}: {e}", String::from_utf8_lossy(wire));
        }
        let e = dechunk(&[b'1'; MAX_LINE + 2], MAX_LINE + 2).unwrap_err();
        assert!(e.contains("too long"), "{e}");
        // Any stray byte anywhere decodes or fails; nothing panics.
        let wire = b"5;ext=1\r\nhello\r\n1A\r\n, world, in two chunks!!!!\r\n0\r\nx-trailer: 1\r\n\r\n";
        for at in 0..wire.len() {
            for stray in [b'\r', b'\n', b';', b'0', b'f', b'z', 0xff] {
                let mut bent = wire.to_vec();
                bent[at] = stray;
                let _ = dechunk(&bent, 1);
                let _ = dechunk(&bent, bent.len());
            }
        }
    }

    #[test]
    fn the_request_is_a_post_with_its_length_and_the_given_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(HOST, HeaderValue::from_static("elsewhere"));
        headers.insert("authorization", HeaderValue::from_static("Bearer k"));
        headers.insert(CONTENT_LENGTH, HeaderValue::from_static("999"));
        let host = HeaderValue::from_static("up:8000");
        let wire = encode(&"/v1/chat/completions".parse().unwrap(), &host, &headers, &Bytes::from_static(b"{}"));
        assert_eq!(
            String::from_utf8(wire).unwrap(),
            "POST /v1/chat/completions HTTP/1.1\r\nhost: up:8000\r\nauthorization: Bearer k\r\ncontent-length: 2\r\n\r\n{}"
        );
    }

    fn head(wire: &str) -> Result<Option<(Response<()>, Framing, bool)>, String> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut fields);
        assert!(parsed.parse(wire.as_bytes()).unwrap().is_complete());
        head_of(&parsed, wire.as_bytes())
    }

    #[test]
    fn response_heads_give_framing_and_reuse() {
        let framing = |wire: &str| head(wire).unwrap().map(|(_, f, k)| (f, k));
        assert_eq!(framing("HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n"), Some((Framing::Length(12), true)));
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n"),
            Some((Framing::Chunked(Chunk::Size), true))
        );
        assert_eq!(framing("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n"), Some((Framing::Close, false)));
        assert_eq!(framing("HTTP/1.1 200 OK\r\n\r\n"), Some((Framing::Close, false)));
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n"),
            Some((Framing::Length(1), false))
        );
        assert_eq!(framing("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n"), Some((Framing::Length(1), false)));
        assert_eq!(framing("HTTP/1.1 204 No Content\r\n\r\n"), Some((Framing::Done, true)));
        assert_eq!(framing("HTTP/1.1 100 Continue\r\n\r\n"), None);
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n").unwrap_err().contains("Content-Length"));
        assert!(
            head("HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n")
                .unwrap_err()
                .contains("conflicting")
        );
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// A body sent in chunks of the given sizes, with optional extensions and trailers.
        fn chunked(body: &[u8], sizes: &[usize], extension: bool, trailer: bool) -> Vec<u8> {
            let mut wire = Vec::new();
            let mut rest = body;
            for &size in sizes.iter().chain(std::iter::repeat(&7)) {
                if rest.is_empty() {
                    break;
                }
                let (chunk, after) = rest.split_at(size.clamp(1, rest.len()));
                let ext = if extension { ";x=y" } else { "" };
                wire.extend_from_slice(format!("{:x}{ext}\r\n", chunk.len()).as_bytes());
                wire.extend_from_slice(chunk);
                wire.extend_from_slice(b"\r\n");
                rest = after;
            }
            wire.extend_from_slice(b"0\r\n");
            if trailer {
                wire.extend_from_slice(b"x-sum: 1\r\n");
            }
            wire.extend_from_slice(b"\r\n");
            wire
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn chunked_bodies_decode_to_what_was_sent(
                body in prop::collection::vec(any::<u8>(), 0..300),
                sizes in prop::collection::vec(1usize..40, 0..8),
                extension in any::<bool>(),
                trailer in any::<bool>(),
                step in 1usize..64,
            ) {
                let wire = chunked(&body, &sizes, extension, trailer);
                prop_assert_eq!(dechunk(&wire, step), Ok((body, true)));
            }

            #[test]
            fn any_bytes_decode_or_fail_without_a_panic(wire in prop::collection::vec(any::<u8>(), 0..300), step in 1usize..32) {
                let _ = dechunk(&wire, step);
            }

            #[test]
            fn huge_chunk_sizes_are_read_or_refused(size in any::<u64>(), digits in 1usize..20) {
                let wire = format!("{size:0digits$x}\r\nab");
                match dechunk(wire.as_bytes(), 3) {
                    Ok((data, ended)) => prop_assert!(!ended && data.len() <= 2),
                    Err(e) => prop_assert!(e.contains("invalid chunk size"), "{}", e),
                }
            }

            #[test]
            fn any_response_head_parses_or_fails_without_a_panic(
                status in any::<u16>(),
                fields in prop::collection::vec(("[!-~]{1,12}", "[ -~\t]{0,20}"), 0..8),
            ) {
                let mut wire = format!("HTTP/1.1 {status} X\r\n");
                for (name, value) in &fields {
                    wire.push_str(&format!("{name}: {value}\r\n"));
                }
                wire.push_str("\r\n");
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut parsed = httparse::Response::new(&mut headers);
                if let Ok(httparse::Status::Complete(len)) = parsed.parse(wire.as_bytes()) {
                    let _ = head_of(&parsed, &wire.as_bytes()[..len]);
                }
            }

            #[test]
            fn a_content_length_is_a_number_or_an_error(value in "[ -~]{0,25}") {
                let wire = format!("HTTP/1.1 200 OK\r\ncontent-length: {value}\r\n\r\n");
                let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
                let mut parsed = httparse::Response::new(&mut headers);
                if let Ok(httparse::Status::Complete(len)) = parsed.parse(wire.as_bytes()) {
                    match (head_of(&parsed, &wire.as_bytes()[..len]), value.trim().parse::<u64>()) {
                        (Ok(Some((_, framing, _))), Ok(n)) => prop_assert_eq!(framing, Framing::Length(n)),
                        (Err(e), Err(_)) => prop_assert!(e.contains("Content-Length"), "{}", e),
                        (other, expected) => prop_assert!(false, "{:?} for {:?}", other.map(|h| h.map(|h| h.1)), expected),
                    }
                }
            }
        }
    }
}
