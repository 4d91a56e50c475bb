//! `RedisStore`: genotypes and kept task models in Redis, shared by every replica and kept across
//! their restarts.
//!
//! Keys are namespaced and versioned, so that a later format lives beside this one:
//! - `tnas:v1:genotype:<task_id>`: the record's JSON, exactly as `GET /genotypes/{task_id}`
//!   returns it, expiring after `--store-ttl-s`;
//! - `tnas:v1:genotypes`: a sorted set of task ids scored by creation time (ms since the epoch),
//!   for the listing and for the count bound of `--genotype-store-size`;
//! - `tnas:v1:task-model:<task_id>`: a hash of the kept task model's files (`meta`, its
//!   `model.json`; `weights`; `support`), expiring `--store-ttl-s` after its last use;
//! - `tnas:v1:task-models`: a sorted set of those task ids scored by last use, and
//!   `tnas:v1:task-model-bytes`: each one's size, for the byte bound of `--task-store-bytes`
//!   (the least recently used evicted first, across all replicas).
//!
//! One connection, multiplexed, reconnects by itself when Redis drops it (redis's
//! `ConnectionManager`); every call is bounded by `--store-timeout-ms`, so a Redis that is down or
//! slow costs a request at most that, and a call that times out has the next one start on a
//! fresh connection, since one that stopped answering without being dropped (a Redis moved or cut
//! off without a reset) would otherwise be kept for good.

use super::kept_task::KeptTask;
use super::{redacted, StoreBounds, StoreError};
use crate::server::api::GenotypeRecord;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, RedisError, Script};
use std::future::Future;
use std::sync::Mutex;

const RECORD_PREFIX: &str = "tnas:v1:genotype:";
const INDEX: &str = "tnas:v1:genotypes";

/// Adds one record and enforces the bounds, in one step so that replicas inserting at once never
/// leave a record out of the index or the index past its bound.
/// KEYS: the record's key, the index. ARGV: JSON, TTL (ms), now (ms), task id, capacity,
/// record key prefix, the score before which index entries have expired.
const INSERT: &str = r"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[7])
local beyond = -(tonumber(ARGV[5]) + 1)
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, beyond)) do
  redis.call('DEL', ARGV[6] .. id)
end
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, beyond)
return 1
";

const TASK_MODEL_PREFIX: &str = "tnas:v1:task-model:";
const TASK_MODEL_INDEX: &str = "tnas:v1:task-models";
const TASK_MODEL_SIZES: &str = "tnas:v1:task-model-bytes";

/// Keeps one task model and evicts the least recently used until all fit the byte bound, in one
/// step, so that replicas keeping models at once never overshoot it. Times are Redis's own, so
/// that replicas' clocks do not order the uses. Index entries whose model has expired, and sizes
/// of models no longer indexed (Redis may evict keys of its own under `maxmemory`), are forgotten
/// first. The model just kept is never evicted. Returns the models evicted, the bytes and the
/// models kept. KEYS: the model's key, the index, the sizes. ARGV: model.json, weights, support,
/// TTL (ms), task id, byte bound, model key prefix (a model's size is its files' lengths).
const KEEP_TASK_MODEL: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local expired_before = now - tonumber(ARGV[4])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. expired_before)) do
  redis.call('DEL', ARGV[7] .. id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. expired_before)
redis.call('HSET', KEYS[1], 'meta', ARGV[1], 'weights', ARGV[2], 'support', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('ZADD', KEYS[2], now, ARGV[5])
redis.call('HSET', KEYS[3], ARGV[5], #ARGV[1] + #ARGV[2] + #ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
for _, id in ipairs(redis.call('HKEYS', KEYS[3])) do
  if not redis.call('ZSCORE', KEYS[2], id) then redis.call('HDEL', KEYS[3], id) end
end
local total = 0
for _, size in ipairs(redis.call('HVALS', KEYS[3])) do
  total = total + tonumber(size)
end
local evicted = 0
while total > tonumber(ARGV[6]) do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if not oldest or oldest == ARGV[5] then break end
  total = total - tonumber(redis.call('HGET', KEYS[3], oldest) or '0')
  redis.call('DEL', ARGV[7] .. oldest)
  redis.call('ZREM', KEYS[2], oldest)
  redis.call('HDEL', KEYS[3], oldest)
  evicted = evicted + 1
end
return {evicted, total, redis.call('ZCARD', KEYS[2])}
";

/// A kept task model's files, now its most recently used (its TTL starts again; indexed again
/// with its size if Redis evicted the index); nil when it is not kept. KEYS: the model's key, the
/// index, the sizes. ARGV: task id, TTL (ms).
const GET_TASK_MODEL: &str = r"
local files = redis.call('HMGET', KEYS[1], 'meta', 'weights', 'support')
if not files[1] then return false end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('HSETNX', KEYS[3], ARGV[1], #files[1] + #files[2] + #files[3])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return files
";

pub struct RedisStore {
    client: Client,
    /// Made on first use, inside the server's runtime (it connects lazily), and again after a
    /// call that timed out.
    connection: Mutex<Option<ConnectionManager>>,
    /// The URL without its password, for messages.
    location: String,
    bounds: StoreBounds,
    insert: Script,
    keep_task_model: Script,
    get_task_model: Script,
}

impl RedisStore {
    /// Checks the URL; connects on first use, so a server can start before its Redis.
    pub fn open(url: &str, bounds: StoreBounds) -> Result<Self, String> {
        let client = Client::open(url).map_err(|e| {
            format!(
                "--store {}: {e}; write it as redis://host:port/db",
                redacted(url)
            )
        })?;
        Ok(RedisStore {
            client,
            connection: Mutex::new(None),
            location: redacted(url),
            bounds: StoreBounds {
                capacity: bounds.capacity.max(1),
                ..bounds
            },
            insert: Script::new(INSERT),
            keep_task_model: Script::new(KEEP_TASK_MODEL),
            get_task_model: Script::new(GET_TASK_MODEL),
        })
    }

    pub async fn insert(&self, record: &GenotypeRecord) -> Result<(), StoreError> {
        let json = serde_json::to_vec(record).map_err(|e| StoreError::Corrupt {
            task_id: record.task_id.clone(),
            reason: e.to_string(),
        })?;
        if json.len() > self.bounds.max_bytes {
            return Err(StoreError::TooLarge {
                size: json.len(),
                max_bytes: self.bounds.max_bytes,
            });
        }
        let ttl_ms = self.bounds.ttl.as_millis().max(1) as u64;
        let now_ms = chrono::Utc::now().timestamp_millis();
        let mut invocation = self.insert.key(record_key(&record.task_id));
        invocation
            .key(INDEX)
            .arg(json)
            .arg(ttl_ms)
            .arg(now_ms)
            .arg(&record.task_id)
            .arg(self.bounds.capacity)
            .arg(RECORD_PREFIX)
            .arg(now_ms - ttl_ms as i64);
        let mut connection = self.connection()?;
        self.bounded(async move { invocation.invoke_async::<i64>(&mut connection).await })
            .await
            .map(|_| ())
    }

    pub async fn get(&self, task_id: &str) -> Result<Option<GenotypeRecord>, StoreError> {
        let mut connection = self.connection()?;
        let json: Option<Vec<u8>> = self
            .bounded(async move {
                redis::cmd("GET")
                    .arg(record_key(task_id))
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        json.map(|json| parse(task_id, &json)).transpose()
    }

    /// Up to `limit` records, newest first; ids whose record has expired are skipped.
    pub async fn recent(&self, limit: usize) -> Result<Vec<GenotypeRecord>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut connection = self.connection()?;
        let (ids, values): (Vec<String>, Vec<Option<Vec<u8>>>) = self
            .bounded(async move {
                let ids: Vec<String> = redis::cmd("ZREVRANGE")
                    .arg(INDEX)
                    .arg(0)
                    .arg(limit - 1)
                    .query_async(&mut connection)
                    .await?;
                if ids.is_empty() {
                    return Ok((ids, Vec::new()));
                }
                let keys: Vec<String> = ids.iter().map(|id| record_key(id)).collect();
                let values = redis::cmd("MGET")
                    .arg(keys)
                    .query_async(&mut connection)
                    .await?;
                Ok((ids, values))
            })
            .await?;
        ids.iter()
            .zip(values)
            .filter_map(|(id, json)| json.map(|json| parse(id, &json)))
            .collect()
    }

    /// Keeps `task` (with its `model.json`) within `max_bytes` for all replicas together; returns
    /// the models evicted for it, and the bytes and models kept after.
    pub async fn keep_task_model(
        &self,
        task: &KeptTask,
        model_json: &[u8],
        max_bytes: usize,
    ) -> Result<(i64, i64, i64), StoreError> {
        let ttl_ms = self.bounds.ttl.as_millis().max(1) as u64;
        let mut invocation = self.keep_task_model.key(task_model_key(task.task_id()));
        invocation
            .key(TASK_MODEL_INDEX)
            .key(TASK_MODEL_SIZES)
            .arg(model_json)
            .arg(&task.weights)
            .arg(&task.support)
            .arg(ttl_ms)
            .arg(task.task_id())
            .arg(max_bytes)
            .arg(TASK_MODEL_PREFIX);
        let mut connection = self.connection()?;
        self.bounded(async move {
            invocation
                .invoke_async::<(i64, i64, i64)>(&mut connection)
                .await
        })
        .await
    }

    /// The kept task model of `task_id`, now the most recently used, if it is kept.
    pub async fn task_model(&self, task_id: &str) -> Result<Option<KeptTask>, StoreError> {
        let ttl_ms = self.bounds.ttl.as_millis().max(1) as u64;
        let mut invocation = self.get_task_model.key(task_model_key(task_id));
        invocation
            .key(TASK_MODEL_INDEX)
            .key(TASK_MODEL_SIZES)
            .arg(task_id)
            .arg(ttl_ms);
        let mut connection = self.connection()?;
        let files: Option<(Vec<u8>, Vec<u8>, Vec<u8>)> = self
            .bounded(async move { invocation.invoke_async(&mut connection).await })
            .await?;
        files
            .map(|(meta, weights, support)| {
                let meta = serde_json::from_slice(&meta).map_err(|e| StoreError::Corrupt {
                    task_id: task_id.to_string(),
                    reason: format!("its model.json: {e}"),
                })?;
                Ok(KeptTask {
                    meta,
                    weights,
                    support,
                })
            })
            .transpose()
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut connection = self.connection()?;
        self.bounded(async move {
            redis::cmd("PING")
                .query_async::<String>(&mut connection)
                .await
        })
        .await
        .map(|_| ())
    }

    fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let mut current = self
            .connection
            .lock()
            .expect("store lock is never poisoned");
        if let Some(connection) = current.as_ref() {
            return Ok(connection.clone());
        }
        // No retries: a refused connection fails the call at once (the next call tries again),
        // rather than holding it through a backoff. No response timeout of its own: `bounded`
        // times each call, and starts over when one times out.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.bounds.timeout))
            .set_response_timeout(None)
            .set_number_of_retries(0);
        let connection = ConnectionManager::new_lazy_with_config(self.client.clone(), config)
            .map_err(|e| self.unavailable(e.to_string()))?;
        *current = Some(connection.clone());
        Ok(connection)
    }

    /// Runs one Redis exchange within the timeout.
    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.bounds.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.unavailable(e.to_string())),
            Err(_) => {
                self.connection
                    .lock()
                    .expect("store lock is never poisoned")
                    .take();
                Err(self.unavailable(format!(
                    "no answer within {} ms (--store-timeout-ms)",
                    self.bounds.timeout.as_millis()
                )))
            }
        }
    }

    fn unavailable(&self, reason: String) -> StoreError {
        StoreError::Unavailable {
            location: self.location.clone(),
            reason,
        }
    }
}

fn record_key(task_id: &str) -> String {
    format!("{RECORD_PREFIX}{task_id}")
}

fn task_model_key(task_id: &str) -> String {
    format!("{TASK_MODEL_PREFIX}{task_id}")
}

fn parse(task_id: &str, json: &[u8]) -> Result<GenotypeRecord, StoreError> {
    serde_json::from_slice(json).map_err(|e| StoreError::Corrupt {
        task_id: task_id.to_string(),
        reason: e.to_string(),
    })
}
