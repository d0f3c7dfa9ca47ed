//! The sidecar: the OpenAI and Anthropic APIs on localhost, each call routed to a provider.
//!
//! A request enters at [`service`], goes through [`proxy`] (routes, fallback, hedging) and
//! [`attempt`] (one target) to an [`upstream`], and streams back through [`relay`]; [`billing`]
//! meters it against the caller's budget. Requests read the immutable [`snapshot`] of the
//! configuration; what outlives a configuration is in [`state`]; what lives for the process is in
//! [`shared`]. [`command`] runs it all.

mod admin;
mod attempt;
mod billing;
mod command;
mod count_tokens;
mod endpoint;
mod error;
mod fleet;
mod h1;
mod health;
mod key_info;
mod ledger_client;
mod metrics;
mod models;
mod passthrough;
pub mod plan;
mod proxy;
mod push;
mod relay;
mod request_log;
mod service;
mod shared;
mod snapshot;
mod state;
mod stats;
mod transport;
mod upstream;

pub use command::{SidecarArgs, SidecarError, run};
pub use fleet::FleetOptions;
pub use service::{ApiService, api_service};
pub use shared::{Limits, Shared};
pub use upstream::Clients;
