//! The `product-sync` binary: parses the command line, loads configuration, sets up logging
//! and dispatches to [`handlers`]. Exit codes: 0 success, 1 runtime failure, 2 usage or
//! configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use product_sync::config::{self, Settings, Sources};
use product_sync::telemetry;

mod handlers;

/// mimalloc: the relay and the fold allocate and free many small strings across threads,
/// where glibc's allocator spent a fifth of the relay's time (perf, `case=relay`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    #[cfg(feature = "dev-tools")]
    Demo {
        /// Keep the SQLite store afterwards and print where it is.
        #[arg(long)]
        keep: bool,
        /// Size of the simulated catalogue.
        #[arg(long, default_value_t = 400)]
        products: usize,
        /// Leave the ops console up at the end (until Ctrl-C) to click through what happened.
        #[arg(long)]
        serve: bool,
        /// The console's address with --serve.
        #[arg(long, default_value = "127.0.0.1:9464")]
        listen: std::net::SocketAddr,
    },
    /// Print the effective configuration (secrets redacted) and exit; 2 when it is invalid.
    Config,
    /// Apply pending database migrations to `database.url` and exit.
    Migrate,
    /// Run the service: consume product-request commands, fetch, fold, publish changes.
    Run,
    /// Publish a product-request command from flags; prints its request id.
    Request(handlers::RequestArgs),
    /// Publish a change notification ("these products changed") on `topics.notifications`.
    Notify(handlers::NotifyArgs),
    /// Follow a topic and pretty-print its events (Ctrl-C stops).
    Tail(handlers::TailArgs),
    /// Print the JSON Schemas of the command, the change event and the result event.
    Schema,
    /// Inspect or replay the dead-letter topic.
    #[command(subcommand)]
    Dlq(handlers::DlqCommand),
    /// Print each system's schedules, next slots, watermark, last drift check and the
    /// scheduler's holder (`--json` for the same as JSON).
    Schedule {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Inspect the outbox: rows the broker refused for good (parked), and release them.
    #[command(subcommand)]
    Outbox(handlers::OutboxCommand),
    /// Run the contract simulator: a management system and governance platform on HTTP.
    #[cfg(feature = "dev-tools")]
    Simulate(Box<handlers::SimulateArgs>),
}

#[tokio::main]
async fn main() -> ExitCode {
    product_sync::allocator::return_freed_memory_at_once();
    let cli = Cli::parse();
    let file = cli.config;
    match cli.command {
        #[cfg(feature = "dev-tools")]
        Command::Simulate(args) => handlers::simulate(*args).await,
        #[cfg(feature = "dev-tools")]
        Command::Demo {
            keep,
            products,
            serve,
            listen,
        } => handlers::demo(keep, products, serve.then_some(listen)).await,
        Command::Schema => handlers::schema(),
        Command::Config => with_settings(file, handlers::print_config).await,
        Command::Migrate => with_settings(file, handlers::migrate).await,
        Command::Run => with_settings(file, handlers::run).await,
        Command::Request(args) => with_settings(file, |s| handlers::request(s, args)).await,
        Command::Notify(args) => with_settings(file, |s| handlers::notify(s, args)).await,
        Command::Tail(args) => with_settings(file, |s| handlers::tail(s, args)).await,
        Command::Dlq(command) => with_settings(file, |s| handlers::dlq(s, command)).await,
        Command::Outbox(command) => with_settings(file, |s| handlers::outbox(s, command)).await,
        Command::Schedule { json } => with_settings(file, |s| handlers::schedule(s, json)).await,
    }
}

/// Loads the configuration (a configuration error exits with 2), starts logging, runs `then`.
async fn with_settings<F, Fut>(file: Option<PathBuf>, then: F) -> ExitCode
where
    F: FnOnce(Settings) -> Fut,
    Fut: std::future::Future<Output = ExitCode>,
{
    let sources = Sources {
        file,
        ..Sources::default()
    };
    match config::load(&sources) {
        Ok(settings) => {
            telemetry::init(&settings.log);
            then(settings).await
        }
        Err(e) => {
            eprintln!("product-sync: configuration error: {e}");
            ExitCode::from(2)
        }
    }
}
