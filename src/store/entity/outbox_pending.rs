//! `outbox_pending`: the relay's work queue — one small row per change or result event still
//! to publish, deleted once the broker acknowledged it (see the migration for the reasons).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "outbox_pending")]
pub struct Model {
    /// Queue order: a product's rows are queued in revision order.
    #[sea_orm(primary_key)]
    pub id: i64,
    /// The shard is `shard_key % pipeline.relay_shards`.
    pub shard_key: i64,
    /// The `product_changes` row to publish (a change event)…
    pub change_id: Option<i64>,
    pub product_id: Option<i64>,
    /// …or the request whose result to publish.
    pub request_id: Option<String>,
    pub created_at: DateTimeUtc,
    /// Set when the broker refused this row for good; its product's later rows wait.
    pub parked_at: Option<DateTimeUtc>,
    /// The broker's refusal, for the operator.
    pub park_error: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
