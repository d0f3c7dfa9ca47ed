//! What every way of reaching an upstream shares: how sending fails, the error type of response
//! bodies, and the size of reads.

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why an attempt got no response headers.
#[derive(Debug)]
pub enum SendError {
    /// The connection could not be opened within the target's connect timeout.
    ConnectTimeout,
    /// The connection could not be opened, or broke before the response headers.
    Connect(String),
}

/// Bytes read from an upstream connection at a time.
pub const UPSTREAM_READ_BUFFER: usize = 4096;

/// An error and its causes, `outer: inner: root`: hyper's own messages alone are too generic
/// ("error reading a body from connection") to tell a reset from a protocol error.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(err) = source {
        let text = err.to_string();
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = err.source();
    }
    out
}
