//! sea-orm entities of the tables (see `migration` for the schema and its reasons).
//!
//! Decimal columns are `Option<Decimal>` here for writing. Reading them back on SQLite goes
//! through `f64` in sea-orm, so the fold reads decimals as text instead (see `fold`).

pub mod outbox_pending;
pub mod product_changes;
pub mod products;
pub mod requests;
