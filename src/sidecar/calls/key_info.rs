//! `GET /api/v1/key`: the caller's key and its budget, in OpenRouter's shape.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::header;

use super::error::ProxyError;
use crate::api::Period;
use crate::api::units::format_micros;
use crate::sidecar::billing;
use crate::sidecar::shared::Shared;

/// `GET /api/v1/key`: the caller's key in OpenRouter's shape; credits as decimal numbers.
pub async fn key_info(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let snapshot = shared.snapshot.load();
    let budget = billing::caller_key(request.headers()).and_then(|key| snapshot.budget(&billing::key_hash(key)));
    let Some(budget) = budget else {
        let missing = billing::caller_key(request.headers()).is_none();
        return ProxyError::Unauthorized { missing }.into_response();
    };
    let Some(standing) = budget.standing() else {
        let reason = "the fleet's figures for this key have not arrived from the budget ledger yet".to_string();
        return ProxyError::LedgerUnavailable { reason: Some(reason) }.into_response();
    };
    let number = |micros: Option<u64>| micros.map_or_else(|| "null".to_string(), format_micros);
    let reset = match budget.terms.period {
        Period::Never => "null".to_string(),
        p => format!("\"{}\"", p.as_str()),
    };
    // In cluster mode the ledger keeps the period's spend only: the calendar windows are null.
    let windows = standing.windows;
    // The budgets above the key's (Sideyard's own field): what each has left decides too.
    let parents: Vec<String> = budget
        .parent_standings()
        .into_iter()
        .map(|(terms, standing)| {
            format!(
                r#"{{"label":{label},"limit":{limit},"limit_remaining":{remaining},"usage":{usage},"state":"{state}"}}"#,
                label = serde_json::Value::from(terms.id()),
                limit = number(terms.limit),
                remaining = number(standing.remaining),
                usage = format_micros(standing.spent),
                state = standing.state.as_str(),
            )
        })
        .collect();
    // Written by hand so the credit amounts stay exact decimals, never floats.
    let body = format!(
        r#"{{"data":{{"label":{label},"limit":{limit},"limit_reset":{reset},"limit_remaining":{remaining},"topped_up":{topped_up},"usage":{usage},"usage_daily":{daily},"usage_weekly":{weekly},"usage_monthly":{monthly},"is_free_tier":false,"state":"{state}","period_start":"{start}","parents":[{parents}]}}}}"#,
        label = serde_json::Value::from(budget.id.as_str()),
        limit = number(budget.terms.limit),
        remaining = number(standing.remaining),
        topped_up = format_micros(standing.topped_up),
        usage = format_micros(windows.map_or(standing.spent, |w| w.total)),
        daily = number(windows.map(|w| w.day)),
        weekly = number(windows.map(|w| w.week)),
        monthly = number(windows.map(|w| w.month)),
        state = standing.state.as_str(),
        start = crate::budget::period::rfc3339(standing.period_start),
        parents = parents.join(","),
    );
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}
