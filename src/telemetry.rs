//! Telemetry: the `tracing` subscriber — human-readable lines locally, JSON in production,
//! filter from `log.level` unless `RUST_LOG` is set.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber writing to stderr. Call once, at the binary's edge.
pub fn init(settings: &LogSettings) {
    init_with_writer(settings, std::io::stderr);
}

/// Installs the global subscriber with a chosen writer (tests capture output this way).
/// A second call is a no-op: the first subscriber stays.
pub fn init_with_writer<W>(settings: &LogSettings, writer: W)
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Pretty => builder.with_target(false).try_init(),
    };
}
