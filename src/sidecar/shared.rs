//! What lives for the whole process: the current [`Snapshot`], the state that outlives
//! configurations, the upstream clients and the budget ledger.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;

use super::cluster::fleet::{Fleet, FleetOptions};
use super::observe::Observers;
use super::snapshot::{Meters, Snapshot};
use super::state::StateRegistry;
use super::upstream::Clients;
use crate::budget::{Ledger, SystemClock};
use crate::config::Config;

/// Limits on bodies the sidecar holds in memory.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_request_bytes: usize,
    pub max_response_bytes: usize,
}

/// What lives for the whole process.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub states: StateRegistry,
    pub clients: Clients,
    pub limits: Limits,
    /// Refuse requests without a known key, even on routes without budgets.
    pub require_key: bool,
    /// The budget ledger, opened in `state_dir` when the first budget appears (standalone).
    ledger: OnceLock<Ledger>,
    /// Leases of the operator's ledger, from the first configuration that names it (cluster).
    fleet: OnceLock<Arc<Fleet>>,
    fleet_options: FleetOptions,
    state_dir: PathBuf,
    /// Set on SIGTERM: `/readyz` fails so no new traffic is sent while in-flight requests finish.
    pub draining: AtomicBool,
    /// What records each request; `None` when nothing does.
    pub observers: Option<Arc<Observers>>,
}

impl Shared {
    pub fn new(
        config: &Config,
        version: Option<u64>,
        limits: Limits,
        clients: Clients,
        require_key: bool,
        state_dir: PathBuf,
        fleet_options: FleetOptions,
    ) -> Result<Self, String> {
        let shared = Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            states: StateRegistry::default(),
            clients,
            limits,
            require_key,
            ledger: OnceLock::new(),
            fleet: OnceLock::new(),
            fleet_options,
            state_dir,
            draining: AtomicBool::new(false),
            observers: None,
        };
        shared.apply(config, version)?;
        shared.states.last_reload_ok.set(1);
        Ok(shared)
    }

    /// Swaps in a new configuration; requests in flight finish on the one they started with.
    /// Fails, changing nothing, if the configuration has budgets and their ledger cannot be
    /// opened (standalone) or its endpoint is unusable (cluster mode).
    pub fn apply(&self, config: &Config, version: Option<u64>) -> Result<(), String> {
        let meters = if config.budgets.is_empty() {
            Meters::None
        } else if Fleet::wanted(config, &self.fleet_options) {
            let fleet = self.open_fleet()?;
            fleet.set_endpoint(config.ledger.as_ref())?;
            Meters::Fleet(fleet)
        } else {
            Meters::Embedded(self.open_ledger()?)
        };
        let snapshot = Snapshot::build(config, version, &self.states, &self.clients, &meters)?;
        if let Some(fleet) = self.fleet.get() {
            fleet.retain(&config.budgets);
        }
        let routes = snapshot.routes.iter().map(|r| r.id.as_str()).collect();
        let targets = snapshot.routes.iter().flat_map(|r| r.targets.iter().map(|t| (r.id.as_str(), t.name.as_str())));
        self.states.retain(&routes, &targets.collect());
        self.snapshot.store(Arc::new(snapshot));
        self.states.routes_loaded.set(config.routes.len() as u64);
        Ok(())
    }

    /// Whether the sidecar is taking new traffic: not once it drains.
    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::Relaxed)
    }

    pub fn ledger(&self) -> Option<&Ledger> {
        self.ledger.get()
    }

    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.get()
    }

    /// The lease client, created with its keeper task on first use.
    fn open_fleet(&self) -> Result<&Arc<Fleet>, String> {
        if let Some(fleet) = self.fleet.get() {
            return Ok(fleet);
        }
        std::fs::create_dir_all(&self.state_dir)
            .map_err(|e| format!("cannot create {}: {e}", self.state_dir.display()))?;
        let fleet = Arc::new(Fleet::new(&self.fleet_options, &self.state_dir)?);
        let fleet = self.fleet.get_or_init(|| fleet);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(fleet.clone().keep());
        }
        Ok(fleet)
    }

    fn open_ledger(&self) -> Result<&Ledger, String> {
        if let Some(ledger) = self.ledger.get() {
            return Ok(ledger);
        }
        let ledger = Ledger::open(&self.state_dir, Arc::new(SystemClock))?;
        tracing::info!(state_dir = %self.state_dir.display(), "budget ledger opened");
        Ok(self.ledger.get_or_init(|| ledger))
    }
}
