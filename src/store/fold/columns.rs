//! The product columns the fold writes, in one table: each column's name, how PostgreSQL
//! receives it, and how it is read off a planned write. Both writers, the statements they
//! send and the conditional upsert's `SET` list are driven by it; a test checks it against
//! the sea-orm entity, so a column added to one and not the other fails the build's tests.

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use sea_orm::sqlx::postgres::PgArguments;
use sea_orm::sqlx::{self, Postgres};

use super::plan::Write;
use super::to_json_text;
use crate::store::StoreError;

/// A column of `products` written by the fold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Column {
    System,
    Identity,
    ProductCode,
    ProductName,
    Category,
    RiskLevel,
    Currency,
    Issuer,
    Status,
    Nav,
    ExpectedYield,
    MinInvestment,
    TermDays,
    SaleStart,
    SaleEnd,
    Keywords,
    Attributes,
    SourceVersion,
    SourceUpdatedAt,
    ContentHash,
    Revision,
    CreatedAt,
    UpdatedAt,
    DelistedAt,
}

/// How a column's values travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// The same for every row of a statement: the system (`$1`).
    System,
    /// The same for every row of a statement: the fold's time (`$2`).
    Now,
    /// The same for every row of a statement: NULL, a folded product is listed (a delisted
    /// one that came back is relisted by the write).
    Listed,
    Text,
    /// JSON, sent as text (PostgreSQL casts it).
    Json,
    Numeric,
    Int4,
    Int8,
    Date,
    Timestamp,
}

/// One row's value of one column.
pub(super) enum Value<'a> {
    Text(Option<&'a str>),
    Json(String),
    Numeric(Option<Decimal>),
    Int4(Option<i32>),
    Int8(i64),
    Date(Option<NaiveDate>),
    Timestamp(Option<DateTime<Utc>>),
}

impl Column {
    /// Every column, in the order of the statements.
    pub(super) const ALL: [Column; 24] = [
        Column::System,
        Column::Identity,
        Column::ProductCode,
        Column::ProductName,
        Column::Category,
        Column::RiskLevel,
        Column::Currency,
        Column::Issuer,
        Column::Status,
        Column::Nav,
        Column::ExpectedYield,
        Column::MinInvestment,
        Column::TermDays,
        Column::SaleStart,
        Column::SaleEnd,
        Column::Keywords,
        Column::Attributes,
        Column::SourceVersion,
        Column::SourceUpdatedAt,
        Column::ContentHash,
        Column::Revision,
        Column::CreatedAt,
        Column::UpdatedAt,
        Column::DelistedAt,
    ];

    pub(super) fn name(self) -> &'static str {
        match self {
            Column::System => "system",
            Column::Identity => "identity",
            Column::ProductCode => "product_code",
            Column::ProductName => "product_name",
            Column::Category => "category",
            Column::RiskLevel => "risk_level",
            Column::Currency => "currency",
            Column::Issuer => "issuer",
            Column::Status => "status",
            Column::Nav => "nav",
            Column::ExpectedYield => "expected_yield",
            Column::MinInvestment => "min_investment",
            Column::TermDays => "term_days",
            Column::SaleStart => "sale_start",
            Column::SaleEnd => "sale_end",
            Column::Keywords => "keywords",
            Column::Attributes => "attributes",
            Column::SourceVersion => "source_version",
            Column::SourceUpdatedAt => "source_updated_at",
            Column::ContentHash => "content_hash",
            Column::Revision => "revision",
            Column::CreatedAt => "created_at",
            Column::UpdatedAt => "updated_at",
            Column::DelistedAt => "delisted_at",
        }
    }

    pub(super) fn kind(self) -> Kind {
        match self {
            Column::System => Kind::System,
            Column::CreatedAt | Column::UpdatedAt => Kind::Now,
            Column::DelistedAt => Kind::Listed,
            Column::Keywords | Column::Attributes => Kind::Json,
            Column::Nav | Column::ExpectedYield | Column::MinInvestment => Kind::Numeric,
            Column::TermDays => Kind::Int4,
            Column::SourceVersion | Column::Revision => Kind::Int8,
            Column::SaleStart | Column::SaleEnd => Kind::Date,
            Column::SourceUpdatedAt => Kind::Timestamp,
            _ => Kind::Text,
        }
    }

    /// An update rewrites every column but the key and the creation time.
    pub(super) fn updated(self) -> bool {
        !matches!(self, Column::System | Column::Identity | Column::CreatedAt)
    }

    /// This column's value in `w` (`None` for the statement-wide ones).
    pub(super) fn value<'a>(self, w: &'a Write<'a>) -> Result<Option<Value<'a>>, StoreError> {
        let p = w.record.product;
        let c = &p.content;
        Ok(Some(match self {
            Column::System | Column::CreatedAt | Column::UpdatedAt | Column::DelistedAt => {
                return Ok(None);
            }
            Column::Identity => Value::Text(Some(&w.record.key)),
            Column::ProductCode => Value::Text(c.product_code.as_deref()),
            Column::ProductName => Value::Text(Some(&c.product_name)),
            Column::Category => Value::Text(c.category.as_deref()),
            Column::RiskLevel => Value::Text(c.risk_level.map(|r| r.as_str())),
            Column::Currency => Value::Text(c.currency.as_deref()),
            Column::Issuer => Value::Text(c.issuer.as_deref()),
            Column::Status => Value::Text(c.status.map(|s| s.as_str())),
            Column::Nav => Value::Numeric(c.nav),
            Column::ExpectedYield => Value::Numeric(c.expected_yield),
            Column::MinInvestment => Value::Numeric(c.min_investment),
            Column::TermDays => Value::Int4(c.term_days),
            Column::SaleStart => Value::Date(c.sale_start),
            Column::SaleEnd => Value::Date(c.sale_end),
            Column::Keywords => Value::Json(to_json_text(&c.keywords)?),
            Column::Attributes => Value::Json(to_json_text(&c.attributes)?),
            Column::SourceVersion => Value::Int8(p.version),
            Column::SourceUpdatedAt => Value::Timestamp(p.updated_at),
            Column::ContentHash => Value::Text(Some(w.record.hash())),
            Column::Revision => Value::Int8(w.revision),
        }))
    }
}

impl From<Value<'_>> for sea_orm::Value {
    fn from(v: Value<'_>) -> Self {
        match v {
            Value::Text(t) => t.map(str::to_owned).into(),
            Value::Json(j) => j.into(),
            Value::Numeric(n) => n.into(),
            Value::Int4(n) => n.into(),
            Value::Int8(n) => n.into(),
            Value::Date(d) => d.into(),
            Value::Timestamp(t) => t.into(),
        }
    }
}

/// One column of a chunk of rows, as the PostgreSQL array `unnest` takes.
pub(super) enum Array<'a> {
    Text(Vec<Option<&'a str>>),
    Json(Vec<String>),
    Numeric(Vec<Option<Decimal>>),
    Int4(Vec<Option<i32>>),
    Int8(Vec<i64>),
    Date(Vec<Option<NaiveDate>>),
    Timestamp(Vec<Option<DateTime<Utc>>>),
}

type PgQuery<'q> = sqlx::query::Query<'q, Postgres, PgArguments>;

impl<'a> Array<'a> {
    /// Column `column` of `writes`; `None` for the statement-wide columns.
    pub(super) fn of(column: Column, writes: &'a [Write<'a>]) -> Result<Option<Self>, StoreError> {
        let mut array = match column.kind() {
            Kind::System | Kind::Now | Kind::Listed => return Ok(None),
            Kind::Text => Array::Text(Vec::with_capacity(writes.len())),
            Kind::Json => Array::Json(Vec::with_capacity(writes.len())),
            Kind::Numeric => Array::Numeric(Vec::with_capacity(writes.len())),
            Kind::Int4 => Array::Int4(Vec::with_capacity(writes.len())),
            Kind::Int8 => Array::Int8(Vec::with_capacity(writes.len())),
            Kind::Date => Array::Date(Vec::with_capacity(writes.len())),
            Kind::Timestamp => Array::Timestamp(Vec::with_capacity(writes.len())),
        };
        for w in writes {
            let Some(value) = column.value(w)? else {
                continue;
            };
            match (&mut array, value) {
                (Array::Text(a), Value::Text(v)) => a.push(v),
                (Array::Json(a), Value::Json(v)) => a.push(v),
                (Array::Numeric(a), Value::Numeric(v)) => a.push(v),
                (Array::Int4(a), Value::Int4(v)) => a.push(v),
                (Array::Int8(a), Value::Int8(v)) => a.push(v),
                (Array::Date(a), Value::Date(v)) => a.push(v),
                (Array::Timestamp(a), Value::Timestamp(v)) => a.push(v),
                _ => {
                    return Err(StoreError::Db(sea_orm::DbErr::Custom(format!(
                        "column {} has a value of another kind",
                        column.name()
                    ))));
                }
            }
        }
        Ok(Some(array))
    }

    pub(super) fn bind(self, query: PgQuery<'a>) -> PgQuery<'a> {
        match self {
            Array::Text(a) => query.bind(a),
            Array::Json(a) => query.bind(a),
            Array::Numeric(a) => query.bind(a),
            Array::Int4(a) => query.bind(a),
            Array::Int8(a) => query.bind(a),
            Array::Date(a) => query.bind(a),
            Array::Timestamp(a) => query.bind(a),
        }
    }
}

/// The PostgreSQL element type of a per-row column's `unnest` argument.
pub(super) fn pg_type(kind: Kind) -> &'static str {
    match kind {
        Kind::Text | Kind::Json | Kind::System | Kind::Now => "text",
        Kind::Listed => "timestamptz",
        Kind::Numeric => "numeric",
        Kind::Int4 => "int4",
        Kind::Int8 => "int8",
        Kind::Date => "date",
        Kind::Timestamp => "timestamptz",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::entity::products;
    use sea_orm::{IdenStatic, Iterable};

    #[test]
    fn the_table_names_every_column_of_the_entity_but_the_id_in_order() {
        let entity: Vec<&str> = products::Column::iter()
            .map(|c| c.as_str())
            .filter(|c| *c != "id")
            .collect();
        let table: Vec<&str> = Column::ALL.iter().map(|c| c.name()).collect();
        assert_eq!(table, entity);
    }
}
