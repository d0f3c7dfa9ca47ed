//! A caller's call, by what it meets: [`service`] (the API's hyper service and router),
//! [`endpoint`] (which routes serve each endpoint, where each kind of target takes it), [`proxy`]
//! (a routed request: route chain, keys, fallback, hedging), [`passthrough`] (every other `/v1/`
//! call, forwarded as it is), [`count_tokens`], [`models`] and [`key_info`] (answered by the
//! sidecar), [`error`] (every proxy error, in one place) and [`request_log`] (a line for each
//! call that failed or fell back).

pub mod count_tokens;
pub mod endpoint;
pub mod error;
pub mod key_info;
pub mod models;
pub mod passthrough;
pub mod proxy;
pub mod request_log;
pub mod service;
