//! The sidecar's Prometheus exposition: routes, targets and the process from the
//! [`StateRegistry`], budgets from the ledger (embedded, or the operator's in a cluster).

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::billing::{Meter, ServedBudget, Standing};
use super::calls::endpoint::Api;
use super::cluster::fleet::{BILLED, Fleet};
use super::cluster::ledger_client::{CALLS, RESULTS};
use super::genai::GenAiMetrics;
use super::routing::health::Ticks;
use super::routing::stats::{Cached, QUANTILES, TargetStats};
use super::shared::Shared;
use super::snapshot::Snapshot;
use super::state::{Source, StateRegistry, TargetState};
use crate::api::units::format_micros;
use crate::api::{BudgetState, FallbackReason};
use crate::metrics::{escape, header};

/// The text exposition of every metric of the sidecar.
pub fn render(shared: &Shared, now: Ticks) -> String {
    let mut out = render_states(&shared.states, now);
    render_genai(&shared.snapshot.load(), &mut out);
    if let Some(traces) = shared.observers.as_ref().and_then(|o| o.traces.as_ref()) {
        traces.render(&mut out);
    }
    render_budgets(shared, &mut out);
    out
}

fn render_states(registry: &StateRegistry, now: Ticks) -> String {
    let targets = registry.targets();
    let routes = registry.routes();
    let labels: Vec<String> =
        targets.iter().map(|((r, t), _)| format!("route=\"{}\",target=\"{}\"", escape(r), escape(t))).collect();
    let per_target = || labels.iter().zip(targets.iter().map(|(_, s)| s));
    let mut out = String::with_capacity(8192 + targets.len() * 6144);

    header(&mut out, "sideyard_requests_total", "counter", "Responses to callers, by route, target and HTTP status.");
    for (status, n) in registry.unrouted.snapshot() {
        let _ = writeln!(out, "sideyard_requests_total{{route=\"\",target=\"\",status=\"{status}\"}} {n}");
    }
    for (r, s) in &routes {
        for (status, n) in s.requests.snapshot() {
            let _ =
                writeln!(out, "sideyard_requests_total{{route=\"{}\",target=\"\",status=\"{status}\"}} {n}", escape(r));
        }
    }
    for (l, t) in per_target() {
        for (status, n) in t.requests.snapshot() {
            let _ = writeln!(out, "sideyard_requests_total{{{l},status=\"{status}\"}} {n}");
        }
    }

    header(&mut out, "sideyard_api_calls_total", "counter", "Calls of each API, passed through included.");
    for api in Api::ALL {
        let n = registry.api_calls[api.index()].get();
        let _ = writeln!(out, "sideyard_api_calls_total{{api=\"{}\"}} {n}", api.name());
    }

    header(
        &mut out,
        "sideyard_upstream_first_byte_seconds",
        "histogram",
        "Time from sending an attempt to the upstream's response headers.",
    );
    for (l, t) in per_target() {
        t.first_byte.render(&mut out, "sideyard_upstream_first_byte_seconds", l);
    }
    header(
        &mut out,
        "sideyard_upstream_duration_seconds",
        "histogram",
        "Time until an attempt's answer was complete or failed.",
    );
    for (l, t) in per_target() {
        t.duration.render(&mut out, "sideyard_upstream_duration_seconds", l);
    }

    header(
        &mut out,
        "sideyard_upstream_outcomes_total",
        "counter",
        "Attempts by outcome: success or the failure reason.",
    );
    for (l, t) in per_target() {
        for (i, n) in t.outcomes.iter().enumerate() {
            let outcome = if i == 0 { "success" } else { FallbackReason::ALL[i - 1].as_str() };
            let _ = writeln!(out, "sideyard_upstream_outcomes_total{{{l},outcome=\"{outcome}\"}} {}", n.get());
        }
    }
    header(
        &mut out,
        "sideyard_fallbacks_total",
        "counter",
        "Failed attempts that moved on to the next target, by reason.",
    );
    for (l, t) in per_target() {
        for (reason, n) in FallbackReason::ALL.iter().zip(&t.fallbacks) {
            let _ = writeln!(out, "sideyard_fallbacks_total{{{l},reason=\"{}\"}} {}", reason.as_str(), n.get());
        }
    }
    header(&mut out, "sideyard_stream_errors_total", "counter", "Streams that broke after the answer started.");
    for (l, t) in per_target() {
        let _ = writeln!(out, "sideyard_stream_errors_total{{{l}}} {}", t.stream_errors.get());
    }

    header(&mut out, "sideyard_target_health", "gauge", "1 for the target's current health state.");
    for (l, t) in per_target() {
        let state = t.health.admission(now).name();
        for s in ["healthy", "ejected", "half-open", "cooling"] {
            let _ = writeln!(out, "sideyard_target_health{{{l},state=\"{s}\"}} {}", u8::from(s == state));
        }
    }
    type Count = fn(&TargetState) -> u64;
    let health_counters: [(&str, &str, Count); 3] = [
        ("sideyard_ejections_total", "Times a target was ejected after failures.", |t| t.ejections.get()),
        ("sideyard_cooldowns_total", "Rate-limit answers with a retry hint that paused a target.", |t| {
            t.cooldowns.get()
        }),
        (
            "sideyard_fleet_ejections_total",
            "Ejections another pod of the namespace made, held here as the operator pushed them.",
            |t| t.fleet_ejections.get(),
        ),
    ];
    for (name, help, count) in health_counters {
        header(&mut out, name, "counter", help);
        for (l, t) in per_target() {
            let _ = writeln!(out, "{name}{{{l}}} {}", count(t));
        }
    }

    type Pick = fn(&TargetStats) -> &Cached;
    let quantile_gauges: [(&str, &str, Pick, f64); 3] = [
        (
            "sideyard_target_time_to_first_token_seconds",
            "Time to first token over the last 5 minutes.",
            |s| &s.ttft_cached,
            1e6,
        ),
        ("sideyard_target_total_seconds", "Attempt duration over the last 5 minutes.", |s| &s.total_cached, 1e6),
        (
            "sideyard_target_output_tokens_per_second",
            "Output tokens per second over the last 5 minutes.",
            |s| &s.throughput_cached,
            1e3,
        ),
    ];
    for (name, help, pick, scale) in quantile_gauges {
        header(&mut out, name, "gauge", help);
        for (l, t) in per_target() {
            let cached = pick(&t.stats);
            for (i, (q, _)) in QUANTILES.iter().enumerate() {
                if let Some(v) = cached.get(i) {
                    let _ = writeln!(out, "{name}{{{l},quantile=\"{q}\"}} {}", v as f64 / scale);
                }
            }
        }
    }

    header(
        &mut out,
        "sideyard_panic_routing_total",
        "counter",
        "Requests sent to an unavailable target because every target was.",
    );
    for (r, s) in &routes {
        let _ = writeln!(out, "sideyard_panic_routing_total{{route=\"{}\"}} {}", escape(r), s.panics.get());
    }
    header(&mut out, "sideyard_hedges_total", "counter", "Hedged attempts: started, and whether the hedge won.");
    for (r, s) in &routes {
        for (result, n) in [("started", &s.hedges_started), ("won", &s.hedges_won), ("lost", &s.hedges_lost)] {
            let _ = writeln!(out, "sideyard_hedges_total{{route=\"{}\",result=\"{result}\"}} {}", escape(r), n.get());
        }
    }
    header(
        &mut out,
        "sideyard_excluded_requests_total",
        "counter",
        "Requests no target could serve, by the constraint.",
    );
    for (r, s) in &routes {
        let excluded = s.excluded.lock().unwrap_or_else(|e| e.into_inner());
        for (by, n) in excluded.iter() {
            let _ =
                writeln!(out, "sideyard_excluded_requests_total{{route=\"{}\",excluded_by=\"{by}\"}} {n}", escape(r));
        }
    }

    header(
        &mut out,
        "sideyard_config_source_checks_total",
        "counter",
        "Times the configuration files were checked for changes.",
    );
    let _ = writeln!(out, "sideyard_config_source_checks_total {}", registry.source_checks.get());
    header(
        &mut out,
        "sideyard_request_log_suppressed_total",
        "counter",
        "Log lines of failed or fallen-back requests left out by the log's rate limit.",
    );
    let _ = writeln!(out, "sideyard_request_log_suppressed_total {}", registry.request_log.suppressed.get());

    header(&mut out, "sideyard_config_reloads_total", "counter", "Configuration reloads, by result.");
    let _ = writeln!(out, "sideyard_config_reloads_total{{result=\"success\"}} {}", registry.reloads_ok.get());
    let _ = writeln!(out, "sideyard_config_reloads_total{{result=\"failure\"}} {}", registry.reloads_failed.get());
    header(
        &mut out,
        "sideyard_config_last_reload_success",
        "gauge",
        "1 if the last configuration change was loaded, 0 if it was rejected.",
    );
    let _ = writeln!(out, "sideyard_config_last_reload_success {}", registry.last_reload_ok.get());
    header(&mut out, "sideyard_config_routes", "gauge", "Routes in the configuration being served.");
    let _ = writeln!(out, "sideyard_config_routes {}", registry.routes_loaded.get());
    header(
        &mut out,
        "sideyard_config_version",
        "gauge",
        "Version of the operator-compiled configuration being served (0: loaded from ProviderRoute files).",
    );
    let _ = writeln!(out, "sideyard_config_version {}", registry.config_version.get());
    header(
        &mut out,
        "sideyard_config_source",
        "gauge",
        "1 for the source the served configuration came from: the mounted files or the operator's stream.",
    );
    for source in Source::ALL {
        let from = u64::from(registry.config_source.get() == source.index() as u64);
        let _ = writeln!(out, "sideyard_config_source{{source=\"{}\"}} {from}", source.label());
    }
    header(
        &mut out,
        "sideyard_config_older_total",
        "counter",
        "Configurations kept out because their version was older than the one served, by source.",
    );
    for source in Source::ALL {
        let n = registry.older[source.index()].get();
        let _ = writeln!(out, "sideyard_config_older_total{{source=\"{}\"}} {n}", source.label());
    }
    header(
        &mut out,
        "sideyard_config_stream_connected",
        "gauge",
        "1 while the operator's configuration stream is open.",
    );
    let _ = writeln!(out, "sideyard_config_stream_connected {}", registry.stream_connected.get());
    header(&mut out, "sideyard_config_pushes_total", "counter", "Configurations pushed by the operator, by result.");
    let _ = writeln!(out, "sideyard_config_pushes_total{{result=\"applied\"}} {}", registry.pushes_applied.get());
    let _ = writeln!(out, "sideyard_config_pushes_total{{result=\"rejected\"}} {}", registry.push_rejected.get());
    out
}

/// Per-budget metrics, from whichever ledger keeps them.
fn render_budgets(shared: &Shared, out: &mut String) {
    let snapshot = shared.snapshot.load();
    if shared.ledger().is_none() && shared.fleet().is_none() {
        return;
    }
    let mut budgets: Vec<_> = snapshot.budgets().collect();
    budgets.sort_by(|a, b| a.id.cmp(&b.id));
    // Every level: the served keys' budgets, then the budgets above them that no key of this
    // pod's is (a team's figures, as its keys see them), each once.
    let mut standings: Vec<(String, Option<Standing>, bool)> =
        budgets.iter().map(|b| (b.id.clone(), b.standing(), b.terms.top_up.is_some())).collect();
    let mut above: std::collections::BTreeMap<String, Standing> = std::collections::BTreeMap::new();
    for b in &budgets {
        for (terms, standing) in b.parent_standings() {
            above.entry(terms.id()).or_insert(standing);
        }
    }
    above.retain(|id, _| !budgets.iter().any(|b| &b.id == id));
    standings.extend(above.into_iter().map(|(id, s)| (id, Some(s), false)));
    let h = header;
    h(
        out,
        "sideyard_budget_spent",
        "gauge",
        "Credits spent in the current period (in a cluster: fleet-wide, as of the ledger's last answer).",
    );
    for (id, standing, _) in &standings {
        if let Some(s) = standing {
            let _ = writeln!(out, "sideyard_budget_spent{{budget=\"{id}\"}} {}", format_micros(s.spent));
        }
    }
    h(out, "sideyard_budget_remaining", "gauge", "Credits left in the current period (budgets with a limit).");
    for (id, standing, _) in &standings {
        if let Some(left) = standing.as_ref().and_then(|s| s.remaining) {
            let _ = writeln!(out, "sideyard_budget_remaining{{budget=\"{id}\"}} {}", format_micros(left));
        }
    }
    h(out, "sideyard_budget_topped_up", "gauge", "Credits added to the limit this period by top-ups from the parent.");
    for (id, standing, top_up) in &standings {
        if let Some(s) = standing.as_ref().filter(|_| *top_up) {
            let _ = writeln!(out, "sideyard_budget_topped_up{{budget=\"{id}\"}} {}", format_micros(s.topped_up));
        }
    }
    h(out, "sideyard_budget_state", "gauge", "1 for the budget's state: Active, Low or Exhausted.");
    for (id, standing, _) in &standings {
        let Some(standing) = standing else { continue };
        for s in [BudgetState::Active, BudgetState::Low, BudgetState::Exhausted] {
            let _ = writeln!(
                out,
                "sideyard_budget_state{{budget=\"{id}\",state=\"{}\"}} {}",
                s.as_str(),
                u8::from(s == standing.state)
            );
        }
    }
    type Read = fn(&crate::budget::BudgetCounters) -> u64;
    let counters: [(&str, &str, Read); 4] = [
        ("sideyard_budget_reservations_in_flight", "Reservations held by requests in flight.", |a| {
            a.in_flight.load(Ordering::Relaxed)
        }),
        ("sideyard_budget_insufficient_credits_total", "Requests refused with 402.", |a| a.refused.get()),
        ("sideyard_budget_rate_limited_total", "Requests refused with 429 by the key's rate limit.", |a| {
            a.rate_limited.get()
        }),
        (
            "sideyard_budget_estimated_costs_total",
            "Answers billed on an estimate: the provider reported no usage.",
            |a| a.estimated.get(),
        ),
    ];
    for (name, help, value) in counters {
        h(out, name, if name.ends_with("_total") { "counter" } else { "gauge" }, help);
        for b in &budgets {
            let _ = writeln!(out, "{name}{{budget=\"{}\"}} {}", b.id, value(b.counters()));
        }
    }
    if let Some(ledger) = shared.ledger() {
        render_embedded_ledger(ledger, out);
    }
    if let Some(fleet) = shared.fleet() {
        render_fleet(fleet, &budgets, out);
    }
}

fn render_embedded_ledger(ledger: &crate::budget::Ledger, out: &mut String) {
    let h = header;
    h(out, "sideyard_ledger_available", "gauge", "1 while the ledger can record spend durably.");
    let _ = writeln!(out, "sideyard_ledger_available {}", u8::from(ledger.is_available()));
    h(out, "sideyard_ledger_unsaved_settlements", "gauge", "Settled answers whose spend is not on disk yet.");
    let _ = writeln!(out, "sideyard_ledger_unsaved_settlements {}", ledger.unsaved());
    let damage = ledger.damage();
    h(
        out,
        "sideyard_ledger_journal_damaged_regions",
        "gauge",
        "Damaged stretches of the ledger journal skipped when it was opened (a copy of the file is kept).",
    );
    let _ = writeln!(out, "sideyard_ledger_journal_damaged_regions {}", damage.regions);
    h(
        out,
        "sideyard_ledger_journal_damaged_bytes",
        "gauge",
        "Bytes of the ledger journal skipped as damaged when it was opened.",
    );
    let _ = writeln!(out, "sideyard_ledger_journal_damaged_bytes {}", damage.bytes);
}

/// Cluster mode: leases, billing modes, debt and the ledger calls.
fn render_fleet(fleet: &Fleet, budgets: &[&Arc<ServedBudget>], out: &mut String) {
    let h = header;
    let m = &fleet.metrics;
    h(
        out,
        "sideyard_ledger_leases_total",
        "counter",
        "Lease answers from the operator's ledger: new leases granted, leases renewed, and renewals of a lease that had expired.",
    );
    for (event, counter) in
        [("granted", &m.leases_granted), ("renewed", &m.leases_renewed), ("expired", &m.leases_expired)]
    {
        let _ = writeln!(out, "sideyard_ledger_leases_total{{event=\"{event}\"}} {}", counter.get());
    }
    h(out, "sideyard_ledger_leased_credit_total", "counter", "Credits granted to this sidecar's leases.");
    let _ = writeln!(out, "sideyard_ledger_leased_credit_total {}", format_micros(m.granted_credit.get()));
    h(
        out,
        "sideyard_ledger_state_file_errors_total",
        "counter",
        "Failed writes of the unreported budget use to the state directory.",
    );
    let _ = writeln!(out, "sideyard_ledger_state_file_errors_total {}", m.state_file_errors.get());
    h(
        out,
        "sideyard_ledger_client_calls_total",
        "counter",
        "Calls to the operator's ledger, by call and result (ok, refused, unreachable, rejected).",
    );
    for (call, results) in CALLS.iter().zip(&m.calls.results) {
        for (result, counter) in RESULTS.iter().zip(results) {
            let _ = writeln!(
                out,
                "sideyard_ledger_client_calls_total{{call=\"{call}\",result=\"{result}\"}} {}",
                counter.get()
            );
        }
    }
    h(out, "sideyard_ledger_round_trip_seconds", "histogram", "Round trip of calls to the operator's ledger.");
    for (call, histogram) in CALLS.iter().zip(&m.calls.round_trip) {
        histogram.render(out, "sideyard_ledger_round_trip_seconds", &format!("call=\"{call}\""));
    }
    h(
        out,
        "sideyard_budget_requests_total",
        "counter",
        "Requests billed by mode: from the lease, per request with the ledger (state Low), or on debt (ledger unreachable, failOpen).",
    );
    for b in budgets {
        let Meter::Fleet { account, .. } = &b.meter else { continue };
        for (mode, counter) in BILLED.iter().zip(&account.billed) {
            let _ = writeln!(
                out,
                "sideyard_budget_requests_total{{budget=\"{}\",mode=\"{mode}\"}} {}",
                b.id,
                counter.get()
            );
        }
    }
    h(
        out,
        "sideyard_budget_ledger_waits_total",
        "counter",
        "Ledger calls that requests waited for: lease top-ups and per-request reservations.",
    );
    for b in budgets {
        let Meter::Fleet { account, .. } = &b.meter else { continue };
        let _ = writeln!(out, "sideyard_budget_ledger_waits_total{{budget=\"{}\"}} {}", b.id, account.waits.get());
    }
    h(out, "sideyard_budget_lease_credit", "gauge", "Credit left on the budget's current lease.");
    h(
        out,
        "sideyard_budget_debt",
        "gauge",
        "Credits spent without a lease while the ledger was unreachable, not yet reported.",
    );
    h(out, "sideyard_budget_ledger_reachable", "gauge", "1 while the operator's ledger answers for the budget.");
    for b in budgets {
        let Meter::Fleet { account, .. } = &b.meter else { continue };
        let (left, reachable) = {
            let book = account.leased.lock();
            (
                book.lease.as_ref().map_or(0, |l| l.credit_left()),
                book.unreachable_since.is_none() && book.mode.is_some(),
            )
        };
        let _ = writeln!(out, "sideyard_budget_lease_credit{{budget=\"{}\"}} {}", b.id, format_micros(left));
        let _ = writeln!(out, "sideyard_budget_debt{{budget=\"{}\"}} {}", b.id, format_micros(fleet.debt(account)));
        let _ = writeln!(out, "sideyard_budget_ledger_reachable{{budget=\"{}\"}} {}", b.id, u8::from(reachable));
    }
}

/// The GenAI metrics of every target of `snapshot`.
fn render_genai(snapshot: &Snapshot, out: &mut String) {
    let mut labelled = Vec::new();
    for route in &snapshot.routes {
        for target in &route.targets {
            let labels = format!(
                "gen_ai_operation_name=\"{}\",gen_ai_provider_name=\"{}\",gen_ai_request_model=\"{}\",gen_ai_response_model=\"{}\",route=\"{}\",target=\"{}\"",
                route.serves.as_str(),
                escape(&target.provider),
                escape(&route.model),
                escape(&target.model),
                escape(&route.id),
                escape(&target.name),
            );
            labelled.push((labels, &target.state.genai));
        }
    }
    header(out, "gen_ai_client_token_usage", "histogram", "Tokens of each answer, by type (input or output).");
    for (labels, m) in &labelled {
        m.input_tokens.render(out, "gen_ai_client_token_usage", &format!("{labels},gen_ai_token_type=\"input\""));
        m.output_tokens.render(out, "gen_ai_client_token_usage", &format!("{labels},gen_ai_token_type=\"output\""));
    }
    type Render = fn(&GenAiMetrics, &mut String, &str, &str);
    let histograms: [(&str, &str, Render); 3] = [
        (
            "gen_ai_client_operation_duration_seconds",
            "Time from a request's arrival to the end of its answer.",
            |m, o, n, l| m.duration.render(o, n, l),
        ),
        (
            "gen_ai_client_operation_time_to_first_chunk_seconds",
            "Time from a streamed request's arrival to its first chunk of output (time to first token).",
            |m, o, n, l| m.first_chunk.render(o, n, l),
        ),
        (
            "gen_ai_server_time_per_output_token_seconds",
            "Time per output token after the first, of each streamed answer.",
            |m, o, n, l| m.per_output_token.render(o, n, l),
        ),
    ];
    for (name, help, each) in histograms {
        header(out, name, "histogram", help);
        for (labels, m) in &labelled {
            each(m, out, name, labels);
        }
    }
}
