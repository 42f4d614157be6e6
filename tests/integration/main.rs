//! The integration tests: one binary, run against the real services that
//! `deploy/local/kafka.sh up` and `deploy/local/postgres.sh up` start (or `deploy/local/test.sh`,
//! which starts both). A missing service fails the test with the command that starts it.

mod cli;
mod console;
mod deploy;
mod dlq;
mod docs;
mod exactly_once;
mod fold;
#[path = "../fuzz/checks.rs"]
mod fuzz_checks;
mod fuzz_corpus;
mod helpers;
mod hostile;
mod kafka_smoke;
mod layout;
mod notifications;
mod observability;
mod pipeline;
mod relay;
mod schedule;
mod snapshot;
mod store_smoke;
mod systems;
mod tls;
mod upstream;
