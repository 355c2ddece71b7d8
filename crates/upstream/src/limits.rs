//! Registries that rate-limit or cannot be reached: their `ratelimit-limit` /
//! `ratelimit-remaining` headers become gauges, and a `429` makes the client leave the
//! registry alone for its `Retry-After` (or a default), answering at once meanwhile so the
//! cluster serves what it has instead of adding to the count. A registry that cannot be
//! connected to (or does not answer) is left alone for a few seconds, so that a pull does
//! not wait out a connect timeout per layer while the cluster could answer. One warning is
//! logged when a registry starts limiting or goes unreachable, not one per request.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use mirrorlet_oci::{Registry, UpstreamError};
use tokio::time::Instant;

use crate::metrics::{RegistryLabels, UpstreamMetrics};

/// How long a registry that could not be reached is left alone.
pub(crate) const UNREACHABLE_BACKOFF: Duration = Duration::from_secs(5);

/// Per-registry rate-limit and reachability state.
#[derive(Debug)]
pub(crate) struct Limits {
    blocked_until: Mutex<HashMap<Registry, Instant>>,
    down_until: Mutex<HashMap<Registry, Instant>>,
    /// The last time each registry could not be used, and why (for the status page).
    last_problem: Mutex<HashMap<Registry, (SystemTime, String)>>,
    default_retry_after: Duration,
}

/// Where a registry stands: left alone for how much longer after a 429 or after failing
/// to answer, and its last problem.
pub(crate) struct Standing {
    pub(crate) rate_limited_for: Option<Duration>,
    pub(crate) unreachable_for: Option<Duration>,
    pub(crate) last_problem: Option<(SystemTime, String)>,
}

impl Limits {
    pub(crate) fn new(default_retry_after: Duration) -> Self {
        Self {
            blocked_until: Mutex::new(HashMap::new()),
            down_until: Mutex::new(HashMap::new()),
            last_problem: Mutex::new(HashMap::new()),
            default_retry_after,
        }
    }

    /// Records that `registry` could not be reached.
    pub(crate) fn unreachable(&self, registry: &Registry, why: &str) {
        let now = Instant::now();
        let mut map = self
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let was_down = map
            .get(registry)
            .is_some_and(|t| *t + Duration::from_secs(1) >= now);
        map.insert(registry.clone(), now + UNREACHABLE_BACKOFF);
        drop(map);
        self.problem(registry, format!("unreachable: {why}"));
        if !was_down {
            tracing::warn!(%registry, why, retry_in = ?UNREACHABLE_BACKOFF, "upstream registry unreachable; serving what the cluster holds");
        }
    }

    /// Fails at once while `registry` is being left alone after a 429, or after it could
    /// not be reached.
    pub(crate) fn check(&self, registry: &Registry) -> Result<(), UpstreamError> {
        let down = self
            .down_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(registry)
            .copied();
        if let Some(until) = down.filter(|u| *u > Instant::now()) {
            return Err(UpstreamError::Unavailable(format!(
                "{registry} was unreachable moments ago; asking again in {:?}",
                until.saturating_duration_since(Instant::now())
            )));
        }
        let map = self
            .blocked_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match map.get(registry) {
            Some(until) if *until > Instant::now() => Err(UpstreamError::RateLimited {
                registry: registry.clone(),
                retry_after: until.saturating_duration_since(Instant::now()),
            }),
            _ => Ok(()),
        }
    }

    fn problem(&self, registry: &Registry, why: String) {
        self.last_problem
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(registry.clone(), (SystemTime::now(), why));
    }

    /// Where `registry` stands now.
    pub(crate) fn standing(&self, registry: &Registry) -> Standing {
        let now = Instant::now();
        let left = |map: &Mutex<HashMap<Registry, Instant>>| {
            map.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(registry)
                .filter(|until| **until > now)
                .map(|until| until.saturating_duration_since(now))
        };
        Standing {
            rate_limited_for: left(&self.blocked_until),
            unreachable_for: left(&self.down_until),
            last_problem: self
                .last_problem
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(registry)
                .cloned(),
        }
    }

    /// Records a 429 from `registry` with its `Retry-After` header, if any; returns the
    /// error to give the caller.
    pub(crate) fn limited(
        &self,
        registry: &Registry,
        retry_after: Option<&str>,
        metrics: &UpstreamMetrics,
    ) -> UpstreamError {
        let wait = retry_after
            .and_then(parse_retry_after)
            .unwrap_or(self.default_retry_after);
        let now = Instant::now();
        let was_blocked = {
            let mut map = self
                .blocked_until
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let previous = map.insert(registry.clone(), now + wait);
            previous.is_some_and(|t| t + Duration::from_secs(1) >= now)
        };
        self.problem(
            registry,
            format!(
                "rate limited (429); left alone for {}",
                humantime::format_duration(wait)
            ),
        );
        metrics
            .rate_limited
            .get_or_create(&RegistryLabels {
                registry: registry.to_string(),
            })
            .inc();
        if !was_blocked {
            tracing::warn!(%registry, retry_after = ?wait, "upstream registry is rate limiting pulls (429); not asking it until then, serving what the cluster holds");
        }
        UpstreamError::RateLimited {
            registry: registry.clone(),
            retry_after: wait,
        }
    }
}

/// Reads `ratelimit-limit` and `ratelimit-remaining` (`100;w=21600`) into the gauges.
pub(crate) fn record_budget(registry: &Registry, headers: &HeaderMap, metrics: &UpstreamMetrics) {
    let labels = RegistryLabels {
        registry: registry.to_string(),
    };
    let read = |name: &str| {
        headers
            .get(name)?
            .to_str()
            .ok()?
            .split(';')
            .next()?
            .trim()
            .parse::<i64>()
            .ok()
    };
    if let Some(limit) = read("ratelimit-limit") {
        metrics.ratelimit_limit.get_or_create(&labels).set(limit);
    }
    if let Some(left) = read("ratelimit-remaining") {
        metrics.ratelimit_remaining.get_or_create(&labels).set(left);
    }
}

/// `Retry-After` as seconds or an HTTP date; capped at a day.
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    };
    Some(wait.min(Duration::from_secs(24 * 3600)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 7 "), Some(Duration::from_secs(7)));
        let soon = std::time::SystemTime::now() + Duration::from_secs(90);
        let d = parse_retry_after(&httpdate::fmt_http_date(soon)).expect("date");
        assert!(
            d > Duration::from_secs(80) && d <= Duration::from_secs(90),
            "{d:?}"
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(
            parse_retry_after("99999999"),
            Some(Duration::from_secs(86400))
        );
    }

    #[tokio::test]
    async fn a_429_blocks_the_registry_for_its_retry_after() {
        tokio::time::pause();
        let limits = Limits::new(Duration::from_secs(60));
        let metrics = UpstreamMetrics::default();
        let hub = Registry::docker_hub();
        let ghcr = Registry::parse("ghcr.io").expect("registry");
        assert!(limits.check(&hub).is_ok());
        limits.limited(&hub, Some("30"), &metrics);
        assert!(matches!(
            limits.check(&hub),
            Err(UpstreamError::RateLimited { retry_after, .. }) if retry_after <= Duration::from_secs(30)
        ));
        assert!(
            limits.check(&ghcr).is_ok(),
            "other registries are unaffected"
        );
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(limits.check(&hub).is_ok());
        limits.limited(&hub, None, &metrics);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(limits.check(&hub).is_err(), "the default wait applies");
        let mut headers = HeaderMap::new();
        headers.insert("ratelimit-limit", "100;w=21600".parse().expect("value"));
        headers.insert("ratelimit-remaining", "42;w=21600".parse().expect("value"));
        record_budget(&hub, &headers, &metrics);
        let labels = RegistryLabels {
            registry: "docker.io".into(),
        };
        assert_eq!(metrics.ratelimit_remaining.get_or_create(&labels).get(), 42);
        assert_eq!(metrics.ratelimit_limit.get_or_create(&labels).get(), 100);
    }
}
