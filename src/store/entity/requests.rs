//! `requests`: one row per product-request command — its status, counts and error.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "requests")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub request_id: String,
    pub system: String,
    /// `running`, `completed`, `failed` or `rejected`.
    pub status: String,
    pub command: Json,
    pub fetched: i64,
    pub created: i64,
    pub updated: i64,
    pub unchanged: i64,
    pub stale: i64,
    pub pages: i32,
    pub error: Option<String>,
    pub traceparent: Option<String>,
    pub started_at: DateTimeUtc,
    pub finished_at: Option<DateTimeUtc>,
    /// Set by the relay after the result event was acknowledged.
    pub result_published_at: Option<DateTimeUtc>,
    /// Products a snapshot delisted.
    pub delisted: i64,
    /// Delisted products that came back.
    pub relisted: i64,
    /// A failed command's stable error kind (`upstream`, `delist_guard`, …).
    pub error_kind: Option<String>,
    /// A dry run's drift (`wire::Drift`).
    pub drift: Option<Json>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
