//! The serialised form of a [`Config`]: what the operator writes into each namespace's
//! `switchyard-config` Secret and the sidecar reads back.
//!
//! Values keep the spelling of the ProviderRoute API (durations as `"2s"`, upstreams as `api` and
//! `baseUrl`) and are parsed back by the same functions compile uses, so a hand-edited or corrupted
//! file is rejected with the same messages as a bad ProviderRoute.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Config, Upstream};
use crate::api::{API_VERSION, Api};

/// `kind` of a compiled configuration document.
pub const COMPILED_CONFIG_KIND: &str = "CompiledConfig";

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

/// `[u8; 32]` as 64 lowercase hex digits.
pub mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::hex(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text = String::deserialize(d)?;
        crate::config::compile::sha256_hex(&text).map_err(D::Error::custom)
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

    pub fn serialize<S: Serializer>(headers: &[(String, String)], s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(headers.iter().map(|(k, v)| (k, v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
        let map = BTreeMap::<String, String>::deserialize(d)?;
        // The authorization conflict was checked at compile time, against the credential.
        crate::config::compile::headers(&map, false).map_err(D::Error::custom)
    }
}

/// A target's upstream in the API's terms.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamSpec {
    api: Api,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base_url: Option<String>,
}

impl From<Upstream> for UpstreamSpec {
    fn from(u: Upstream) -> Self {
        match u {
            Upstream::OpenAi { base_url } => UpstreamSpec { api: Api::Openai, base_url: Some(base_url) },
            Upstream::Mock { url, .. } => UpstreamSpec { api: Api::Mock, base_url: url },
        }
    }
}

impl TryFrom<UpstreamSpec> for Upstream {
    type Error = String;
    fn try_from(spec: UpstreamSpec) -> Result<Self, String> {
        crate::config::compile::upstream(spec.api, spec.base_url.as_deref()).map_err(|e| format!("baseUrl: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Documents, MapResolver, compile, parse_file};

    const ROUTES: &str = r#"
apiVersion: switchyard.dev/v1alpha1
kind: ProviderRoute
metadata: {name: chat, namespace: team-a}
spec:
  model: chat
  aliases: [gpt-4o]
  workloadSelector: {matchLabels: {app: bot}}
  strategy: latency
  holdBack: 1500ms
  hedge: {after: 800ms}
  targets:
    - name: primary
      api: openai
      baseUrl: https://api.example.com/v1/
      model: gpt-4o
      credentials: {secretRef: {name: keys, key: openai}}
      headers: {x-team: a}
      pricing: {prompt: "2.50", completion: "10", cachedPrompt: "1.25", request: "0.001"}
      contextWindow: 128000
      timeouts: {connect: 2s, firstByte: 20s, total: 10m}
    - name: fake
      api: mock
      baseUrl: mock://?chunks=3
  fallback: {on: [connect, "5xx", 4xx-context-length], maxAttempts: 2}
---
apiVersion: switchyard.dev/v1alpha1
kind: ApiKeyBudget
metadata: {name: bot, namespace: team-a}
spec:
  key: {secretRef: {name: keys, key: app}}
  limit: "100"
  period: weekly
  lowBalanceThreshold: "5"
  onLedgerUnavailable: failOpen
  allowedModels: [chat]
  rateLimit: {requestsPerMinute: 60}
  workloadSelector: {matchExpressions: [{key: app, operator: In, values: [bot]}]}
---
apiVersion: v1
kind: Secret
metadata: {name: keys, namespace: team-a}
stringData: {openai: sk-upstream, app: sk-app}
"#;

    fn config() -> Config {
        let mut docs = Documents::default();
        let mut errors = Vec::new();
        parse_file("routes.yaml", ROUTES, &mut docs, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        compile(&docs, &MapResolver::default()).unwrap()
    }

    #[test]
    fn a_compiled_config_reads_back_as_the_same_config() {
        let config = config();
        let compiled = CompiledConfig::new("team-a", 7, config.clone());
        let json = serde_json::to_string(&compiled).unwrap();
        let back: CompiledConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back.version, 7);
        assert_eq!(back.into_config().unwrap(), config);
    }

    #[test]
    fn the_serialised_form_keeps_the_api_spelling() {
        let json = serde_json::to_value(CompiledConfig::new("team-a", 1, config())).unwrap();
        let route = &json["config"]["routes"][0];
        assert_eq!(route["holdBack"], "1500ms");
        assert_eq!(route["hedgeAfter"], "800ms");
        assert_eq!(route["fallback"]["on"], serde_json::json!(["connect", "5xx", "4xx-context-length"]));
        assert_eq!(route["workloadSelector"]["matchLabels"]["app"], "bot");
        let target = &route["targets"][0];
        assert_eq!(target["api"], "openai");
        assert_eq!(target["baseUrl"], "https://api.example.com/v1");
        assert_eq!(target["credential"], "sk-upstream");
        assert_eq!(target["pricing"]["prompt"], 2_500_000);
        assert_eq!(target["timeouts"]["total"], "10m");
        assert_eq!(route["targets"][1]["baseUrl"], "mock://?chunks=3");
        let budget = &json["config"]["budgets"][0];
        let app_key_hash = hex(&Sha256::digest(b"sk-app"));
        assert_eq!(budget["keyHash"], app_key_hash);
        assert_eq!(budget["limit"], 100_000_000);
    }

    #[test]
    fn tampered_or_invalid_content_is_refused_with_a_reason() {
        let compiled = CompiledConfig::new("team-a", 1, config());
        let mut json = serde_json::to_value(&compiled).unwrap();
        json["config"]["routes"][0]["model"] = "other".into();
        let changed: CompiledConfig = serde_json::from_value(json.clone()).unwrap();
        assert!(changed.into_config().unwrap_err().contains("does not match its hash"));

        json["config"]["routes"][0]["holdBack"] = "soon".into();
        let err = serde_json::from_value::<CompiledConfig>(json.clone()).unwrap_err().to_string();
        assert!(err.contains("soon"), "{err}");
        json["config"]["routes"][0]["holdBack"] = "1s".into();
        json["config"]["routes"][0]["targets"][0]["baseUrl"] = "ftp://x".into();
        let err = serde_json::from_value::<CompiledConfig>(json.clone()).unwrap_err().to_string();
        assert!(err.contains("must be an http:// or https:// URL"), "{err}");
        json["config"]["routes"][0]["targets"][0]["baseUrl"] = "https://x".into();
        json["config"]["routes"][0]["targets"][0]["credential"] = "a\nb".into();
        let err = serde_json::from_value::<CompiledConfig>(json).unwrap_err().to_string();
        assert!(err.contains("not allowed in an HTTP header"), "{err}");
    }
}
