//! Pushed configuration: the stream on which the operator's leader sends this pod's
//! configuration, and the rule for which configuration is served when the mounted files and the
//! stream disagree: the newest version, whichever source it came from.
//!
//! The mounted Secret is the bootstrap (the pod starts with warm routing before the operator is
//! reached) and the fallback while the operator is away; the stream brings each new version
//! within a reconcile instead of the kubelet's refresh of a minute or two.

use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::sync::watch;

use super::fleet::EndpointOverrides;
use super::ledger_client::{CallMetrics, LedgerClient};
use crate::api::FallbackReason;
use crate::config::{
    CONFIG_SERVED_PATH, CONFIG_STREAM_PATH, CompiledConfig, Config, FLEET_HEALTH_KIND, FleetHealth, HEALTH_REPORT_PATH,
    HealthReport, LedgerEndpoint, ServedVersion, TargetOutage, TargetOutcomes, TargetPerformance,
};
use crate::sidecar::routing::health;
use crate::sidecar::shared::Shared;
use crate::sidecar::state::Source;

/// How often this pod's outages are told to the operator.
const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Its measures go with every this many reports.
const MEASURES_EVERY: u64 = 5;
/// The largest frame read: a configuration fits in a Secret (1 MiB), with room for its JSON.
const MAX_FRAME: usize = 4 << 20;
/// Reconnection delays grow from this …
const FIRST_RETRY: Duration = Duration::from_millis(250);
/// … up to this, each with up to half again at random so a fleet does not reconnect in step.
const LAST_RETRY: Duration = Duration::from_secs(15);

/// What became of a configuration offered to be served.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    Applied,
    /// The version served, with the same content: nothing to do.
    Unchanged,
    /// Older than the one served: kept out.
    Older,
    /// It could not be served (its budgets' ledger cannot be used); the previous one stays.
    Rejected(String),
}

/// Whether a configuration of version `offered` replaces the served one of version `served`.
///
/// Versions come from the operator and only grow; a configuration without one (standalone files)
/// always replaces. The same version replaces only with different content: the same version
/// selected anew after the pod's labels changed.
pub fn judge(served: Option<u64>, offered: Option<u64>, same_content: bool) -> Offer {
    match (served, offered) {
        (Some(served), Some(offered)) if offered < served => Offer::Older,
        (Some(served), Some(offered)) if offered == served && same_content => Offer::Unchanged,
        _ => Offer::Applied,
    }
}

/// The configuration served, from either source.
pub struct Served {
    current: Mutex<Current>,
    /// The version served, for the operator to be told.
    version: watch::Sender<Option<u64>>,
    /// The ledger the served configuration names: where the stream is opened.
    ledger: watch::Sender<Option<LedgerEndpoint>>,
}

struct Current {
    version: Option<u64>,
    config: Config,
}

impl Served {
    /// Starts from the configuration the sidecar was started with, already applied.
    pub fn new(shared: &Shared, version: Option<u64>, config: Config) -> Self {
        shared.states.config_version.set(version.unwrap_or(0));
        shared.states.config_source.set(Source::Files.index() as u64);
        let ledger = watch::channel(config.ledger.clone()).0;
        Served { current: Mutex::new(Current { version, config }), version: watch::channel(version).0, ledger }
    }

    /// Serves `config` if it is newer than the one served ([`judge`]).
    pub fn offer(&self, shared: &Shared, source: Source, version: Option<u64>, config: Config) -> Offer {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        match judge(current.version, version, config == current.config) {
            Offer::Applied => {}
            Offer::Older => {
                shared.states.older[source.index()].inc();
                tracing::info!(
                    source = source.label(),
                    version,
                    served = current.version,
                    "configuration older than the one served; kept out"
                );
                return Offer::Older;
            }
            other => return other,
        }
        if let Err(e) = shared.apply(&config, version) {
            return Offer::Rejected(e);
        }
        let states = &shared.states;
        states.config_version.set(version.unwrap_or(0));
        states.config_source.set(source.index() as u64);
        self.ledger.send_if_modified(|ledger| {
            let changed = *ledger != config.ledger;
            ledger.clone_from(&config.ledger);
            changed
        });
        *current = Current { version, config };
        self.version.send_replace(version);
        Offer::Applied
    }

    /// The version served, as it changes.
    pub fn version(&self) -> watch::Receiver<Option<u64>> {
        self.version.subscribe()
    }

    /// The ledger named by the configuration served, as it changes.
    pub fn ledger(&self) -> watch::Receiver<Option<LedgerEndpoint>> {
        self.ledger.subscribe()
    }
}

/// Splits a byte stream into newline-terminated frames of at most [`MAX_FRAME`] bytes.
#[derive(Default)]
pub struct Frames {
    pending: Vec<u8>,
}

/// A frame longer than [`MAX_FRAME`]: the stream cannot be followed.
#[derive(Debug, PartialEq, Eq)]
pub struct TooLong;

impl Frames {
    /// Adds `chunk` and returns the frames it completes (empty lines are skipped).
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<Vec<Vec<u8>>, TooLong> {
        let mut frames = Vec::new();
        while let Some(end) = memchr::memchr(b'\n', chunk) {
            self.pending.extend_from_slice(&chunk[..end]);
            chunk = &chunk[end + 1..];
            let frame = std::mem::take(&mut self.pending);
            if frame.len() > MAX_FRAME {
                return Err(TooLong);
            }
            if !frame.iter().all(u8::is_ascii_whitespace) {
                frames.push(frame);
            }
        }
        self.pending.extend_from_slice(chunk);
        if self.pending.len() > MAX_FRAME {
            return Err(TooLong);
        }
        Ok(frames)
    }
}

/// What the stream needs besides the served configuration.
pub struct PushOptions {
    pub overrides: EndpointOverrides,
    pub token_file: PathBuf,
    /// The pod's labels file: when it changes, the stream is opened again so the operator selects
    /// anew (it reads the labels itself; the file is only the sign of a change).
    pub labels_file: Option<PathBuf>,
    pub check_interval: Duration,
}

/// Follows the operator's stream for as long as the served configuration names a ledger:
/// connects, serves each newer version, and reconnects after a failure with a growing delay.
pub async fn follow(shared: Arc<Shared>, served: Arc<Served>, options: PushOptions) {
    let mut ledger = served.ledger();
    let mut client: Option<LedgerClient> = None;
    let mut failures = 0u32;
    loop {
        let endpoint = options.overrides.endpoint(ledger.borrow_and_update().as_ref());
        let Some(endpoint) = endpoint else {
            // Standalone, or a configuration without a ledger yet.
            client = None;
            if ledger.changed().await.is_err() {
                return;
            }
            continue;
        };
        if client.as_ref().is_none_or(|c| c.endpoint != endpoint) {
            match LedgerClient::new(endpoint, options.token_file.clone(), Arc::new(CallMetrics::default())) {
                Ok(c) => client = Some(c),
                Err(e) => {
                    tracing::error!(error = %e, "cannot follow the configuration stream; serving the mounted configuration");
                    client = None;
                    if ledger.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
            }
        }
        let Some(client) = client.as_ref() else { continue };
        let ended = match client.stream(CONFIG_STREAM_PATH).await {
            Ok(body) => {
                shared.states.stream_connected.set(1);
                tracing::info!(url = %client.endpoint.url, "configuration stream open");
                let ended = read(&shared, &served, client, body, &mut ledger, &options).await;
                shared.states.stream_connected.set(0);
                ended
            }
            Err(e) => Ended::Failed(e.to_string()),
        };
        let delay = match ended {
            Ended::Reselect => {
                tracing::info!("the pod's labels changed: opening the configuration stream again");
                failures = 0;
                continue;
            }
            Ended::Served(reason) => {
                // It worked (a leader change ends streams so): start over after the first, jittered
                // delay, so a fleet does not reconnect in step.
                tracing::info!(%reason, "configuration stream ended; reconnecting");
                failures = 0;
                retry_delay(1)
            }
            Ended::Failed(error) => {
                failures = failures.saturating_add(1);
                let delay = retry_delay(failures);
                if failures == 1 {
                    tracing::warn!(%error, retry_in = ?delay, "configuration stream unavailable; serving the mounted configuration meanwhile");
                } else {
                    tracing::debug!(%error, retry_in = ?delay, failures, "configuration stream still unavailable");
                }
                delay
            }
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            changed = ledger.changed() => if changed.is_err() { return },
        }
    }
}

/// Why a stream stopped being read.
enum Ended {
    /// After at least one frame: the operator ended it (its leadership moved) or the connection
    /// broke.
    Served(String),
    /// Before any frame, or on a frame that could not be read.
    Failed(String),
    /// The pod's labels changed.
    Reselect,
}

async fn read(
    shared: &Shared,
    served: &Served,
    client: &LedgerClient,
    mut body: Incoming,
    ledger: &mut watch::Receiver<Option<LedgerEndpoint>>,
    options: &PushOptions,
) -> Ended {
    let mut frames = Frames::default();
    let mut received = 0u64;
    let labels = |file: &Option<PathBuf>| file.as_ref().map(std::fs::read);
    let first_labels = labels(&options.labels_file).map(Result::ok);
    let mut check = tokio::time::interval(options.check_interval);
    let ended = |received: u64, why: String| if received > 0 { Ended::Served(why) } else { Ended::Failed(why) };
    // Told once the stream's first frame is in, then at every change, from either source.
    let mut version = served.version();
    let mut told = None;
    // This pod's own outages, told about once a second while there are any (and once after);
    // its measures every few seconds.
    let mut report = tokio::time::interval(REPORT_INTERVAL);
    let mut reported_outages = false;
    let mut ticks = 0u64;
    // Attempts are told as counts since the last report, from what they were when the stream
    // opened.
    let mut counted = outcome_counts(shared);
    loop {
        if received > 0 && *version.borrow_and_update() != told {
            told = *version.borrow();
            if let Some(v) = told
                && let Err(e) = client.post(CONFIG_SERVED_PATH, &ServedVersion { version: v }).await
            {
                tracing::debug!(error = %e, version = v, "could not tell the operator the version served");
            }
        }
        let next = tokio::select! {
            next = body.frame() => next,
            _ = version.changed() => continue,
            _ = report.tick() => {
                let targets = own_outages(shared);
                ticks += 1;
                let performance = if ticks.is_multiple_of(MEASURES_EVERY) { own_measures(shared) } else { Vec::new() };
                let now_counted = outcome_counts(shared);
                let outcomes = outcomes_since(&counted, &now_counted);
                counted = now_counted;
                let news = !targets.is_empty() || !outcomes.is_empty() || !performance.is_empty();
                if received > 0 && (reported_outages || news) {
                    reported_outages = !targets.is_empty();
                    let report = HealthReport { targets, outcomes, performance };
                    if let Err(e) = client.post(HEALTH_REPORT_PATH, &report).await {
                        tracing::debug!(error = %e, "could not tell the operator of this pod's outages");
                    }
                }
                continue;
            }
            _ = check.tick() => {
                if labels(&options.labels_file).map(Result::ok) != first_labels {
                    return Ended::Reselect;
                }
                continue;
            }
            // A new ledger URL: the next stream goes there.
            _ = ledger.changed() => return Ended::Served("the ledger's address changed".into()),
        };
        let data = match next {
            None => return ended(received, "the operator ended it".into()),
            Some(Err(e)) => return ended(received, format!("the connection broke: {e}")),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
        };
        let Ok(lines) = frames.feed(data.chunk()) else {
            return Ended::Failed(format!("a frame of more than {MAX_FRAME} bytes"));
        };
        for line in lines {
            let applied = match serde_json::from_slice::<Kind>(&line) {
                Ok(Kind { kind }) if kind == FLEET_HEALTH_KIND => apply_fleet_health(shared, &line),
                _ => apply_frame(shared, served, Bytes::from(line)),
            };
            match applied {
                Ok(()) => received += 1,
                Err(e) => {
                    shared.states.push_rejected.inc();
                    tracing::error!(error = %e, "a pushed configuration was rejected; still serving the previous one");
                    return Ended::Failed(e);
                }
            }
        }
    }
}

/// A frame's kind, read before the rest.
#[derive(serde::Deserialize)]
struct Kind {
    kind: String,
}

/// This pod's own ejections and cooldowns now, for the fleet.
fn own_outages(shared: &Shared) -> Vec<TargetOutage> {
    let now = health::now();
    let ms = |d: Option<Duration>| d.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    shared
        .states
        .targets()
        .into_iter()
        .map(|((route, target), state)| TargetOutage {
            route,
            target,
            ejected_ms: ms(state.health.own_ejection(now)),
            cooling_ms: ms(state.health.cooling_for(now)),
        })
        .filter(|o| o.ejected_ms > 0 || o.cooling_ms > 0)
        .collect()
}

/// Each target's attempts so far, by outcome (index 0 success, then one per [`FallbackReason`]).
fn outcome_counts(shared: &Shared) -> HashMap<(String, String), Vec<u64>> {
    let targets = shared.states.targets().into_iter();
    targets.map(|(target, state)| (target, state.outcomes.iter().map(|c| c.get()).collect())).collect()
}

/// The attempts between two counts, for the fleet: successes, and failures by class.
fn outcomes_since(
    before: &HashMap<(String, String), Vec<u64>>,
    now: &HashMap<(String, String), Vec<u64>>,
) -> Vec<TargetOutcomes> {
    let mut outcomes: Vec<TargetOutcomes> = now
        .iter()
        .filter_map(|((route, target), counts)| {
            let earlier = before.get(&(route.clone(), target.clone()));
            let delta = |i: usize| counts[i].saturating_sub(earlier.and_then(|e| e.get(i).copied()).unwrap_or(0));
            let failures: BTreeMap<String, u64> = FallbackReason::ALL
                .iter()
                .map(|r| (r.as_str().to_string(), delta(1 + r.index())))
                .filter(|(_, n)| *n > 0)
                .collect();
            let successes = delta(0);
            (successes > 0 || !failures.is_empty()).then(|| TargetOutcomes {
                route: route.clone(),
                target: target.clone(),
                successes,
                failures,
            })
        })
        .collect();
    outcomes.sort_by(|a, b| (&a.route, &a.target).cmp(&(&b.route, &b.target)));
    outcomes
}

/// This pod's own measures of its targets' performance, for the fleet.
fn own_measures(shared: &Shared) -> Vec<TargetPerformance> {
    let measured = shared.states.targets().into_iter().filter_map(|((route, target), state)| {
        let [ttft, total, throughput] = state.stats.own()?;
        Some(TargetPerformance { route, target, ttft, total, throughput })
    });
    measured.collect()
}

/// Holds the targets the fleet says are out; those this pod does not serve are ignored.
fn apply_fleet_health(shared: &Shared, frame: &[u8]) -> Result<(), String> {
    let fleet: FleetHealth = serde_json::from_slice(frame).map_err(|e| format!("a fleet health frame: {e}"))?;
    let now = health::now();
    let until = |ms: u64| now.saturating_add(health::ticks(Duration::from_millis(ms)));
    for outage in &fleet.targets {
        let Some(state) = shared.states.existing(&outage.route, &outage.target) else { continue };
        // Every frame repeats every hold while it lasts: only a new one is counted and logged.
        let ejected = outage.ejected_ms > 0 && state.health.fleet_eject(until(outage.ejected_ms), now);
        if ejected {
            state.fleet_ejections.inc();
        }
        let cooling = outage.cooling_ms > 0 && state.health.cooling_for(now).is_none();
        if outage.cooling_ms > 0 {
            state.health.cool_down(until(outage.cooling_ms));
        }
        if ejected || cooling {
            tracing::info!(route = %outage.route, target = %outage.target, ejected_ms = outage.ejected_ms, cooling_ms = outage.cooling_ms, "another pod's outage: the target is held here too");
        }
    }
    for measured in &fleet.performance {
        if let Some(state) = shared.states.existing(&measured.route, &measured.target) {
            state.stats.set_fleet([measured.ttft, measured.total, measured.throughput], now);
        }
    }
    Ok(())
}

/// Reads and serves one pushed configuration if it is newer than the one served.
fn apply_frame(shared: &Shared, served: &Served, frame: Bytes) -> Result<(), String> {
    let compiled = CompiledConfig::from_frame(&frame)?;
    let version = compiled.version;
    let config = compiled.into_config()?;
    let (routes, budgets) = (config.routes.len(), config.budgets.len());
    match served.offer(shared, Source::Push, Some(version), config) {
        Offer::Applied => {
            shared.states.pushes_applied.inc();
            tracing::info!(routes, budgets, version, "configuration pushed");
            Ok(())
        }
        Offer::Unchanged | Offer::Older => Ok(()),
        Offer::Rejected(e) => Err(e),
    }
}

/// The delay before the `failures`th reconnection: doubling from [`FIRST_RETRY`] to
/// [`LAST_RETRY`], plus up to half of it again.
fn retry_delay(failures: u32) -> Duration {
    let base = FIRST_RETRY.saturating_mul(1 << failures.saturating_sub(1).min(10)).min(LAST_RETRY);
    // std's hasher keys are random per process: enough to spread a fleet's reconnections.
    let spread = std::collections::hash_map::RandomState::new().hash_one(failures) % 1000;
    base + base.mul_f64(spread as f64 / 2000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_version_is_served_whichever_source_brings_it() {
        assert_eq!(judge(Some(4), Some(5), false), Offer::Applied);
        assert_eq!(judge(Some(5), Some(4), false), Offer::Older, "never an older version after a newer one");
        assert_eq!(judge(Some(5), Some(5), true), Offer::Unchanged, "the same version from the other source");
        assert_eq!(judge(Some(5), Some(5), false), Offer::Applied, "the same version selected anew for new labels");
        assert_eq!(judge(None, Some(1), false), Offer::Applied);
        assert_eq!(judge(Some(5), None, true), Offer::Applied, "standalone files carry no version and always apply");
    }

    #[test]
    fn frames_are_lines_and_a_frame_too_long_stops_the_stream() {
        let mut frames = Frames::default();
        assert_eq!(frames.feed(b"{\"a\":1}\n{\"b\"").unwrap(), vec![b"{\"a\":1}".to_vec()]);
        assert_eq!(frames.feed(b":2}\n\n  \n").unwrap(), vec![b"{\"b\":2}".to_vec()]);
        assert_eq!(frames.feed(&vec![b'x'; MAX_FRAME + 1]), Err(TooLong));
    }

    #[test]
    fn reconnections_spread_out_and_stop_growing() {
        assert!(retry_delay(1) >= FIRST_RETRY && retry_delay(1) <= FIRST_RETRY * 3 / 2);
        assert!(retry_delay(3) >= FIRST_RETRY * 4);
        assert!(retry_delay(u32::MAX) <= LAST_RETRY * 3 / 2);
    }

    mod properties {
        use super::*;
        use crate::providers::arbitrary::mutated;
        use proptest::prelude::*;

        fn frame() -> Vec<u8> {
            serde_json::to_vec(&CompiledConfig::new("team-a", 7, Config::default())).unwrap_or_default()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// However the bytes are cut into chunks, the same frames come out.
            #[test]
            fn frames_do_not_depend_on_chunking(bytes in prop::collection::vec(prop_oneof![Just(b'\n'), Just(b' '), any::<u8>()], 0..300), cuts in prop::collection::vec(0usize..300, 0..8)) {
                let whole = Frames::default().feed(&bytes).unwrap();
                let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
                cuts.sort_unstable();
                let (mut frames, mut chunked, mut at) = (Frames::default(), Vec::new(), 0);
                for cut in cuts.into_iter().chain([bytes.len()]) {
                    chunked.extend(frames.feed(&bytes[at..cut]).unwrap());
                    at = cut;
                }
                prop_assert_eq!(chunked, whole);
            }

            /// A frame is any bytes: a damaged one is an error, never a panic nor another
            /// configuration than the one hashed.
            #[test]
            fn any_frame_reads_or_fails(bytes in prop_oneof![mutated(frame()), prop::collection::vec(any::<u8>(), 0..200)]) {
                if let Ok(config) = CompiledConfig::from_frame(&bytes).and_then(CompiledConfig::into_config) {
                    prop_assert_eq!(config, Config::default());
                }
            }
        }
    }
}
