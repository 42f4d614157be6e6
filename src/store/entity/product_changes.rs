//! `product_changes`: the outbox and change history, one row per emitted event, written in
//! the same transaction as the product row it describes.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "product_changes")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub product_id: i64,
    pub system: String,
    pub identity: String,
    pub product_code: Option<String>,
    /// Unique with `product_id`: one row per revision.
    pub revision: i64,
    /// CloudEvents id `system:code:revision`, the same on every re-publication.
    pub event_id: String,
    /// `created` or `updated`.
    pub op: String,
    pub request_id: Option<String>,
    pub traceparent: Option<String>,
    /// The complete change event (DESIGN.md "Topics and messages").
    pub payload: Json,
    pub created_at: DateTimeUtc,
    /// Set by the relay of versions before the relay's queue (`outbox_pending`); history rows
    /// are no longer rewritten, so this stays empty for newer rows.
    pub published_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
