//! The sidecar process: start-up, hot reload, rejection of bad configurations, draining on SIGTERM,
//! flags from the environment, and the command line's help.

mod common;

use std::path::Path;

use common::*;

fn route(model: &str, extra_target: &str) -> String {
    route_yaml(model, "", &[&format!("{{name: mock, api: mock{extra_target}}}")])
}

/// Replaces a file the way editors and Kubernetes do: write elsewhere, then rename.
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn status_of(api: std::net::SocketAddr, model: &str) -> u16 {
    post(api, "/v1/chat/completions", &format!(r#"{{"model":"{model}"}}"#)).await.status.as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn reloads_good_configs_and_keeps_serving_through_bad_ones() {
    let sidecar = Sidecar::start(&route("alpha", ""));
    assert_eq!(status_of(sidecar.api, "alpha").await, 200);
    let reloads = |result: &'static str| {
        let admin = sidecar.admin;
        async move {
            let m = get(admin, "/metrics").await.body;
            metric(&m, &format!("sideyard_config_reloads_total{{result=\"{result}\"}}"))
        }
    };

    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert!(metrics.contains("route=\"default/alpha\""), "{metrics}");
    replace(&sidecar.config_path, &route("beta", ""));
    eventually("beta is served", || async { status_of(sidecar.api, "beta").await == 200 }).await;
    assert_eq!(status_of(sidecar.api, "alpha").await, 404, "the old route is gone");
    assert_eq!(reloads("success").await, 1);
    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert!(!metrics.contains("default/alpha"), "the removed route's series end with the reload:\n{metrics}");
    assert!(metrics.contains("route=\"default/beta\""), "{metrics}");

    // Broken YAML: rejected, counted, logged with the file; beta keeps serving.
    replace(&sidecar.config_path, "apiVersion: sideyard.dev/v1alpha1\nkind: ProviderRoute\nspec: [\n");
    eventually("the broken file is rejected", || async { reloads("failure").await == 1 }).await;
    assert_eq!(status_of(sidecar.api, "beta").await, 200);
    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, "sideyard_config_last_reload_success"), 0);
    assert_eq!(get(sidecar.admin, "/readyz").await.status, 200, "still ready on the last good config");
    let log = sidecar.process.log();
    assert!(log.contains("routes.yaml: document 1: invalid YAML"), "{log}");
    assert!(log.contains("still serving the previous one"), "{log}");

    // Valid YAML, invalid route: rejected with the field path.
    replace(&sidecar.config_path, &route("gamma", ", weight: 0"));
    eventually("the invalid route is rejected", || async { reloads("failure").await == 2 }).await;
    assert_eq!(status_of(sidecar.api, "gamma").await, 404);
    assert_eq!(status_of(sidecar.api, "beta").await, 200);
    assert!(
        sidecar
            .process
            .log()
            .contains("document 1 (ProviderRoute default/gamma): spec.targets[0].weight: 0 is out of range 1 to 1000"),
        "{}",
        sidecar.process.log()
    );
    // The same bad file is not reported again on every check.
    let checks = || async { metric(&get(sidecar.admin, "/metrics").await.body, "sideyard_config_source_checks_total") };
    let seen = checks().await;
    eventually("three more checks of the files", || async { checks().await >= seen + 3 }).await;
    assert_eq!(reloads("failure").await, 2);

    replace(&sidecar.config_path, &route("gamma", ""));
    eventually("the fixed config is served", || async { status_of(sidecar.api, "gamma").await == 200 }).await;
    let metrics = get(sidecar.admin, "/metrics").await.body;
    assert_eq!(metric(&metrics, "sideyard_config_last_reload_success"), 1);
    assert_eq!(metric(&metrics, r#"sideyard_config_reloads_total{result="success"}"#), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn reloads_when_a_credential_file_changes() {
    let dir = temp_dir("credfile");
    let key_file = dir.join("key");
    std::fs::write(&key_file, "first-key\n").unwrap();
    let mock = format!(", credentials: {{file: {}}}", key_file.display());
    let sidecar = Sidecar::start(&route("keyed", &mock));
    assert_eq!(status_of(sidecar.api, "keyed").await, 200);
    replace(&key_file, "second-key\n");
    eventually("the new key is loaded", || async {
        let m = get(sidecar.admin, "/metrics").await.body;
        metric(&m, r#"sideyard_config_reloads_total{result="success"}"#) == 1
    })
    .await;
    std::fs::remove_file(&key_file).unwrap();
    eventually("a vanished key file is rejected", || async {
        let m = get(sidecar.admin, "/metrics").await.body;
        metric(&m, r#"sideyard_config_reloads_total{result="failure"}"#) == 1
    })
    .await;
    assert!(
        sidecar.process.log().contains("spec.targets[0].credentials: cannot read file"),
        "{}",
        sidecar.process.log()
    );
    assert_eq!(status_of(sidecar.api, "keyed").await, 200);
}

#[test]
fn an_invalid_config_at_start_exits_64_naming_the_problem() {
    let dir = temp_dir("badstart");
    let path = dir.join("routes.yaml");
    std::fs::write(
        &path,
        "apiVersion: sideyard.dev/v1alpha1\nkind: ProviderRoute\nmetadata: {name: x}\nspec:\n  model: x\n  targets:\n    - {name: a, baseUrl: 'https://api.example.com/v1', credentials: {secretRef: {name: openai, key: api-key}}}\n",
    )
    .unwrap();
    let (code, _, stderr) = run(&["sidecar", "-f", path.to_str().unwrap(), "--listen", "127.0.0.1:0"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(
        stderr.contains("routes.yaml: document 1 (ProviderRoute default/x): spec.targets[0].credentials: secret \"openai\" not found"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("not found").count(), 1, "printed once, not also as a log line: {stderr}");

    let (code, _, stderr) = run(&["sidecar", "-f", "/nonexistent/routes.yaml"]);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("/nonexistent/routes.yaml: No such file or directory"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn require_key_without_a_budget_warns_that_every_request_is_refused() {
    let sidecar = Sidecar::start_with(&route("chat", ""), &["--require-key"], &[]);
    assert_eq!(status_of(sidecar.api, "chat").await, 401);
    let log = sidecar.process.log();
    assert!(log.contains("WARN") && log.contains("every request will be refused"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_in_flight_streams_then_exits() {
    let mut sidecar = Sidecar::start(&route("slow", ", baseUrl: 'mock://local?chunks=10&chunk-interval=60ms'"));
    let response = send(sidecar.api, "POST", "/v1/chat/completions", r#"{"model":"slow","stream":true}"#).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = next_chunk(&mut body).await.expect("first chunk");

    sidecar.process.terminate();
    eventually("readiness fails while draining", || async { get(sidecar.admin, "/readyz").await.status == 503 }).await;
    eventually("new connections are refused", || async { tokio::net::TcpStream::connect(sidecar.api).await.is_err() })
        .await;
    let text = String::from_utf8_lossy(&first).into_owned() + &rest(&mut body).await;
    assert!(text.ends_with("data: [DONE]\n\n"), "the in-flight stream finished: {text}");
    let words =
        sse_data(&text).iter().filter(|d| d.contains("\"content\":\"") && !d.contains("\"content\":\"\"")).count();
    assert_eq!(words, 10, "{text}");
    let status = sidecar.process.wait_exit();
    assert!(status.success(), "{status:?}\n{}", sidecar.process.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_drain_timeout_bounds_shutdown() {
    let mut sidecar = Sidecar::start_with(
        &route("endless", ", baseUrl: 'mock://local?chunks=1000&chunk-interval=50ms'"),
        &["--drain-timeout", "300ms"],
        &[],
    );
    let response = send(sidecar.api, "POST", "/v1/chat/completions", r#"{"model":"endless","stream":true}"#).await;
    let mut body = response.into_body();
    next_chunk(&mut body).await.expect("first chunk");
    sidecar.process.terminate();
    let status = sidecar.process.wait_exit();
    assert!(status.success(), "{status:?}");
    assert!(sidecar.process.log().contains("drain timeout reached"), "{}", sidecar.process.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn flags_can_come_from_the_environment() {
    let dir = temp_dir("envflags");
    let path = dir.join("routes.yaml");
    std::fs::write(&path, route("envy", "")).unwrap();
    let (process, line) = Process::start(
        &["sidecar"],
        &[
            ("SIDEYARD_FILES", path.to_str().unwrap()),
            ("SIDEYARD_LISTEN", "127.0.0.1:0"),
            ("SIDEYARD_ADMIN_LISTEN", "127.0.0.1:0"),
            ("SIDEYARD_LOG", "debug"),
        ],
        "serving",
    );
    let api = addr_after(&line, "api=");
    assert_eq!(status_of(api, "envy").await, 200);
    drop(process);
}

#[test]
fn every_subcommand_documents_its_flags() {
    let (code, stdout, _) = run(&["--version"]);
    assert_eq!(code, Some(0));
    assert_eq!(stdout.trim(), format!("sideyard {}", env!("CARGO_PKG_VERSION")));

    let expectations: [(&str, &[&str]); 5] = [
        (
            "sidecar",
            &[
                "--file",
                "SIDEYARD_FILES",
                "--listen",
                "SIDEYARD_LISTEN",
                "--admin-listen",
                "--reload-interval",
                "--drain-timeout",
                "--max-request-bytes",
                "--max-response-bytes",
                "--upstream-ca-file",
                "--pod-labels-file",
                "SIDEYARD_POD_LABELS_FILE",
                "--log",
                "SIDEYARD_LOG",
                "--log-format",
                "--worker-threads",
            ],
        ),
        (
            "operator",
            &[
                "--worker-threads",
                "--admin-listen",
                "--leader-elect",
                "--lease-name",
                "--lease-namespace",
                "--identity",
                "--lease-duration",
                "--renew-deadline",
                "--retry-period",
                "SIDEYARD_LEASE_DURATION",
                "--webhook-listen",
                "--webhook-cert-dir",
                "--ledger-listen",
                "--ledger-url",
                "--proxy-image",
                "--log-format",
            ],
        ),
        ("inject", &["--file", "--proxy-image", "--native-sidecar", "--proxy-memory-limit", "SIDEYARD_PROXY_IMAGE"]),
        (
            "mock-provider",
            &[
                "--worker-threads",
                "--listen",
                "--latency",
                "--chunks",
                "--chunk-interval",
                "--usage",
                "--fail-rate",
                "--fail-status",
                "--reset-after",
                "--stall-after",
                "--hang",
                "--require-key",
                "SIDEYARD_MOCK_LATENCY",
            ],
        ),
        ("crd", &["--log"]),
    ];
    for (subcommand, flags) in expectations {
        let (code, stdout, stderr) = run(&[subcommand, "--help"]);
        assert_eq!(code, Some(0), "{stderr}");
        for flag in flags {
            assert!(stdout.contains(flag), "`sideyard {subcommand} --help` does not mention {flag}:\n{stdout}");
        }
    }
    // A flag of the serving commands is not offered where it does nothing.
    for subcommand in ["crd", "inject"] {
        let (_, stdout, _) = run(&[subcommand, "--help"]);
        assert!(!stdout.contains("--worker-threads"), "`sideyard {subcommand} --help`:\n{stdout}");
    }
    let (_, stdout, _) = run(&["--help"]);
    assert!(stdout.contains("OpenAI and Anthropic APIs"), "{stdout}");
    let (code, _, stderr) = run(&["sidecar"]);
    assert_eq!(code, Some(2), "missing --file is a usage error");
    assert!(stderr.contains("--file"), "{stderr}");

    let (code, _, stderr) = run(&["operator", "--renew-deadline", "20s"]);
    assert_eq!(code, Some(64), "inconsistent lease timings are a configuration error");
    assert!(stderr.contains("--renew-deadline shorter than --lease-duration"), "{stderr}");
}

/// `sidecar::run` takes its shutdown future from the caller: it runs in a test's own runtime and
/// stops, draining, when that future completes.
#[tokio::test(flavor = "multi_thread")]
async fn the_sidecar_runs_in_process_until_its_shutdown_future_completes() {
    use clap::Parser;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        args: sideyard::sidecar::SidecarArgs,
    }
    let free_port = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (api, admin) = (free_port(), free_port());
    let dir = temp_dir("in-process");
    let file = dir.join("routes.yaml");
    std::fs::write(&file, route("chat", "")).unwrap();
    let command = Command::parse_from([
        "sidecar".to_string(),
        format!("--file={}", file.display()),
        format!("--listen={api}"),
        format!("--admin-listen={admin}"),
        format!("--state-dir={}", dir.join("state").display()),
    ]);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(sideyard::sidecar::run(command.args, async {
        let _ = stopped.await;
    }));
    eventually("the API listens", || async { tokio::net::TcpStream::connect(api).await.is_ok() }).await;
    assert_eq!(status_of(api, "chat").await, 200);
    stop.send(()).unwrap();
    let result = tokio::time::timeout(PATIENCE, running).await.expect("it stops").expect("it did not panic");
    assert!(result.is_ok(), "{result:?}");
    assert!(tokio::net::TcpStream::connect(api).await.is_err(), "the listener is closed");
}
