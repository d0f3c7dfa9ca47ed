//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's rules: the holder renews
//! every retry period; another replica takes the lease once it has seen the same lease record,
//! unrenewed, for a whole lease duration (measured on its own clock, so clock skew between nodes
//! does not matter); and the holder stops writing when it has not renewed within the renew
//! deadline, which is shorter than the lease duration, so two replicas never write at once.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// This replica's name in `holderIdentity`: unique among replicas (the pod name).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
    /// Where this replica serves the budget ledger, written on the Lease while it leads so
    /// that the other replicas can tell sidecars where the leader is.
    pub ledger_url: Option<String>,
}

/// The Lease annotation that names the leader's ledger URL.
pub const LEDGER_URL_ANNOTATION: &str = "sideyard.dev/ledger-url";

/// Whether this replica may write now. Cheap to clone and to ask.
#[derive(Clone, Debug)]
pub struct Leadership(watch::Receiver<Option<Instant>>);

impl Leadership {
    /// A replica that always leads (leader election off) or never does (tests).
    pub fn fixed(leader: bool) -> Leadership {
        let until = leader.then(|| Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600));
        // The sender is dropped: the value never changes.
        Leadership(watch::channel(until).1)
    }

    /// A leadership that the returned switch turns on and off, for tests of what a replica does
    /// when it gains or loses the lease.
    pub fn switched(leader: bool) -> (Leadership, LeaderSwitch) {
        let (tx, rx) = watch::channel(None);
        let switch = LeaderSwitch(tx);
        switch.set(leader);
        (Leadership(rx), switch)
    }

    /// True while the lease was renewed within the renew deadline.
    pub fn is_leader(&self) -> bool {
        self.0.borrow().is_some_and(|until| Instant::now() < until)
    }

    /// Resolves each time this replica becomes the leader (not on renewals).
    pub async fn acquired(&mut self) -> bool {
        loop {
            let was = self.0.borrow_and_update().is_some();
            if self.0.changed().await.is_err() {
                return false;
            }
            if !was && self.0.borrow().is_some() {
                return true;
            }
        }
    }
}

/// Turns a [`Leadership::switched`] on and off.
#[derive(Debug)]
pub struct LeaderSwitch(watch::Sender<Option<Instant>>);

impl LeaderSwitch {
    pub fn set(&self, leader: bool) {
        self.0.send_replace(leader.then(|| Instant::now() + Duration::from_secs(3600)));
    }
}

/// Why a leader stopped leading.
#[derive(Debug, PartialEq, Eq)]
pub struct LostLease(pub String);

impl std::fmt::Display for LostLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "lost the leader lease: {}", self.0)
    }
}

/// Takes part in the election for one Lease.
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The other holder's lease record as last seen (its resourceVersion) and when it was first
    /// seen: the lease expires a lease duration after that, by this replica's clock.
    observed: Option<(String, Instant)>,
    state: watch::Sender<Option<Instant>>,
    /// The leader's ledger URL as the Lease last said.
    leader_url: watch::Sender<Option<String>>,
}

impl Elector {
    pub fn new(api: Api<Lease>, settings: LeaseSettings) -> (Elector, Leadership) {
        let (state, leadership) = watch::channel(None);
        let leader_url = watch::channel(None).0;
        (Elector { api, settings, observed: None, state, leader_url }, Leadership(leadership))
    }

    /// The leader's ledger URL, as the Lease says it (this replica's own while it leads).
    pub fn leader_url(&self) -> watch::Receiver<Option<String>> {
        self.leader_url.subscribe()
    }

    /// Campaigns and renews until `shutdown` resolves (then releases the lease, so another
    /// replica takes over at once) or the lease is lost.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), LostLease> {
        tokio::pin!(shutdown);
        loop {
            let started = Instant::now();
            let held = self.state.borrow().is_some();
            match tokio::time::timeout(self.settings.renew_deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => {
                    if !held {
                        tracing::info!(lease = %self.settings.name, identity = %self.settings.identity, "became the leader");
                    }
                    self.state.send_replace(Some(started + self.settings.renew_deadline));
                }
                Ok(Ok(false)) if held => {
                    self.state.send_replace(None);
                    return Err(LostLease("another replica holds it".into()));
                }
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, lease = %self.settings.name, "cannot reach the lease"),
                Err(_) => tracing::warn!(lease = %self.settings.name, "the lease request timed out"),
            }
            // Copied out: the watch's read guard must not be held across `send_replace`.
            let until = *self.state.borrow();
            if let Some(until) = until
                && Instant::now() >= until
            {
                self.state.send_replace(None);
                return Err(LostLease(format!("not renewed within {:?}", self.settings.renew_deadline)));
            }
            tokio::select! {
                _ = tokio::time::sleep(self.settings.retry_period) => {}
                _ = &mut shutdown => {
                    self.release().await;
                    return Ok(());
                }
            }
        }
    }

    /// One round: true when this replica holds the lease afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let seen_at = Instant::now();
        let now = MicroTime(Timestamp::now());
        let me = &self.settings.identity;
        let duration_secs = i32::try_from(self.settings.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let my_url = self.settings.ledger_url.clone();
        let annotations = || my_url.clone().map(|url| [(LEDGER_URL_ANNOTATION.to_string(), url)].into());
        let Some(mut lease) = self.api.get_opt(&self.settings.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.settings.name.clone()),
                    namespace: Some(self.settings.namespace.clone()),
                    annotations: annotations(),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            let created = conflict_is_false(self.api.create(&PostParams::default(), &lease).await);
            if matches!(created, Ok(true)) {
                self.leader_url.send_replace(my_url);
            }
            return created;
        };
        let their_url = lease.metadata.annotations.as_ref().and_then(|a| a.get(LEDGER_URL_ANNOTATION)).cloned();
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_ref() != Some(me) {
            if self.observed.as_ref().is_none_or(|(v, _)| *v != version) {
                self.observed = Some((version, seen_at));
            }
            let their_duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.settings.lease_duration, Duration::from_secs);
            let since = self.observed.as_ref().map_or(seen_at, |(_, at)| *at);
            if holder.is_some() && seen_at < since + their_duration {
                self.leader_url.send_replace(their_url);
                return Ok(false);
            }
            tracing::info!(previous = ?holder, "taking over the expired lease");
            spec.holder_identity = Some(me.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(duration_secs);
        if let Some(url) = &my_url {
            lease
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .insert(LEDGER_URL_ANNOTATION.into(), url.clone());
        }
        // The resourceVersion makes this a compare-and-swap: a concurrent writer wins, we lose.
        let name = self.settings.name.clone();
        let replaced = conflict_is_false(self.api.replace(&name, &PostParams::default(), &lease).await);
        if matches!(replaced, Ok(true)) {
            self.leader_url.send_replace(my_url);
        }
        replaced
    }

    /// Gives the lease up, if held, so that another replica need not wait for it to expire.
    async fn release(&mut self) {
        if self.state.borrow().is_none() {
            return;
        }
        self.state.send_replace(None);
        let Ok(Some(mut lease)) = self.api.get_opt(&self.settings.name).await else { return };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_ref() != Some(&self.settings.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        match self.api.replace(&self.settings.name, &PostParams::default(), &lease).await {
            Ok(_) => tracing::info!(lease = %self.settings.name, "released the leader lease"),
            Err(e) => tracing::warn!(error = %e, "could not release the leader lease; it expires on its own"),
        }
    }
}

/// A 409 means another replica wrote the lease first.
fn conflict_is_false(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
