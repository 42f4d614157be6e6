//! What each subcommand of the binary does, on top of the library: the binary's edge, where
//! errors become messages and exit codes (0 success, 1 runtime failure, 2 usage).

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use product_sync::app::Application;
use product_sync::config::Settings;
use product_sync::wire::FailureClass;
use product_sync::{store, tools};
use tokio_util::sync::CancellationToken;

/// Options of `request`.
#[derive(Debug, Args)]
pub struct RequestArgs {
    /// The management system (default: `upstream.system`).
    #[arg(long)]
    pub system: Option<String>,
    /// A keyword the products share.
    #[arg(long)]
    pub keyword: Option<String>,
    /// Product codes, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub codes: Vec<String>,
    /// A product category.
    #[arg(long)]
    pub category: Option<String>,
    /// Only products changed since this RFC 3339 time, or `watermark`: the system's stored
    /// watermark less the schedule's overlap.
    #[arg(long, value_parser = product_sync::tools::parse_since)]
    pub since: Option<product_sync::command::Since>,
    /// The request id (default: a new one).
    #[arg(long)]
    pub id: Option<String>,
    /// Who asks (carried in the command).
    #[arg(long)]
    pub requested_by: Option<String>,
    /// The system's whole catalogue (stands alone).
    #[arg(long, conflicts_with_all = ["keyword", "codes", "category", "since"])]
    pub all: bool,
    /// A snapshot: what the store holds in scope (`--all` or `--category`) and the
    /// management system no longer answers is delisted.
    #[arg(long)]
    pub snapshot: bool,
    /// Let a snapshot delist past `upstream.max_delist_ratio`.
    #[arg(long, requires = "snapshot")]
    pub force: bool,
    /// Compare only: write nothing, emit no change event; the result reports the drift.
    #[arg(long)]
    pub dry_run: bool,
}

/// Options of `notify`.
#[derive(Debug, Args)]
pub struct NotifyArgs {
    /// The management system (default: `upstream.system`).
    #[arg(long)]
    pub system: Option<String>,
    /// The product codes that changed, comma-separated (at most 500).
    #[arg(long, value_delimiter = ',', required = true)]
    pub codes: Vec<String>,
}

/// Options of `tail`.
#[derive(Debug, Args)]
pub struct TailArgs {
    /// Which topic: changes, results, dlq, requests, state (a tombstone prints as null) or
    /// notifications.
    #[arg(long, default_value = "changes", value_parser = ["changes", "results", "dlq", "requests", "state", "notifications"])]
    pub topic: String,
    /// Start from the beginning of the topic instead of new records only.
    #[arg(long)]
    pub from_beginning: bool,
    /// Stop after this many records.
    #[arg(long)]
    pub count: Option<usize>,
}

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// Print every record of `topics.dlq` with its reason.
    List,
    /// Put DLQ records back on `topics.requests` (a refused notification on
    /// `topics.notifications`), each record once.
    Replay {
        /// Only records whose failure was `transient` or `permanent`.
        #[arg(long, value_parser = ["transient", "permanent"])]
        only: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Print every parked row (one JSON object a line) with the broker's refusal.
    Parked,
    /// Put parked rows back in the relay's queue (all of them, or those named), once the
    /// cause is fixed (e.g. the topic's max.message.bytes raised).
    Unpark {
        /// Queue ids (`pending_id` in `outbox parked`); none means every parked row.
        ids: Vec<i64>,
    },
}

#[cfg(feature = "dev-tools")]
/// Options of `simulate`. The first line on stdout is `listening on http://IP:PORT` (https
/// with --tls-cert).
#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Serve several management systems, comma-separated: the first on --listen, each next
    /// one on the next port (or a free one with port 0), each with its own catalogue (seed +
    /// its position), faults and secret (`<client-secret>-<name>` after the first). One line
    /// per system on stdout: `<name> listening on http://IP:PORT` (https with --tls-cert).
    #[arg(long, value_delimiter = ',')]
    pub systems: Vec<String>,
    /// Size of the generated catalogue (ignored with --catalogue).
    #[arg(long, default_value_t = 1000)]
    pub products: usize,
    /// Seed of the generated catalogue and of fault randomness.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Load the catalogue from a JSON file (`{"items":[…]}` or an array of records).
    #[arg(long, value_name = "FILE")]
    pub catalogue: Option<std::path::PathBuf>,
    /// OAuth2 client id the token endpoint accepts.
    #[arg(long, default_value = "product-sync")]
    pub client_id: String,
    /// OAuth2 client secret the token endpoint accepts.
    #[arg(
        long,
        env = "SIM_CLIENT_SECRET",
        default_value = "local-dev-secret",
        hide_env_values = true
    )]
    pub client_secret: String,
    /// Lifetime of issued tokens, in seconds.
    #[arg(long, default_value_t = 300)]
    pub token_ttl_s: u64,
    /// App ids the governance platform accepts (repeatable).
    #[arg(long = "app-id", default_value = "product-sync")]
    pub app_ids: Vec<String>,
    /// Lease of governance registrations, in seconds.
    #[arg(long, default_value_t = 30)]
    pub lease_s: u64,
    /// Fraction of product requests answered with 500.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Fraction of product requests answered with 429.
    #[arg(long, default_value_t = 0.0)]
    pub throttle_rate: f64,
    /// Retry-After of those 429 answers, in seconds.
    #[arg(long, default_value_t = 1)]
    pub retry_after_s: u64,
    /// Latency added to every product request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Fraction of product requests answered with a body that is not JSON.
    #[arg(long, default_value_t = 0.0)]
    pub malformed_rate: f64,
    /// Fraction of product responses cut off mid-body.
    #[arg(long, default_value_t = 0.0)]
    pub drop_rate: f64,
    /// Fraction of pages carrying one record that breaks the contract.
    #[arg(long, default_value_t = 0.0)]
    pub bad_record_rate: f64,
    /// Refuse tokens this many seconds after issue (tokens that expire early).
    #[arg(long)]
    pub token_revoke_after_s: Option<u64>,
    /// Log level of the simulator.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Serve https with this PEM certificate chain (with --tls-key); stdout then says
    /// `listening on https://…`.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The PKCS#8 PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
}

/// `schema`: the JSON Schemas of everything product-sync reads and writes on Kafka.
pub fn schema() -> ExitCode {
    println!(
        "{}",
        serde_json::to_string_pretty(&tools::schemas()).unwrap_or_default()
    );
    ExitCode::SUCCESS
}

/// `config`: the effective configuration, secrets redacted.
pub async fn print_config(settings: Settings) -> ExitCode {
    println!("{settings}");
    ExitCode::SUCCESS
}

/// `migrate`.
pub async fn migrate(settings: Settings) -> ExitCode {
    exit(
        async {
            let db = store::connect(&settings.database).await?;
            store::migrate(&db).await?;
            println!("migrations applied to {}", settings.database.redacted_url());
            Ok(())
        }
        .await,
    )
}

/// `run`: the service, until SIGINT or SIGTERM.
pub async fn run(settings: Settings) -> ExitCode {
    let stop = stop_on_signal();
    exit(
        async {
            let app = tokio::select! {
                app = Application::build(settings) => app.context("starting product-sync")?,
                _ = stop.cancelled() => return Ok(()),
            };
            app.run_until_stopped(stop)
                .await
                .context("running product-sync")
        }
        .await,
    )
}

/// `request`: publishes one command.
/// `notify`: publishes a change notification.
pub async fn notify(settings: Settings, args: NotifyArgs) -> ExitCode {
    match tools::notify(&settings, args.system, args.codes).await {
        Ok(topic) => {
            println!("notified on {topic}");
            ExitCode::SUCCESS
        }
        Err(
            e
            @ (tools::ToolError::InvalidNotification(_) | tools::ToolError::NotificationsDisabled),
        ) => {
            eprintln!("product-sync: {e}; see `product-sync notify --help`");
            ExitCode::from(2)
        }
        Err(e) => exit(Err(anyhow::Error::new(e).context(
            "publishing the notification (is the broker up? deploy/local/kafka.sh up)",
        ))),
    }
}

pub async fn request(settings: Settings, args: RequestArgs) -> ExitCode {
    let wire = product_sync::command::CommandWire {
        request_id: args.id.unwrap_or_default(),
        system: args.system,
        selector: product_sync::command::Selector {
            all: args.all,
            keyword: args.keyword,
            product_codes: args.codes,
            category: args.category,
            updated_since: args.since,
        },
        mode: if args.snapshot {
            product_sync::command::Mode::Snapshot
        } else {
            product_sync::command::Mode::Incremental
        },
        dry_run: args.dry_run,
        force: args.force,
        requested_by: args.requested_by,
    };
    match tools::request(&settings, wire).await {
        Ok(id) => {
            println!("{id}");
            ExitCode::SUCCESS
        }
        Err(e @ tools::ToolError::Invalid(_)) => {
            eprintln!("product-sync: {e}; see `product-sync request --help`");
            ExitCode::from(2)
        }
        Err(e) => exit(Err(anyhow::Error::new(e).context(format!(
            "publishing to {} at {} (is the broker up? deploy/local/kafka.sh up)",
            settings.topics.requests, settings.kafka.bootstrap_servers
        )))),
    }
}

/// `tail`: follows a topic until Ctrl-C or `--count`.
pub async fn tail(settings: Settings, args: TailArgs) -> ExitCode {
    let t = &settings.topics;
    let name = match args.topic.as_str() {
        "results" => t.results.clone(),
        "dlq" => t.dlq.clone(),
        "requests" => t.requests.clone(),
        "state" if t.state.is_empty() => {
            eprintln!("product-sync: the state topic is disabled (topics.state is empty)");
            return ExitCode::from(2);
        }
        "state" => t.state.clone(),
        "notifications" if t.notifications.is_empty() => {
            eprintln!("product-sync: notifications are disabled (topics.notifications is empty)");
            return ExitCode::from(2);
        }
        "notifications" => t.notifications.clone(),
        _ => t.changes.clone(),
    };
    let stop = stop_on_signal();
    exit(
        tools::tail(&settings, &name, args.from_beginning, args.count, stop)
            .await
            .map(|_| ())
            .with_context(|| format!("following {name}")),
    )
}

/// `dlq list` and `dlq replay`.
pub async fn dlq(settings: Settings, command: DlqCommand) -> ExitCode {
    let (dlq, requests) = (&settings.topics.dlq, &settings.topics.requests);
    exit(
        async {
            match command {
                DlqCommand::List => {
                    let entries = product_sync::dlq::list(&settings)
                        .await
                        .context("reading the DLQ")?;
                    for e in &entries {
                        println!("{}", serde_json::to_string(e)?);
                    }
                    eprintln!("{} record(s) in {dlq}", entries.len());
                }
                DlqCommand::Replay { only } => {
                    let n = product_sync::dlq::replay(
                        &settings,
                        only.as_deref().and_then(FailureClass::parse),
                    )
                    .await
                    .context("replaying the DLQ")?;
                    println!("replayed {n} record(s) from {dlq} to {requests}");
                }
            }
            Ok(())
        }
        .await,
    )
}

/// `outbox parked` and `outbox unpark`.
pub async fn outbox(settings: Settings, command: OutboxCommand) -> ExitCode {
    use product_sync::outbox::queue;
    exit(
        async {
            let db = store::connect(&settings.database).await?;
            match command {
                OutboxCommand::Parked => {
                    let rows = queue::parked(&db).await.context("reading parked rows")?;
                    for r in &rows {
                        println!("{}", serde_json::to_string(r)?);
                    }
                    eprintln!("{} parked row(s)", rows.len());
                }
                OutboxCommand::Unpark { ids } => {
                    let n = queue::unpark(&db, &ids)
                        .await
                        .context("releasing parked rows")?;
                    println!("{n} row(s) back in the relay's queue");
                }
            }
            Ok(())
        }
        .await,
    )
}

/// `schedule`: the schedules, their next slots, the watermarks and the scheduler's holder.
pub async fn schedule(settings: Settings, json: bool) -> ExitCode {
    use product_sync::scheduler;
    exit(
        async {
            let db = store::connect(&settings.database).await?;
            let now = chrono::Utc::now();
            let view = scheduler::overview(&settings, &db, now)
                .await
                .context("reading the schedules' state")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", scheduler::render_overview(&view));
            }
            Ok(())
        }
        .await,
    )
}

/// `demo`: the pipeline on embedded parts.
#[cfg(feature = "dev-tools")]
pub async fn demo(keep: bool, products: usize, serve: Option<std::net::SocketAddr>) -> ExitCode {
    use product_sync::config::{LogFormat, LogSettings};
    // The demo speaks for itself; only real errors are logged (the mock broker's connection
    // chatter at teardown is not one).
    product_sync::telemetry::init(&LogSettings {
        level: "error,librdkafka=off,rdkafka=off".into(),
        format: LogFormat::Pretty,
    });
    exit(
        product_sync::demo::run(product_sync::demo::DemoOptions {
            keep,
            products,
            serve,
        })
        .await,
    )
}

/// `simulate`: the contract simulator on HTTP until Ctrl-C. The first line on stdout is
/// `listening on http://IP:PORT`.
#[cfg(feature = "dev-tools")]
pub async fn simulate(args: SimulateArgs) -> ExitCode {
    use product_sync::config::{LogFormat, LogSettings};
    product_sync::telemetry::init(&LogSettings {
        level: args.log_level.clone(),
        format: LogFormat::Pretty,
    });
    let stop = stop_on_signal();
    exit(simulator(args, stop).await)
}

#[cfg(feature = "dev-tools")]
async fn simulator(args: SimulateArgs, stop: CancellationToken) -> anyhow::Result<()> {
    use std::io::Write;
    use std::time::Duration;

    use product_sync::sim::{Catalogue, Faults, Sim, SimConfig};
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
    let faults = Faults {
        error_rate: args.error_rate,
        throttle_rate: args.throttle_rate,
        retry_after_s: args.retry_after_s,
        latency_ms: args.latency_ms,
        malformed_rate: args.malformed_rate,
        drop_rate: args.drop_rate,
        bad_record_rate: args.bad_record_rate,
        token_revoke_after_s: args.token_revoke_after_s,
        ..Faults::default()
    };
    let config = SimConfig {
        client_id: args.client_id.clone(),
        client_secret: args.client_secret.clone(),
        token_ttl: Duration::from_secs(args.token_ttl_s),
        app_ids: args.app_ids.clone(),
        lease_seconds: args.lease_s,
        faults,
        seed: args.seed,
    };
    let tls = tls_acceptor(&args)?;
    if args.systems.len() > 1 {
        return several(&args, config, catalogue, tls, stop).await;
    }
    let sim = Sim::new(config, catalogue);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {scheme}://{bound}")?;
        out.flush()?;
    }
    tracing::info!(%bound, products, "simulator serving the management-system and governance contract");
    match tls {
        Some(acceptor) => sim.serve_tls(listener, acceptor, stop).await?,
        None => sim.serve(listener, stop).await?,
    }
    Ok(())
}

/// The TLS identity of `--tls-cert`/`--tls-key`, when given.
#[cfg(feature = "dev-tools")]
fn tls_acceptor(args: &SimulateArgs) -> anyhow::Result<Option<tokio_native_tls::TlsAcceptor>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
    };
    let acceptor =
        product_sync::sim::tls::acceptor(&read(cert, "--tls-cert")?, &read(key, "--tls-key")?)
            .context("--tls-cert/--tls-key: not a PEM certificate chain and its PKCS#8 PEM key")?;
    Ok(Some(acceptor))
}

/// `simulate --systems a,b,…`: one simulator per system, each its own catalogue, faults and
/// secret, on consecutive ports.
#[cfg(feature = "dev-tools")]
async fn several(
    args: &SimulateArgs,
    config: product_sync::sim::SimConfig,
    first: product_sync::sim::Catalogue,
    tls: Option<tokio_native_tls::TlsAcceptor>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    use std::io::Write;

    use product_sync::sim::{Catalogue, Sim, SimConfig};
    let mut serving = tokio::task::JoinSet::new();
    let mut first = Some(first);
    for (i, name) in args.systems.iter().enumerate() {
        let catalogue = first
            .take()
            .unwrap_or_else(|| Catalogue::generate(args.products, args.seed + i as u64));
        let config = SimConfig {
            client_secret: match i {
                0 => config.client_secret.clone(),
                _ => format!("{}-{name}", config.client_secret),
            },
            seed: config.seed + i as u64,
            ..config.clone()
        };
        let port = match args.listen.port() {
            0 => 0,
            p => p.saturating_add(i as u16),
        };
        let addr = std::net::SocketAddr::new(args.listen.ip(), port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} for system {name}"))?;
        let bound = listener.local_addr()?;
        {
            let mut out = std::io::stdout().lock();
            let scheme = if tls.is_some() { "https" } else { "http" };
            writeln!(out, "{name} listening on {scheme}://{bound}")?;
            out.flush()?;
        }
        tracing::info!(%bound, system = %name, products = catalogue.len(), "simulator serving one management system");
        let sim = Sim::new(config, catalogue);
        match &tls {
            Some(acceptor) => {
                serving.spawn(sim.serve_tls(listener, acceptor.clone(), stop.clone()))
            }
            None => serving.spawn(sim.serve(listener, stop.clone())),
        };
    }
    while let Some(done) = serving.join_next().await {
        done??;
    }
    Ok(())
}

/// Logs a failure and maps it to exit code 1.
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

/// A token cancelled on SIGINT or SIGTERM.
fn stop_on_signal() -> CancellationToken {
    let stop = CancellationToken::new();
    let signal = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested");
        signal.cancel();
    });
    stop
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
