//! The `product-sync` binary: parses the command line, loads configuration, sets up logging
//! and hands over to the library. Exit codes: 0 success, 1 runtime failure, 2 usage or
//! configuration error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use product_sync::config::{self, Settings, Sources};
use product_sync::{store, telemetry};

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
    /// Print the effective configuration (secrets redacted) and exit; 2 when it is invalid.
    Config,
    /// Apply pending database migrations to `database.url` and exit.
    Migrate,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let sources = Sources {
        file: cli.config.clone(),
        ..Sources::default()
    };
    let settings = match config::load(&sources) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("product-sync: configuration error: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(&settings.log);
    match run(cli.command, settings).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "product-sync failed");
            eprintln!("product-sync: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(command: Command, settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Config => {
            println!("{settings}");
            Ok(())
        }
        Command::Migrate => {
            let db = store::connect(&settings.database).await?;
            store::migrate(&db).await?;
            println!("migrations applied to {}", settings.database.redacted_url());
            Ok(())
        }
    }
}
