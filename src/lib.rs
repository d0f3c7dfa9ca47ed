//! Sideyard: an LLM API gateway that runs as a sidecar next to the application.
//!
//! The binary's subcommands map onto the modules: `sidecar` ([`sidecar`]), `operator`
//! ([`operator`]), `crd` ([`api`]) and `mock-provider` ([`mock_provider`]). [`config`] compiles the CRDs into what the sidecar serves.

pub mod api;
pub mod budget;
pub mod cli;
pub mod config;
pub mod logs;
pub mod metrics;
pub mod mock_provider;
pub mod operator;
pub mod providers;
pub mod sidecar;
pub mod traces;
