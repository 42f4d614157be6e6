//! Which relay shards this instance publishes. On PostgreSQL every live instance heartbeats
//! into `relay_members`; the live members, sorted by id, split the shards round-robin
//! (member `i` of `n` wants the shards `s` with `s % n == i`); each wanted shard is taken
//! with a session advisory lock on a connection of the relay's own, so a shard has one
//! publisher at a time whatever the members believe. A member that stops heartbeating is
//! dropped from the split after [`MEMBER_TTL`]; a process that dies drops its connection and
//! so its locks at once. On SQLite one process holds every shard.

use std::collections::BTreeSet;
use std::time::Duration;

use std::str::FromStr;

use sea_orm::sqlx::postgres::PgConnectOptions;
use sea_orm::sqlx::{self, Connection, PgConnection};
use secrecy::{ExposeSecret, SecretString};

use super::queue::Shards;

/// Advisory-lock class of relay shards (`pg_try_advisory_lock(class, shard)`): in
/// `pg_locks`, `classid` is this class and `objid` the shard.
pub const LOCK_CLASS: i32 = 726_264_617;

/// `application_name` of a lease connection: this prefix and the instance id.
pub const APPLICATION_NAME_PREFIX: &str = "product-sync relay ";

/// Which instance holds which shard, as PostgreSQL sees it (the ops view and the tests).
pub const HOLDERS_SQL: &str = "SELECT a.application_name AS holder, l.objid::int4 AS shard \
     FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
     WHERE l.locktype = 'advisory' AND l.classid = 726264617 AND l.granted \
     AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
     ORDER BY shard";

/// A member that has not heartbeated for this long no longer counts in the split.
pub const MEMBER_TTL: Duration = Duration::from_secs(5);

/// Errors taking or keeping shards: transient (the lease connection is rebuilt).
#[derive(Debug, thiserror::Error)]
#[error("relay shard leases: {0}")]
pub struct LeaseError(String);

impl LeaseError {
    /// Always transient: the next refresh reconnects.
    pub fn is_transient(&self) -> bool {
        true
    }
}

/// The shards this instance may publish.
pub struct Leases {
    mode: Mode,
    shards: u32,
    held: BTreeSet<u32>,
    /// Refreshes so far: the stale-member cleanup runs once a minute, not every second.
    refreshes: u64,
}

enum Mode {
    /// One process, every shard.
    Embedded,
    Postgres {
        url: SecretString,
        instance_id: String,
        conn: Option<PgConnection>,
    },
}

impl Leases {
    /// Every shard, always (SQLite).
    pub fn embedded(shards: u32) -> Self {
        Leases {
            mode: Mode::Embedded,
            shards,
            held: (0..shards).collect(),
            refreshes: 0,
        }
    }

    /// Shared with the other live instances through the PostgreSQL at `url`.
    pub fn postgres(url: SecretString, instance_id: String, shards: u32) -> Self {
        Leases {
            mode: Mode::Postgres {
                url,
                instance_id,
                conn: None,
            },
            shards,
            held: BTreeSet::new(),
            refreshes: 0,
        }
    }

    /// The shards held now, as a read filter.
    pub fn filter(&self) -> Shards {
        match self.mode {
            Mode::Embedded => Shards::All,
            Mode::Postgres { .. } => Shards::Some {
                held: self.held.clone(),
                of: self.shards,
            },
        }
    }

    /// Shards held now.
    pub fn held(&self) -> &BTreeSet<u32> {
        &self.held
    }

    /// Heartbeats, then takes the shards this instance should hold and releases the others.
    /// Call with nothing in flight: a released shard may be published by another instance
    /// right after. On error every lock is dropped with the connection (nothing held).
    pub async fn refresh(&mut self) -> Result<(), LeaseError> {
        let result = self.try_refresh().await;
        if result.is_err() {
            self.drop_all();
        }
        crate::metrics::metrics()
            .relay_shards_held
            .set(self.held.len() as i64);
        result
    }

    async fn try_refresh(&mut self) -> Result<(), LeaseError> {
        let Mode::Postgres {
            url,
            instance_id,
            conn,
        } = &mut self.mode
        else {
            return Ok(());
        };
        if conn.is_none() {
            self.held.clear();
            *conn = Some(connect(url, instance_id).await?);
        }
        let Some(c) = conn.as_mut() else {
            return Ok(());
        };
        self.refreshes += 1;
        let sweep = self.refreshes % 60 == 1;
        let members = live_members(c, instance_id, sweep).await?;
        let wanted = wanted(&members, instance_id, self.shards);
        let release: Vec<i32> = self.held.difference(&wanted).map(|s| *s as i32).collect();
        if !release.is_empty() {
            sqlx::query("SELECT pg_advisory_unlock($1, s) FROM unnest($2::int4[]) AS s")
                .bind(LOCK_CLASS)
                .bind(&release)
                .execute(&mut *c)
                .await
                .map_err(lease_err)?;
            for s in &release {
                self.held.remove(&(*s as u32));
            }
            tracing::info!(shards = ?release, "relay released shards");
        }
        let take: Vec<i32> = wanted.difference(&self.held).map(|s| *s as i32).collect();
        if !take.is_empty() {
            let won: Vec<(i32, bool)> = sqlx::query_as(
                "SELECT s, pg_try_advisory_lock($1, s) FROM unnest($2::int4[]) AS s",
            )
            .bind(LOCK_CLASS)
            .bind(&take)
            .fetch_all(&mut *c)
            .await
            .map_err(lease_err)?;
            let taken: Vec<i32> = won.iter().filter(|(_, w)| *w).map(|(s, _)| *s).collect();
            self.held.extend(taken.iter().map(|s| *s as u32));
            if !taken.is_empty() {
                tracing::info!(shards = ?taken, members = members.len(), "relay took shards");
            }
        }
        Ok(())
    }

    /// Leaves the split and releases every shard (clean shutdown).
    pub async fn leave(&mut self) {
        if let Mode::Postgres {
            instance_id,
            conn: Some(c),
            ..
        } = &mut self.mode
        {
            let left = sqlx::query("DELETE FROM relay_members WHERE instance_id = $1")
                .bind(instance_id.as_str())
                .execute(&mut *c)
                .await;
            if let Err(e) = left {
                tracing::warn!(error = %e, "relay could not leave the member list; it expires");
            }
        }
        self.drop_all();
        crate::metrics::metrics().relay_shards_held.set(0);
    }

    /// Drops the lease connection: the server releases its locks.
    fn drop_all(&mut self) {
        if let Mode::Postgres { conn, .. } = &mut self.mode {
            *conn = None;
            self.held.clear();
        }
    }
}

/// The shards member `me` should hold when `members` (sorted) split `shards` round-robin.
pub fn wanted(members: &[String], me: &str, shards: u32) -> BTreeSet<u32> {
    let Some(index) = members.iter().position(|m| m == me) else {
        return BTreeSet::new();
    };
    let n = members.len() as u32;
    (0..shards).filter(|s| s % n == index as u32).collect()
}

fn lease_err(e: sqlx::Error) -> LeaseError {
    LeaseError(e.to_string())
}

/// The relay's own connection, named so `pg_stat_activity` and `pg_locks` show which
/// instance holds which shard.
async fn connect(url: &SecretString, instance_id: &str) -> Result<PgConnection, LeaseError> {
    let options = PgConnectOptions::from_str(url.expose_secret())
        .map_err(lease_err)?
        .application_name(&format!("{APPLICATION_NAME_PREFIX}{instance_id}"));
    PgConnection::connect_with(&options)
        .await
        .map_err(lease_err)
}

/// Heartbeats this member and returns the live ones in id order (the database's clock for
/// every member, so skewed hosts agree on who is live). With `sweep`, the first live member
/// forgets members that died without leaving (kill -9) over an hour ago.
async fn live_members(
    c: &mut PgConnection,
    instance_id: &str,
    sweep: bool,
) -> Result<Vec<String>, LeaseError> {
    sqlx::query(
        "INSERT INTO relay_members (instance_id, heartbeat_at) VALUES ($1, now()) \
         ON CONFLICT (instance_id) DO UPDATE SET heartbeat_at = now()",
    )
    .bind(instance_id)
    .execute(&mut *c)
    .await
    .map_err(lease_err)?;
    let members: Vec<(String,)> = sqlx::query_as(
        "SELECT instance_id FROM relay_members \
         WHERE heartbeat_at > now() - make_interval(secs => $1) ORDER BY instance_id",
    )
    .bind(MEMBER_TTL.as_secs_f64())
    .fetch_all(&mut *c)
    .await
    .map_err(lease_err)?;
    let members: Vec<String> = members.into_iter().map(|(m,)| m).collect();
    if sweep && members.first().is_some_and(|first| first == instance_id) {
        sqlx::query("DELETE FROM relay_members WHERE heartbeat_at < now() - interval '1 hour'")
            .execute(&mut *c)
            .await
            .map_err(lease_err)?;
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_covers_every_shard_once_and_evenly() {
        for n in 1..=7usize {
            let members: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
            let mut seen = BTreeSet::new();
            let mut sizes = Vec::new();
            for m in &members {
                let w = wanted(&members, m, 16);
                sizes.push(w.len());
                for s in w {
                    assert!(seen.insert(s), "shard {s} twice with {n} members");
                }
            }
            assert_eq!(seen.len(), 16, "{n} members");
            let (min, max) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
            assert!(max - min <= 1, "{n} members: {sizes:?}");
        }
    }

    #[test]
    fn a_stranger_wants_nothing() {
        assert!(wanted(&["a".into()], "b", 16).is_empty());
    }
}
