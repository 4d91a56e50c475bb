//! `GenotypeStore`: where the genotypes of recent tasks are kept for `GET /genotypes/{task_id}`.
//!
//! - [`memory`]: in this process (the default, for one replica); lost on restart.
//! - [`redis_store`]: in Redis (`--store redis://host:port/db`), shared by every replica behind a
//!   load balancer and kept across their restarts.
//!
//! Handlers see one enum with the same bounds either way. A store is a convenience next to the
//! answer, never a condition of it: `/adapt` answers with its genotype whether or not the store
//! kept it, reads answer 503 while Redis is unreachable, and `/readyz` says why.
//! Kept task models have a store of their own beside it ([`task_models`]), bounded in bytes, in
//! the same place: this process, or the same Redis.

pub mod kept_task;
pub mod memory;
pub mod redis_store;
pub mod task_models;

use crate::server::api::GenotypeRecord;
use memory::MemoryStore;
use redis_store::RedisStore;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// Where genotypes are kept (`--store`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    Memory,
    /// A `redis://host:port/db` URL, checked when parsed.
    Redis(String),
}

impl FromStr for StoreLocation {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        if text == "memory" {
            return Ok(StoreLocation::Memory);
        }
        if !text.starts_with("redis://") {
            return Err(format!(
                "'{text}' is not a store; use memory (the default) or redis://host:port/db"
            ));
        }
        ::redis::Client::open(text)
            .map(|_| StoreLocation::Redis(text.to_string()))
            .map_err(|e| {
                format!(
                    "'{}' is not a usable Redis URL ({e}); write it as redis://host:port/db",
                    redacted(text)
                )
            })
    }
}

/// A Redis URL with any password in it replaced, fit for logs and error messages.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// What the store needs besides its location: the bounds of `--genotype-store-size` and
/// `--genotype-store-bytes`, and Redis's TTL and per-call timeout.
#[derive(Clone, Copy, Debug)]
pub struct StoreBounds {
    pub capacity: usize,
    pub max_bytes: usize,
    pub ttl: Duration,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis refused, dropped or did not answer within the timeout.
    #[error("the shared store (Redis at {location}) is unavailable: {reason}")]
    Unavailable { location: String, reason: String },
    #[error("the genotype record is {size} bytes, over --genotype-store-bytes {max_bytes}")]
    TooLarge { size: usize, max_bytes: usize },
    /// A stored value that does not read as a record of this version: a fault on our side.
    #[error("the stored record of task {task_id} does not parse: {reason}")]
    Corrupt { task_id: String, reason: String },
}

pub enum GenotypeStore {
    Memory(MemoryStore),
    Redis(Arc<RedisStore>),
}

impl GenotypeStore {
    pub fn open(location: &StoreLocation, bounds: StoreBounds) -> Result<Self, String> {
        Ok(match location {
            StoreLocation::Memory => {
                GenotypeStore::Memory(MemoryStore::new(bounds.capacity, bounds.max_bytes))
            }
            StoreLocation::Redis(url) => {
                GenotypeStore::Redis(Arc::new(RedisStore::open(url, bounds)?))
            }
        })
    }

    /// `memory` or `redis`, as `/readyz` names it.
    pub fn kind(&self) -> &'static str {
        match self {
            GenotypeStore::Memory(_) => "memory",
            GenotypeStore::Redis(_) => "redis",
        }
    }

    pub async fn insert(&self, record: GenotypeRecord) -> Result<(), StoreError> {
        let result = match self {
            GenotypeStore::Memory(store) => store.insert(record),
            GenotypeStore::Redis(store) => store.insert(&record).await,
        };
        counted("insert", result)
    }

    pub async fn get(&self, task_id: &str) -> Result<Option<GenotypeRecord>, StoreError> {
        let result = match self {
            GenotypeStore::Memory(store) => Ok(store.get(task_id)),
            GenotypeStore::Redis(store) => store.get(task_id).await,
        };
        counted("get", result)
    }

    /// Up to `limit` records, newest first.
    pub async fn recent(&self, limit: usize) -> Result<Vec<GenotypeRecord>, StoreError> {
        let result = match self {
            GenotypeStore::Memory(store) => Ok(store.recent(limit)),
            GenotypeStore::Redis(store) => store.recent(limit).await,
        };
        counted("recent", result)
    }

    /// Whether the store answers now (always, in memory).
    pub async fn check(&self) -> Result<(), StoreError> {
        match self {
            GenotypeStore::Memory(_) => Ok(()),
            GenotypeStore::Redis(store) => store.ping().await,
        }
    }
}

/// Counts failed store calls by operation (`tnas_store_failures_total`), so that a store going
/// away shows on a dashboard before anyone reads a 503.
fn counted<T>(operation: &'static str, result: Result<T, StoreError>) -> Result<T, StoreError> {
    if result.is_err() {
        metrics::counter!("tnas_store_failures_total", "operation" => operation).increment(1);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_memory_and_redis_urls_and_explains_the_rest() {
        assert_eq!("memory".parse(), Ok(StoreLocation::Memory));
        assert_eq!(
            "redis://127.0.0.1:6379/2".parse(),
            Ok(StoreLocation::Redis("redis://127.0.0.1:6379/2".into()))
        );
        let wrong = "postgres://db".parse::<StoreLocation>().unwrap_err();
        assert!(wrong.contains("redis://host:port/db"), "{wrong}");
        let bad_db = "redis://:secret@host:6379/notanumber"
            .parse::<StoreLocation>()
            .unwrap_err();
        assert!(!bad_db.contains("secret"), "{bad_db}");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(redacted("redis://:pw@h:1/0"), "redis://***@h:1/0");
        assert_eq!(redacted("redis://h:1/0"), "redis://h:1/0");
    }
}
