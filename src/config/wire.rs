//! The serialised form of a [`Config`]: what the operator writes into each namespace's
//! `sideyard-config` Secret and the sidecar reads back.
//!
//! Values keep the spelling of the ProviderRoute API (durations as `"2s"`, upstreams as `api` and
//! `baseUrl`) and are parsed back by the same functions compile uses, so a hand-edited or corrupted
//! file is rejected with the same messages as a bad ProviderRoute.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Config, Format, Upstream};
use crate::api::{API_VERSION, ProviderApi};

/// `kind` of a compiled configuration document.
pub const COMPILED_CONFIG_KIND: &str = "CompiledConfig";
/// Where a sidecar takes its pushed configuration from, on the operator's ledger listener: one
/// [`CompiledConfig`] in JSON per line.
pub const CONFIG_STREAM_PATH: &str = "/config/v1/stream";
/// Where a sidecar says which version it serves: a [`ServedVersion`].
pub const CONFIG_SERVED_PATH: &str = "/config/v1/served";

/// Where a sidecar tells what it sees of its targets' health: a [`HealthReport`], about once a
/// second while its stream is open.
pub const HEALTH_REPORT_PATH: &str = "/config/v1/health";
/// `kind` of the stream's frames about the fleet's view of targets' health, between the
/// configurations: a [`FleetHealth`].
pub const FLEET_HEALTH_KIND: &str = "FleetHealth";

/// A target kept out of use, and for how long from when the message was written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetOutage {
    /// `namespace/name` of the route.
    pub route: String,
    pub target: String,
    /// Ejected for this many more milliseconds (0: not ejected).
    #[serde(default)]
    pub ejected_ms: u64,
    /// Cooling down after a rate limit for this many more milliseconds (0: not).
    #[serde(default)]
    pub cooling_ms: u64,
}

/// One measure of a target's recent performance: its samples over the last five minutes and
/// their p50, p75, p90 and p99.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measure {
    pub samples: u64,
    pub values: [u64; 4],
}

/// A target's recent performance: time to first token and total attempt time in microseconds,
/// output tokens per second times 1000.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TargetPerformance {
    /// `namespace/name` of the route.
    pub route: String,
    pub target: String,
    pub ttft: Measure,
    #[serde(default)]
    pub total: Measure,
    pub throughput: Measure,
}

/// A target's attempts since the pod's last report: successes, and failures by the class of
/// [`crate::api::FallbackReason`] (`connect`, `timeout`, `5xx`, `429`, ...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetOutcomes {
    /// `namespace/name` of the route.
    pub route: String,
    pub target: String,
    pub successes: u64,
    #[serde(default)]
    pub failures: std::collections::BTreeMap<String, u64>,
}

/// A sidecar's own ejections and cooldowns (never those the fleet told it of), its attempts'
/// outcomes since its last report, and, every few seconds, its own measures of its targets'
/// performance.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub targets: Vec<TargetOutage>,
    #[serde(default)]
    pub outcomes: Vec<TargetOutcomes>,
    #[serde(default)]
    pub performance: Vec<TargetPerformance>,
}

/// The fleet's ejections and cooldowns for a namespace's targets, and its merged measures of
/// their performance, pushed to its sidecars.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetHealth {
    pub kind: String,
    pub targets: Vec<TargetOutage>,
    #[serde(default)]
    pub performance: Vec<TargetPerformance>,
}

/// The version of the configuration a sidecar serves, from either source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedVersion {
    pub version: u64,
}

/// A namespace's compiled configuration, as the operator publishes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CompiledConfig {
    pub api_version: String,
    pub kind: String,
    /// The namespace whose objects were compiled.
    pub namespace: String,
    /// Grows by one with every change to the namespace's configuration.
    pub version: u64,
    /// SHA-256 (hex) of `config` in this serialisation: a sidecar refuses a document whose content
    /// does not match it.
    pub hash: String,
    pub config: Config,
}

impl CompiledConfig {
    pub fn new(namespace: &str, version: u64, config: Config) -> Self {
        CompiledConfig {
            api_version: API_VERSION.into(),
            kind: COMPILED_CONFIG_KIND.into(),
            namespace: namespace.into(),
            version,
            hash: content_hash(&config),
            config,
        }
    }

    /// Reads one pushed frame: a [`CompiledConfig`] in JSON, its kind and hash checked.
    pub fn from_frame(frame: &[u8]) -> Result<Self, String> {
        let compiled: CompiledConfig = serde_json::from_slice(frame).map_err(|e| e.to_string())?;
        if compiled.api_version != API_VERSION || compiled.kind != COMPILED_CONFIG_KIND {
            return Err(format!(
                "a {} {} where a {API_VERSION} {COMPILED_CONFIG_KIND} was expected",
                compiled.api_version, compiled.kind
            ));
        }
        Ok(compiled)
    }

    /// The configuration, once its hash is checked.
    pub fn into_config(self) -> Result<Config, String> {
        let actual = content_hash(&self.config);
        if actual != self.hash {
            return Err(format!(
                "the content does not match its hash (expected {}, computed {actual}): it was changed after it was compiled",
                self.hash
            ));
        }
        Ok(self.config)
    }
}

/// SHA-256 of a configuration's JSON, in hex: it identifies the content, whatever its version.
pub fn content_hash(config: &Config) -> String {
    // Plain data with string keys: serialising it cannot fail.
    let json = serde_json::to_vec(config).unwrap_or_default();
    hex(&Sha256::digest(&json))
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// An optional `[u8; 32]` as 64 lowercase hex digits; absent is `null`.
pub mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(bytes) => s.serialize_str(&super::hex(bytes)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| super::super::values::sha256_hex(&text).map_err(D::Error::custom))
            .transpose()
    }
}

/// A duration as the API writes it: `"2s"`, `"800ms"`, `"5m"`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use crate::api::units::{format_duration, parse_duration};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        parse_duration(&String::deserialize(d)?).map_err(D::Error::custom)
    }
}

/// An optional duration; absent is `null`.
pub mod optional_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use crate::api::units::{format_duration, parse_duration};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?.map(|s| parse_duration(&s).map_err(D::Error::custom)).transpose()
    }
}

/// Static request headers as a map, as in the API, checked again on the way in.
pub mod headers {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use http::{HeaderName, HeaderValue};
    use serde::ser::Error as _;

    pub fn serialize<S: Serializer>(headers: &[(HeaderName, HeaderValue)], s: S) -> Result<S::Ok, S::Error> {
        let mut map = BTreeMap::new();
        for (name, value) in headers {
            let text = value.to_str().map_err(|_| S::Error::custom("a header value that is not text"))?;
            map.insert(name.as_str(), text);
        }
        s.collect_map(map)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(HeaderName, HeaderValue)>, D::Error> {
        let map = BTreeMap::<String, String>::deserialize(d)?;
        // The authorization conflict was checked at compile time, against the credential.
        super::super::values::headers(&map, false).map_err(D::Error::custom)
    }
}

/// A target's upstream in the API's terms.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamSpec {
    api: ProviderApi,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base_url: Option<String>,
}

impl From<Upstream> for UpstreamSpec {
    fn from(u: Upstream) -> Self {
        match u {
            Upstream::Http { format: Format::OpenAi, base_url, .. } => {
                UpstreamSpec { api: ProviderApi::Openai, base_url: Some(base_url) }
            }
            Upstream::Http { format: Format::Anthropic, base_url, .. } => {
                UpstreamSpec { api: ProviderApi::Anthropic, base_url: Some(base_url) }
            }
            Upstream::Mock { format: Format::OpenAi, url, .. } => {
                UpstreamSpec { api: ProviderApi::Mock, base_url: url }
            }
            Upstream::Mock { format: Format::Anthropic, url, .. } => {
                UpstreamSpec { api: ProviderApi::Anthropic, base_url: url }
            }
        }
    }
}

impl TryFrom<UpstreamSpec> for Upstream {
    type Error = String;
    fn try_from(spec: UpstreamSpec) -> Result<Self, String> {
        super::values::upstream(spec.api, spec.base_url.as_deref()).map_err(|e| format!("baseUrl: {e}"))
    }
}
