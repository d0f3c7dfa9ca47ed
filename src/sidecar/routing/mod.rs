//! Which target takes an attempt, decided without I/O: [`plan`] (which targets, in what order),
//! [`health`] (each target's ejection state machine) and [`stats`] (rolling latency and
//! throughput, the sidecar's own and the fleet's).

pub(super) mod health;
pub mod plan;
pub(super) mod stats;
