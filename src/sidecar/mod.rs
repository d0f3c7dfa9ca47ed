//! The sidecar: the OpenAI and Anthropic APIs on localhost, each call routed to a provider.
//!
//! A request enters at [`calls::service`], goes through [`calls::proxy`] (routes, fallback,
//! hedging) and [`upstream::attempt`] (one target, chosen by [`routing`]) to an [`upstream`], and
//! streams back through [`upstream::relay`]; [`billing`] meters it against the caller's budget;
//! in a cluster, [`cluster`] leases budgets and follows the operator's configuration; [`observe`]
//! records each request for the access log and the generation lookup. Requests
//! read the immutable [`snapshot`] of the configuration; what outlives a configuration is in
//! [`state`]; what lives for the process is in [`shared`]. [`command`] runs it all.

mod admin;
mod billing;
mod calls;
mod cluster;
mod command;
mod genai;
mod metrics;
mod observe;
pub mod routing;
mod shared;
mod snapshot;
mod state;
mod upstream;

pub use calls::service::{ApiService, api_service};
pub use cluster::fleet::FleetOptions;
pub use command::{SidecarArgs, SidecarError, run};
pub use observe::access_log::LOG_TARGET as ACCESS_LOG_TARGET;
pub use observe::{ObserverOptions, Observers};
pub use shared::{Limits, Shared};
pub use upstream::Clients;
