//! product-sync keeps a platform's copy of wealth-management product data in step with the
//! management system that owns it, driven by product-request commands on Kafka.
//!
//! ```text
//!  product-notifications ──▶ coalesce per system and partition (window, page size)
//!    ("these changed")              │ one command per batch
//!                                   ▼
//!  product-requests ──Kafka──▶ validate ─▶ authorize ─▶ fetch pages ─▶ fold into store ─▶ outbox ──▶ product-changes
//!  (commands)                     │        (OAuth2       (management    (sea-orm:            │        product-state (compacted)
//!                                 │         client creds) system HTTP)   Postgres/SQLite;    │        product-request-results
//!                                 │                                      snapshot: delist)   │
//!                                 └─ bad ──▶ product-requests.dlq (with reason)              └── relay (idempotent producer)
//!                    at start: register with the service-governance platform; deregister at stop
//! ```
//!
//! # Layout
//! The modules sit in layers; a module uses only modules of lower layers (no circle, no arrow
//! back up the flow: `tests/integration/layout.rs` checks it). The binary (`src/main.rs`)
//! only parses the command line and dispatches to `src/handlers.rs`.
//!
//! | layer | module | what it holds |
//! | --- | --- | --- |
//! | 0 | [`metrics`] | Prometheus metrics (a leaf: it knows no other module) |
//! | 0 | [`text`] | quoting outside values into errors and logs |
//! | 0 | [`config`] | the public configuration keys, layered files + `PRODUCT_SYNC__…` env, validation |
//! | 1 | [`telemetry`] | the `tracing` subscriber (pretty or JSON) |
//! | 1 | [`retry`] | the one retry vocabulary: budgeted calls and cancellable backoff loops |
//! | 1 | [`product`] | the product record: contract parsing, identity, canonical JSON |
//! | 2 | [`diff`] | the pure field-level diff of two products' content |
//! | 2 | [`command`] | product-request commands and their selector |
//! | 3 | [`wire`] | every shape sent to Kafka: events, keys, CloudEvents and DLQ headers, failure class and kind |
//! | 3 | [`kafka`] | client configuration, broker readiness, topic creation |
//! | 4 | [`upstream`] | governance registration, OAuth2 authorization, the bounded paginated fetch |
//! | 4 | [`store`] | connection, migrations, entities, the fold (a pure plan, two writers, one column table), delisting, the dry run's comparison |
//! | 5 | [`outbox`] | the relay: its sharded queue, shard leases, batched and pipelined publishing of change, state and result records |
//! | 5 | [`pipeline`] | the consumer (driver thread, one task per partition queue, coordinator), command processing, and change notifications coalesced into commands |
//! | 5 | [`scheduler`] | one instance at a time (a lease in the store) publishes each system's due slots as commands |
//! | 6 | [`ops`], [`dlq`], [`tools`] | `/healthz` `/readyz` `/metrics`; the dead-letter topic; `request`, `tail`, `schema` |
//! | 7 | [`console`] | the ops console: the page at `/`, the `/api/v1/` reads and the token-guarded actions |
//! | 8 | [`app`] | `run`: builds every part, runs them, stops them in order, joins every task |
//! | dev | `sim`, `demo`, `audit` | the contract simulator; `demo`; the change topic's order check (feature `dev-tools`, on by default) |
//!
//! Every boundary has its own `thiserror` error type that answers `is_transient()`.

pub mod allocator;
pub mod app;
#[cfg(feature = "dev-tools")]
pub mod audit;
pub mod command;
pub mod config;
pub mod console;
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
pub mod scheduler;
#[cfg(feature = "dev-tools")]
pub mod sim;
pub mod store;
pub mod telemetry;
pub mod text;
pub mod tools;
pub mod upstream;
pub mod wire;
