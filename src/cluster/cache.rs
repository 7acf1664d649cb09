//! A short-lived cache of member lookups for forwarding: a flood of requests for
//! `/nodes/{other}/...` costs at most one etcd read per name and [`MEMBER_CACHE_TTL`],
//! whatever the request rate (the same etcd carries the leases). Misses are looked up one
//! at a time, so requests arriving together for a name share one read; failures are
//! cached as well, so a stalled etcd is asked once per TTL, not once per request.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::Member;

/// How long a lookup (found, absent or failed) is reused.
pub const MEMBER_CACHE_TTL: Duration = Duration::from_secs(1);

/// Most names kept; past it, expired entries go, and if all are fresh, all go.
const MAX_ENTRIES: usize = 1024;

type Lookup = Result<Option<Member>, String>;

/// Recent member lookups by node name.
pub struct MemberCache {
    ttl: Duration,
    entries: Mutex<HashMap<String, (Instant, Lookup)>>,
    /// Held while a miss is looked up, so concurrent misses wait for one read.
    miss: tokio::sync::Mutex<()>,
}

impl MemberCache {
    pub fn new(ttl: Duration) -> Self {
        MemberCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
            miss: tokio::sync::Mutex::new(()),
        }
    }

    fn cached(&self, node: &str) -> Option<Lookup> {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries
            .get(node)
            .filter(|(at, _)| at.elapsed() < self.ttl)
            .map(|(_, lookup)| lookup.clone())
    }

    fn store(&self, node: &str, lookup: Lookup) {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if entries.len() >= MAX_ENTRIES {
            entries.retain(|_, (at, _)| at.elapsed() < self.ttl);
            if entries.len() >= MAX_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(node.to_string(), (Instant::now(), lookup));
    }

    /// The cached lookup of `node` if it is fresh, else the result of `fetch` (cached).
    pub async fn get_or_fetch<F, Fut>(&self, node: &str, fetch: F) -> anyhow::Result<Option<Member>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = anyhow::Result<Option<Member>>>,
    {
        if let Some(hit) = self.cached(node) {
            return hit.map_err(anyhow::Error::msg);
        }
        let _one = self.miss.lock().await;
        if let Some(hit) = self.cached(node) {
            return hit.map_err(anyhow::Error::msg);
        }
        let fresh = fetch().await.map_err(|e| format!("{e:#}"));
        self.store(node, fresh.clone());
        fresh.map_err(anyhow::Error::msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn one_fetch_per_name_and_ttl_failures_included() {
        let cache = MemberCache::new(Duration::from_secs(60));
        let fetches = AtomicUsize::new(0);
        for _ in 0..5 {
            let got = cache
                .get_or_fetch("b", || async {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    anyhow::bail!("etcd unreachable")
                })
                .await;
            assert_eq!(got.unwrap_err().to_string(), "etcd unreachable");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        let expired = MemberCache::new(Duration::ZERO);
        for _ in 0..2 {
            let got = expired
                .get_or_fetch("b", || async {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    Ok(None)
                })
                .await;
            assert!(got.unwrap().is_none());
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 3);
    }
}
