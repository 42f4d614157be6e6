//! product-sync keeps a platform's copy of wealth-management product data in step with the
//! management system that owns it, driven by product-request commands on Kafka.
//!
//! ```text
//!  product-requests ──Kafka──▶ validate ─▶ authorize ─▶ fetch pages ─▶ fold into store ─▶ outbox ──▶ product-changes
//!  (commands)                     │        (OAuth2       (management    (sea-orm:            │        product-request-results
//!                                 │         client creds) system HTTP)   Postgres/SQLite)    │
//!                                 └─ bad ──▶ product-requests.dlq (with reason)              └── relay (idempotent producer)
//!                    at start: register with the service-governance platform; deregister at stop
//! ```
//!
//! # Layout
//! The modules follow the flow; the binary (`src/main.rs`) only parses the command line and
//! calls into this library.
//!
//! | module | what it holds |
//! | --- | --- |
//! | [`config`] | the public configuration keys, layered files + `PRODUCT_SYNC__…` env, validation |
//! | [`telemetry`] | the `tracing` subscriber (pretty or JSON) |
//! | [`retry`] | the one place transient failures are retried (`backoff`) |
//! | [`kafka`] | client configuration, broker readiness, topic creation |
//! | [`command`] | product-request commands and their selector |
//! | [`upstream`] | governance registration, OAuth2 authorization, the paginated product fetch |
//! | [`product`] | the product record: contract parsing, identity, canonical JSON |
//! | [`diff`] | the pure field-level diff of two products' content |
//! | [`store`] | database connection, migrations, entities and the fold (`store::fold`) |
//! | [`pipeline`] | the consumer loop (at-least-once offsets, per-partition workers) and command processing |
//! | [`outbox`] | the relay: its sharded queue, shard leases, batched and pipelined publishing, reduced and parked events |
//! | [`dlq`] | listing and replaying the dead-letter topic |
//! | [`wire`] | every shape sent to Kafka: events, keys, CloudEvents and DLQ headers, the reduced form |
//! | [`metrics`], [`ops`] | Prometheus metrics; the `/healthz`, `/readyz`, `/metrics` endpoint |
//! | [`tools`] | `request`, `tail`, `schema` |
//! | [`demo`] | `demo`: the same pipeline on a mock broker, SQLite and the in-process simulator |
//! | [`app`] | `run`: builds the parts, runs them, shuts them down in order |
//! | [`sim`] | the contract simulator (management system + governance platform, fault injection) |
//!
//! Every boundary has its own `thiserror` error type that answers `is_transient()`.

pub mod app;
pub mod command;
pub mod config;
#[cfg(feature = "dev-tools")]
pub mod demo;
pub mod diff;
pub mod dlq;
pub mod kafka;
pub mod metrics;
pub mod ops;
pub mod outbox;
pub mod pipeline;
pub mod product;
pub mod retry;
#[cfg(feature = "dev-tools")]
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod text;
pub mod tools;
pub mod upstream;
pub mod wire;
