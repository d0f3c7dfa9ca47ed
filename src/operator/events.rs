//! The Events (events.k8s.io/v1) the operator posts about routes and budgets.
//!
//! As client-go's recorder does, an event that repeats one posted in the last six minutes (same
//! object, type, reason and note) becomes a series on it, its count and last time patched; any
//! other event is new. kube's `Recorder` leaves the note out of that key, so a series kept its
//! first note ("version 8", count 3) while the versions moved on.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;
use kube::{Client, ResourceExt};

/// How long a posted event can gain a series: client-go's and kube's figure.
const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// What makes two events the same.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    namespace: String,
    regarding: (Option<String>, Option<String>, Option<String>),
    type_: &'static str,
    reason: String,
    note: String,
}

/// Posts events, merging repeats into series.
pub struct Events {
    client: Client,
    controller: String,
    instance: String,
    posted: Mutex<HashMap<Key, Event>>,
}

impl Events {
    pub fn new(client: Client, controller: impl Into<String>, instance: impl Into<String>) -> Self {
        Events { client, controller: controller.into(), instance: instance.into(), posted: Mutex::default() }
    }

    /// Posts an event about `regarding`, or counts it on the same one posted lately.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let now = Timestamp::now();
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".into());
        let type_name = match type_ {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        };
        let key = Key {
            namespace: namespace.clone(),
            regarding: (regarding.kind.clone(), regarding.name.clone(), regarding.uid.clone()),
            type_: type_name,
            reason: reason.into(),
            note: note.into(),
        };
        let window = SignedDuration::try_from(SERIES_WINDOW).unwrap_or(SignedDuration::ZERO);
        // The cache is not held across the API call: namespaces reconcile concurrently.
        let earlier = {
            let mut posted = self.posted.lock().unwrap_or_else(|e| e.into_inner());
            posted.retain(|_, e| last_seen(e).is_some_and(|t| t + window > now));
            posted.get(&key).cloned()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let event = match earlier {
            Some(mut event) => {
                let count = event.series.as_ref().map_or(2, |s| s.count + 1);
                event.series = Some(EventSeries { count, last_observed_time: MicroTime(now) });
                let patch = serde_json::json!({"series": event.series});
                api.patch(&event.name_any(), &PatchParams::default(), &Patch::Merge(&patch)).await?;
                event
            }
            None => {
                let event = Event {
                    metadata: ObjectMeta {
                        name: Some(format!(
                            "{}.{:x}",
                            regarding.name.as_deref().unwrap_or(&self.controller),
                            now.as_nanosecond()
                        )),
                        namespace: Some(namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    event_time: Some(MicroTime(now)),
                    action: Some("Reconcile".into()),
                    reason: Some(reason.into()),
                    note: Some(note.into()),
                    type_: Some(type_name.into()),
                    regarding: Some(regarding.clone()),
                    reporting_controller: Some(self.controller.clone()),
                    reporting_instance: Some(self.instance.clone()),
                    ..Event::default()
                };
                api.create(&PostParams::default(), &event).await?
            }
        };
        self.posted.lock().unwrap_or_else(|e| e.into_inner()).insert(key, event);
        Ok(())
    }
}

fn last_seen(event: &Event) -> Option<Timestamp> {
    match &event.series {
        Some(series) => Some(series.last_observed_time.0),
        None => event.event_time.as_ref().map(|t| t.0),
    }
}
