//! The `product-sync` binary: parses the command line, loads configuration, sets up logging
//! and hands over to the library. Exit codes: 0 success, 1 runtime failure, 2 usage or
//! configuration error.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use product_sync::app::Application;
use product_sync::config::{self, LogFormat, LogSettings, Settings, Sources};
use product_sync::sim::{Catalogue, Faults, Sim, SimConfig};
use product_sync::{store, telemetry};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "product-sync",
    version,
    about = "Keeps product data in step with the management system, driven by Kafka commands."
)]
struct Cli {
    /// Extra configuration file, layered over config/default.toml and config/$PRODUCT_SYNC_ENV.toml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Watch the pipeline work on embedded parts (mock broker, SQLite, simulator); needs nothing installed.
    Demo {
        /// Keep the SQLite store afterwards and print where it is.
        #[arg(long)]
        keep: bool,
        /// Size of the simulated catalogue.
        #[arg(long, default_value_t = 400)]
        products: usize,
    },
    /// Print the effective configuration (secrets redacted) and exit; 2 when it is invalid.
    Config,
    /// Apply pending database migrations to `database.url` and exit.
    Migrate,
    /// Run the service: consume product-request commands, fetch, fold, publish changes.
    Run,
    /// Publish a product-request command from flags; prints its request id.
    Request {
        /// A keyword the products share.
        #[arg(long)]
        keyword: Option<String>,
        /// Product codes, comma-separated.
        #[arg(long, value_delimiter = ',')]
        codes: Vec<String>,
        /// A product category.
        #[arg(long)]
        category: Option<String>,
        /// Only products changed since this RFC 3339 time.
        #[arg(long, value_parser = product_sync::tools::parse_since)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// The request id (default: a new one).
        #[arg(long)]
        id: Option<String>,
        /// Who asks (carried in the command).
        #[arg(long)]
        requested_by: Option<String>,
    },
    /// Follow a topic and pretty-print its events (Ctrl-C stops).
    Tail {
        /// Which topic: changes, results, dlq or requests.
        #[arg(long, default_value = "changes", value_parser = ["changes", "results", "dlq", "requests"])]
        topic: String,
        /// Start from the beginning of the topic instead of new records only.
        #[arg(long)]
        from_beginning: bool,
        /// Stop after this many records.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Print the JSON Schemas of the command, the change event and the result event.
    Schema,
    /// Inspect or replay the dead-letter topic.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Inspect the outbox: rows the broker refused for good (parked), and release them.
    #[command(subcommand)]
    Outbox(OutboxCommand),
    /// Run the contract simulator: a management system and governance platform on HTTP.
    Simulate(Box<SimulateArgs>),
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Print every record of `topics.dlq` with its reason.
    List,
    /// Put DLQ records back on `topics.requests` (each record once).
    Replay {
        /// Only records whose failure was `transient` or `permanent`.
        #[arg(long, value_parser = ["transient", "permanent"])]
        only: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum OutboxCommand {
    /// Print every parked row (one JSON object a line) with the broker's refusal.
    Parked,
    /// Put parked rows back in the relay's queue (all of them, or those named), once the
    /// cause is fixed (e.g. the topic's max.message.bytes raised).
    Unpark {
        /// Queue ids (`pending_id` in `outbox parked`); none means every parked row.
        ids: Vec<i64>,
    },
}

/// Options of `simulate`. The first line on stdout is `listening on http://IP:PORT`.
#[derive(Debug, Args)]
struct SimulateArgs {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Size of the generated catalogue (ignored with --catalogue).
    #[arg(long, default_value_t = 1000)]
    products: usize,
    /// Seed of the generated catalogue and of fault randomness.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Load the catalogue from a JSON file (`{"items":[…]}` or an array of records).
    #[arg(long, value_name = "FILE")]
    catalogue: Option<PathBuf>,
    /// OAuth2 client id the token endpoint accepts.
    #[arg(long, default_value = "product-sync")]
    client_id: String,
    /// OAuth2 client secret the token endpoint accepts.
    #[arg(
        long,
        env = "SIM_CLIENT_SECRET",
        default_value = "local-dev-secret",
        hide_env_values = true
    )]
    client_secret: String,
    /// Lifetime of issued tokens, in seconds.
    #[arg(long, default_value_t = 300)]
    token_ttl_s: u64,
    /// App ids the governance platform accepts (repeatable).
    #[arg(long = "app-id", default_value = "product-sync")]
    app_ids: Vec<String>,
    /// Lease of governance registrations, in seconds.
    #[arg(long, default_value_t = 30)]
    lease_s: u64,
    /// Fraction of product requests answered with 500.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Fraction of product requests answered with 429.
    #[arg(long, default_value_t = 0.0)]
    throttle_rate: f64,
    /// Retry-After of those 429 answers, in seconds.
    #[arg(long, default_value_t = 1)]
    retry_after_s: u64,
    /// Latency added to every product request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Fraction of product requests answered with a body that is not JSON.
    #[arg(long, default_value_t = 0.0)]
    malformed_rate: f64,
    /// Fraction of product responses cut off mid-body.
    #[arg(long, default_value_t = 0.0)]
    drop_rate: f64,
    /// Fraction of pages carrying one record that breaks the contract.
    #[arg(long, default_value_t = 0.0)]
    bad_record_rate: f64,
    /// Refuse tokens this many seconds after issue (tokens that expire early).
    #[arg(long)]
    token_revoke_after_s: Option<u64>,
    /// Log level of the simulator.
    #[arg(long, default_value = "info")]
    log_level: String,
}

// Four workers even on two cores: a partition revoke blocks the polling thread while the
// revoked partitions' workers finish, and they need threads of their own to do so.
#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate(args) => {
            telemetry::init(&LogSettings {
                level: args.log_level.clone(),
                format: LogFormat::Pretty,
            });
            exit(simulate(*args).await)
        }
        Command::Demo { keep, products } => {
            // The demo speaks for itself; only real errors are logged (the mock broker's
            // connection chatter at teardown is not one).
            telemetry::init(&LogSettings {
                level: "error,librdkafka=off,rdkafka=off".into(),
                format: LogFormat::Pretty,
            });
            exit(product_sync::demo::run(product_sync::demo::DemoOptions { keep, products }).await)
        }
        Command::Config => match settings(cli.config) {
            Ok(settings) => {
                println!("{settings}");
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Migrate => match settings(cli.config) {
            Ok(settings) => exit(migrate(settings).await),
            Err(code) => code,
        },
        Command::Run => match settings(cli.config) {
            Ok(settings) => exit(run(settings).await),
            Err(code) => code,
        },
        Command::Schema => {
            println!(
                "{}",
                serde_json::to_string_pretty(&product_sync::tools::schemas()).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Command::Request {
            keyword,
            codes,
            category,
            since,
            id,
            requested_by,
        } => match settings(cli.config) {
            Ok(settings) => {
                let selector = product_sync::command::Selector {
                    keyword,
                    product_codes: codes,
                    category,
                    updated_since: since,
                };
                match product_sync::tools::request(&settings, id, selector, requested_by).await {
                    Ok(id) => {
                        println!("{id}");
                        ExitCode::SUCCESS
                    }
                    Err(e @ product_sync::tools::ToolError::Invalid(_)) => {
                        eprintln!("product-sync: {e}; see `product-sync request --help`");
                        ExitCode::from(2)
                    }
                    Err(e) => exit(Err(anyhow::Error::new(e).context(format!(
                        "publishing to {} at {} (is the broker up? deploy/local/kafka.sh up)",
                        settings.topics.requests, settings.kafka.bootstrap_servers
                    )))),
                }
            }
            Err(code) => code,
        },
        Command::Tail {
            topic,
            from_beginning,
            count,
        } => match settings(cli.config) {
            Ok(settings) => {
                let name = match topic.as_str() {
                    "results" => settings.topics.results.clone(),
                    "dlq" => settings.topics.dlq.clone(),
                    "requests" => settings.topics.requests.clone(),
                    _ => settings.topics.changes.clone(),
                };
                let stop = CancellationToken::new();
                let signal = stop.clone();
                tokio::spawn(async move {
                    shutdown_signal().await;
                    signal.cancel();
                });
                exit(
                    product_sync::tools::tail(&settings, &name, from_beginning, count, stop)
                        .await
                        .map(|_| ())
                        .with_context(|| format!("following {name}")),
                )
            }
            Err(code) => code,
        },
        Command::Dlq(command) => match settings(cli.config) {
            Ok(settings) => exit(dlq(settings, command).await),
            Err(code) => code,
        },
        Command::Outbox(command) => match settings(cli.config) {
            Ok(settings) => exit(outbox(settings, command).await),
            Err(code) => code,
        },
    }
}

/// Loads configuration and starts logging; a configuration error exits with 2.
fn settings(file: Option<PathBuf>) -> Result<Settings, ExitCode> {
    let sources = Sources {
        file,
        ..Sources::default()
    };
    match config::load(&sources) {
        Ok(settings) => {
            telemetry::init(&settings.log);
            Ok(settings)
        }
        Err(e) => {
            eprintln!("product-sync: configuration error: {e}");
            Err(ExitCode::from(2))
        }
    }
}

fn exit(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "product-sync failed");
            eprintln!("product-sync: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn migrate(settings: Settings) -> anyhow::Result<()> {
    let db = store::connect(&settings.database).await?;
    store::migrate(&db).await?;
    println!("migrations applied to {}", settings.database.redacted_url());
    Ok(())
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    let stop = CancellationToken::new();
    let signal = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested");
        signal.cancel();
    });
    let app = tokio::select! {
        app = Application::build(settings) => app.context("starting product-sync")?,
        _ = stop.cancelled() => return Ok(()),
    };
    app.run_until_stopped(stop)
        .await
        .context("running product-sync")?;
    Ok(())
}

async fn dlq(settings: Settings, command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List => {
            let entries = product_sync::dlq::list(&settings)
                .await
                .context("reading the DLQ")?;
            for e in &entries {
                println!("{}", serde_json::to_string(e)?);
            }
            eprintln!("{} record(s) in {}", entries.len(), settings.topics.dlq);
        }
        DlqCommand::Replay { only } => {
            let n = product_sync::dlq::replay(&settings, only.as_deref())
                .await
                .context("replaying the DLQ")?;
            println!(
                "replayed {n} record(s) from {} to {}",
                settings.topics.dlq, settings.topics.requests
            );
        }
    }
    Ok(())
}

async fn outbox(settings: Settings, command: OutboxCommand) -> anyhow::Result<()> {
    let db = store::connect(&settings.database).await?;
    match command {
        OutboxCommand::Parked => {
            let rows = product_sync::outbox::queue::parked(&db)
                .await
                .context("reading parked rows")?;
            for r in &rows {
                println!("{}", serde_json::to_string(r)?);
            }
            eprintln!("{} parked row(s)", rows.len());
        }
        OutboxCommand::Unpark { ids } => {
            let n = product_sync::outbox::queue::unpark(&db, &ids)
                .await
                .context("releasing parked rows")?;
            println!("{n} row(s) back in the relay's queue");
        }
    }
    Ok(())
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    let catalogue = match &args.catalogue {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading catalogue {}", path.display()))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("parsing catalogue {}", path.display()))?;
            Catalogue::from_json(&value)
                .map_err(|(i, e)| anyhow::anyhow!("catalogue {} record {i}: {e}", path.display()))?
        }
        None => Catalogue::generate(args.products, args.seed),
    };
    let products = catalogue.len();
    let sim = Sim::new(
        SimConfig {
            client_id: args.client_id,
            client_secret: args.client_secret,
            token_ttl: Duration::from_secs(args.token_ttl_s),
            app_ids: args.app_ids,
            lease_seconds: args.lease_s,
            faults: Faults {
                error_rate: args.error_rate,
                throttle_rate: args.throttle_rate,
                retry_after_s: args.retry_after_s,
                latency_ms: args.latency_ms,
                malformed_rate: args.malformed_rate,
                drop_rate: args.drop_rate,
                bad_record_rate: args.bad_record_rate,
                token_revoke_after_s: args.token_revoke_after_s,
                ..Faults::default()
            },
            seed: args.seed,
        },
        catalogue,
    );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = listener.local_addr()?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{bound}")?;
        out.flush()?;
    }
    tracing::info!(%bound, products, "simulator serving the management-system and governance contract");
    let stop = CancellationToken::new();
    let signal = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal.cancel();
    });
    sim.serve(listener, stop).await?;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
