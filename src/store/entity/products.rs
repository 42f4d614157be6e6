//! `products`: one row per product and system, the platform's current copy.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "products")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub system: String,
    /// `code:<code>` or `name:<name>`; unique per system.
    pub identity: String,
    pub product_code: Option<String>,
    pub product_name: String,
    pub category: Option<String>,
    pub risk_level: Option<String>,
    pub currency: Option<String>,
    pub issuer: Option<String>,
    pub status: Option<String>,
    pub nav: Option<Decimal>,
    pub expected_yield: Option<Decimal>,
    pub min_investment: Option<Decimal>,
    pub term_days: Option<i32>,
    pub sale_start: Option<Date>,
    pub sale_end: Option<Date>,
    pub keywords: Json,
    pub attributes: Json,
    /// The source's `version` of the stored content.
    pub source_version: i64,
    pub source_updated_at: Option<DateTimeUtc>,
    /// SHA-256 of the canonical content: equal hash ⇒ nothing to write.
    pub content_hash: String,
    /// Grows by one with each change event of this product.
    pub revision: i64,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    /// Set when a snapshot found the product gone from the management system; cleared when
    /// it comes back (relisted).
    pub delisted_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
