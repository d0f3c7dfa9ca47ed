//! The command line: subcommands and flags only; each subcommand's logic lives in its module.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::api::units::parse_duration;
use crate::config::{Credential, MockOptions, UsageChunk, parse_count, parse_fail_status, parse_rate, parse_usage};
use crate::mock_provider::MockStats;
use crate::operator::inject::{InjectArgs, inject_manifests};
use crate::operator::{OperatorArgs, OperatorError};
use crate::sidecar::{SidecarArgs, SidecarError};

/// Exit status for an invalid configuration (EX_USAGE), so supervisors can tell it from a crash.
pub const EXIT_CONFIG: u8 = 64;

#[derive(Parser, Debug)]
#[command(
    name = "sideyard",
    version,
    about = "An LLM gateway that runs next to your application: routing, fallback, budgets and streaming for the OpenAI and Anthropic APIs.",
    after_help = "Every flag can also be set with the environment variable shown in its help."
)]
struct Cli {
    /// Log filter: a level (error, warn, info, debug, trace) or per-module directives such as
    /// `info,sideyard=debug`.
    #[arg(long, env = "SIDEYARD_LOG", default_value = "info", global = true)]
    log: String,

    /// Log line format: `text`, or `json` (one object per line, for log collectors).
    #[arg(long, env = "SIDEYARD_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"], global = true)]
    log_format: String,

    #[command(subcommand)]
    command: Command,
}

/// The flag of the commands that serve (sidecar, operator, mock provider).
#[derive(clap::Args, Debug)]
struct RuntimeArgs {
    /// Threads that serve requests. Default: the CPUs this process may run on (its affinity and
    /// cgroup quota); with one, a single-threaded runtime without cross-thread handoffs.
    #[arg(long, env = "SIDEYARD_WORKER_THREADS")]
    worker_threads: Option<usize>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the OpenAI and Anthropic APIs from ProviderRoute YAML files, reloading them when they
    /// change.
    Sidecar {
        #[command(flatten)]
        args: SidecarArgs,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Reconcile ProviderRoutes and ApiKeyBudgets into each namespace's sidecar configuration.
    Operator {
        #[command(flatten)]
        args: Box<OperatorArgs>,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
    /// Print manifests with the sidecar injected into their pods, as the webhook would inject it.
    Inject(InjectCmdArgs),
    /// Print the CustomResourceDefinitions as YAML, for `kubectl apply -f -`.
    Crd(CrdArgs),
    /// Run a fake OpenAI- and Anthropic-compatible provider, for tests, demos and load tests.
    MockProvider {
        #[command(flatten)]
        args: MockProviderArgs,
        #[command(flatten)]
        runtime: RuntimeArgs,
    },
}

#[derive(clap::Args, Debug)]
struct CrdArgs {
    /// Print them as the sideyard-crds chart's template: annotated `helm.sh/resource-policy: keep`.
    #[arg(long)]
    helm: bool,
}

#[derive(clap::Args, Debug)]
struct InjectCmdArgs {
    /// A YAML file of manifests (Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs,
    /// CronJobs, Lists; other kinds pass through unchanged), or `-` for standard input.
    #[arg(short = 'f', long = "file")]
    file: String,

    #[command(flatten)]
    inject: InjectArgs,
}

#[derive(clap::Args, Debug)]
struct MockProviderArgs {
    /// Address to listen on.
    #[arg(long, env = "SIDEYARD_MOCK_LISTEN", default_value = "127.0.0.1:7711")]
    listen: SocketAddr,

    #[command(flatten)]
    knobs: MockFlags,
}

/// The mock's knobs as flags; each one left out keeps [`MockOptions`]' default.
#[derive(clap::Args, Debug)]
struct MockFlags {
    /// Delay before the response headers [default: 0ms].
    #[arg(long, env = "SIDEYARD_MOCK_LATENCY", value_parser = parse_duration)]
    latency: Option<Duration>,

    /// Words in each answer; a stream sends one word per chunk. A request's `max_tokens` caps it
    /// [default: 8].
    #[arg(long, env = "SIDEYARD_MOCK_CHUNKS", value_parser = parse_count)]
    chunks: Option<u32>,

    /// Delay between streamed chunks [default: 20ms].
    #[arg(long, env = "SIDEYARD_MOCK_CHUNK_INTERVAL", value_parser = parse_duration)]
    chunk_interval: Option<Duration>,

    /// When a stream ends with a usage chunk: `requested` (when the request sets
    /// `stream_options.include_usage`, as OpenAI does), `always` or `never` [default: requested].
    #[arg(long, env = "SIDEYARD_MOCK_USAGE", value_parser = parse_usage)]
    usage: Option<UsageChunk>,

    /// Fraction of requests (0 to 1, decimal) that fail with `--fail-status` [default: 0].
    #[arg(long, env = "SIDEYARD_MOCK_FAIL_RATE", value_parser = parse_rate)]
    fail_rate: Option<u64>,

    /// HTTP status of injected failures [default: 500].
    #[arg(long, env = "SIDEYARD_MOCK_FAIL_STATUS", value_parser = parse_fail_status)]
    fail_status: Option<u16>,

    /// Break the connection after this many streamed chunks (or, for JSON, before the body).
    #[arg(long, env = "SIDEYARD_MOCK_RESET_AFTER", value_parser = parse_count)]
    reset_after: Option<u32>,

    /// Stop sending, leaving the connection open, after this many streamed chunks.
    #[arg(long, env = "SIDEYARD_MOCK_STALL_AFTER", value_parser = parse_count)]
    stall_after: Option<u32>,

    /// End a stream with the provider's own error event after this many streamed chunks
    /// (`overloaded_error` in a Messages stream, an error chunk in a chat stream).
    #[arg(long, env = "SIDEYARD_MOCK_ERROR_AFTER", value_parser = parse_count)]
    error_after: Option<u32>,

    /// Never send response headers.
    #[arg(long, env = "SIDEYARD_MOCK_HANG")]
    hang: bool,

    /// Answer 401 unless the request carries `Authorization: Bearer <KEY>` (or, on
    /// `/v1/messages`, `x-api-key: <KEY>`).
    #[arg(long, env = "SIDEYARD_MOCK_REQUIRE_KEY", hide_env_values = true, value_parser = Credential::parse)]
    require_key: Option<Credential>,
}

impl MockFlags {
    fn options(self) -> MockOptions {
        let d = MockOptions::default();
        MockOptions {
            latency: self.latency.unwrap_or(d.latency),
            chunks: self.chunks.unwrap_or(d.chunks),
            chunk_interval: self.chunk_interval.unwrap_or(d.chunk_interval),
            usage: self.usage.unwrap_or(d.usage),
            fail_rate: self.fail_rate.unwrap_or(d.fail_rate),
            fail_status: self.fail_status.unwrap_or(d.fail_status),
            reset_after: self.reset_after.or(d.reset_after),
            stall_after: self.stall_after.or(d.stall_after),
            error_after: self.error_after.or(d.error_after),
            hang: self.hang || d.hang,
            require_key: self.require_key.or(d.require_key),
        }
    }
}

/// Runs the command line and returns the process exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Access lines are asked for by their own flag, whatever level `--log` sets.
    let filter = match &cli.command {
        Command::Sidecar { args, .. } if args.access_log => {
            format!("{},{}=info", cli.log, crate::sidecar::ACCESS_LOG_TARGET)
        }
        _ => cli.log.clone(),
    };
    crate::logs::init(&filter, cli.log_format == "json");
    match cli.command {
        Command::Crd(args) => {
            print!("{}", if args.helm { crate::api::crds_helm_yaml() } else { crate::api::crds_yaml() });
            ExitCode::SUCCESS
        }
        Command::Sidecar { args, runtime: threads } => {
            match runtime(threads.worker_threads).map(|rt| rt.block_on(crate::sidecar::run(args, shutdown_signal()))) {
                Ok(Ok(())) => ExitCode::SUCCESS,
                Ok(Err(SidecarError::Config(errors))) => {
                    // Printed once, not also as log lines: the process stops on it.
                    eprintln!("sideyard: invalid configuration:\n{errors}");
                    ExitCode::from(EXIT_CONFIG)
                }
                Ok(Err(SidecarError::Io(e))) | Err(e) => fail(&e),
            }
        }
        Command::Operator { args, runtime: threads } => {
            match runtime(threads.worker_threads).map(|rt| rt.block_on(crate::operator::run(*args, shutdown_signal())))
            {
                Ok(Ok(())) => ExitCode::SUCCESS,
                Ok(Err(OperatorError::Usage(e))) => {
                    tracing::error!("{e}");
                    eprintln!("sideyard: {e}");
                    ExitCode::from(EXIT_CONFIG)
                }
                Ok(Err(OperatorError::Failed(e))) | Err(e) => fail(&e),
            }
        }
        Command::Inject(args) => match run_inject(&args) {
            Ok(out) => {
                print!("{out}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::MockProvider { args, runtime: threads } => {
            let result = runtime(threads.worker_threads).and_then(|rt| {
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::bind(args.listen)
                        .await
                        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
                    let addr = listener.local_addr().map_err(|e| e.to_string())?;
                    let options = args.knobs.options();
                    tracing::info!(listen = %addr, ?options, "mock provider serving");
                    crate::mock_provider::serve(listener, options, Arc::new(MockStats::default()), shutdown_signal())
                        .await
                        .map_err(|e| e.to_string())
                })
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
    }
}

fn run_inject(args: &InjectCmdArgs) -> Result<String, String> {
    let params = args.inject.params()?;
    let text = if args.file == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| format!("cannot read standard input: {e}"))?
    } else {
        std::fs::read_to_string(&args.file).map_err(|e| format!("cannot read {}: {e}", args.file))?
    };
    let source = if args.file == "-" { "<stdin>" } else { &args.file };
    inject_manifests(&text, &params).map_err(|e| format!("{source}: {e}"))
}

fn fail(message: &str) -> ExitCode {
    tracing::error!("{message}");
    eprintln!("sideyard: {message}");
    ExitCode::FAILURE
}

fn runtime(worker_threads: Option<usize>) -> Result<tokio::runtime::Runtime, String> {
    let threads = worker_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all().build().map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// Resolves on SIGTERM (how Kubernetes stops a pod) or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
