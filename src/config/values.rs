//! Values of the API turned into typed runtime values, checked once: upstream URLs, static header
//! maps and key hashes. Compile and the reader of the operator's serialised form both go through
//! these, so a value is accepted or refused, with the same message, whichever way it arrives.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Uri};

use super::{Format, MockOptions, Upstream};
use crate::api::ProviderApi;

/// SHA-256 in hex, as `spec.key.sha256` and the serialised form write it.
pub fn sha256_hex(hex: &str) -> Result<[u8; 32], String> {
    let invalid = || "must be 64 lowercase hexadecimal digits".to_string();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(invalid());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| invalid())?;
    }
    Ok(out)
}

/// A target's upstream from its `api` and `baseUrl`.
pub fn upstream(api: ProviderApi, base_url: Option<&str>) -> Result<Upstream, String> {
    let format = match api {
        ProviderApi::Openai | ProviderApi::Mock => Format::OpenAi,
        ProviderApi::Anthropic => Format::Anthropic,
    };
    match (api, base_url) {
        (ProviderApi::Mock, None) => {
            Ok(Upstream::Mock { format, url: None, options: Arc::new(MockOptions::default()) })
        }
        (ProviderApi::Mock | ProviderApi::Anthropic, Some(url)) if url.starts_with("mock://") => {
            let query = url.split_once('?').map_or("", |(_, q)| q);
            let options = Arc::new(MockOptions::from_query(query)?);
            Ok(Upstream::Mock { format, url: Some(url.to_string()), options })
        }
        (ProviderApi::Mock, Some(_)) => Err("must start with mock:// when api is mock".into()),
        (_, None) => Err("is required unless api is mock".into()),
        (_, Some(url)) => {
            if url.len() > 2048 {
                return Err("is longer than 2048 characters".into());
            }
            let base_url = url.trim_end_matches('/');
            // Messages do not repeat the URL: it may hold a password.
            let uri: Uri = base_url.parse().map_err(|e| format!("is not a valid URL: {e}"))?;
            if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
                return Err("must be an http:// or https:// URL with a host".into());
            }
            if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
                return Err("must not contain credentials; use the target's credentials field".into());
            }
            if uri.query().is_some() {
                return Err("must not have a query string".into());
            }
            let path = match format {
                Format::OpenAi => "/chat/completions",
                Format::Anthropic if uri.path().ends_with("/v1") => {
                    return Err("must be the API's root, without /v1: /v1/messages is appended to it".into());
                }
                Format::Anthropic => "/v1/messages",
            };
            let conversation: Uri = format!("{base_url}{path}")
                .parse()
                .map_err(|e| format!("is not a valid URL with {path} appended: {e}"))?;
            Ok(Upstream::Http { format, base_url: base_url.to_string(), conversation })
        }
    }
}

/// Headers that describe the connection or the body, which the proxy owns.
const RESERVED_HEADERS: [&str; 8] =
    ["host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "trailer"];

/// A target's static `headers`, as header names and values.
pub fn headers(
    headers: &BTreeMap<String, String>,
    has_credential: bool,
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    if headers.len() > 32 {
        return Err(format!("has {} entries, at most 32 are allowed", headers.len()));
    }
    let mut out = Vec::with_capacity(headers.len());
    for (name, value) in headers {
        let parsed =
            HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{name:?} is not a valid header name"))?;
        if RESERVED_HEADERS.contains(&parsed.as_str()) {
            return Err(format!("{name:?} is set by the proxy and cannot be configured"));
        }
        if parsed == http::header::AUTHORIZATION && has_credential {
            return Err("\"authorization\" conflicts with credentials; set one or the other".into());
        }
        let value =
            HeaderValue::from_str(value).map_err(|_| format!("the value of {name:?} is not a valid header value"))?;
        out.push((parsed, value));
    }
    Ok(out)
}
