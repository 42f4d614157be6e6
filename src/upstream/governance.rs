//! Registration with the service-governance platform (seed claim 3): register at start-up
//! with this instance's identity, heartbeat at a third of the lease while running (registering
//! again if the platform forgot us), deregister on shutdown.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{MAX_SMALL_BODY_BYTES, UpstreamError, join, read_limited, retry_after};
use crate::retry::{RetryPolicy, retry};

/// The platform's answer to a registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub id: String,
    pub lease: Duration,
}

#[derive(Deserialize)]
struct RegistrationResponse {
    registration_id: String,
    #[serde(default)]
    lease_seconds: Option<u64>,
}

/// This instance's identity at the platform and the client that speaks for it.
pub struct Governance {
    http: reqwest::Client,
    base_url: String,
    /// Registered service name.
    pub service: String,
    /// Identity the platform verifies.
    pub app_id: String,
    /// Unique per process (host + pid + random), so N instances are N registrations.
    pub instance_id: String,
    policy: RetryPolicy,
    /// The management systems served, reported at registration.
    systems: Vec<String>,
}

impl Governance {
    pub fn new(
        http: reqwest::Client,
        base_url: &str,
        app_id: &str,
        instance_id: String,
        policy: RetryPolicy,
    ) -> Self {
        Self {
            systems: Vec::new(),
            http,
            base_url: base_url.to_owned(),
            service: "product-sync".to_owned(),
            app_id: app_id.to_owned(),
            instance_id,
            policy,
        }
    }

    /// The same registration, reporting the management systems this instance serves.
    pub fn with_systems(mut self, systems: Vec<String>) -> Self {
        self.systems = systems;
        self
    }

    /// Registers, retrying transient failures; an unknown identity (403) is permanent.
    pub async fn register(&self) -> Result<Registration, UpstreamError> {
        retry(&self.policy, "governance registration", || {
            self.register_once()
        })
        .await
    }

    async fn register_once(&self) -> Result<Registration, UpstreamError> {
        const WHAT: &str = "governance registration";
        let url = join(&self.base_url, "v1/registrations")?;
        let response = self
            .http
            .post(url)
            .json(&json!({
                "service": self.service,
                "instance_id": self.instance_id,
                "app_id": self.app_id,
                "version": env!("CARGO_PKG_VERSION"),
                "systems": self.systems,
            }))
            .send()
            .await
            .map_err(|source| transport(WHAT, source))?;
        let status = response.status();
        if status == reqwest::StatusCode::FORBIDDEN {
            return Err(UpstreamError::UnknownIdentity {
                app_id: self.app_id.clone(),
            });
        }
        let wait = retry_after(response.headers());
        let body = read_limited(response, MAX_SMALL_BODY_BYTES, WHAT).await?;
        if !status.is_success() {
            return Err(UpstreamError::from_status(
                WHAT,
                status,
                wait,
                &String::from_utf8_lossy(&body),
            ));
        }
        let parsed: RegistrationResponse =
            serde_json::from_slice(&body).map_err(|e| UpstreamError::MalformedBody {
                what: WHAT.into(),
                reason: e.to_string(),
            })?;
        let registration = Registration {
            id: parsed.registration_id,
            lease: Duration::from_secs(parsed.lease_seconds.unwrap_or(30).max(1)),
        };
        tracing::info!(app_id = %self.app_id, instance_id = %self.instance_id, registration_id = %registration.id, lease_s = registration.lease.as_secs(), "registered with the governance platform");
        Ok(registration)
    }

    /// One heartbeat. `Ok(false)` when the platform no longer knows the registration.
    pub async fn heartbeat(&self, registration: &Registration) -> Result<bool, UpstreamError> {
        const WHAT: &str = "governance heartbeat";
        let url = join(
            &self.base_url,
            &format!("v1/registrations/{}/heartbeat", registration.id),
        )?;
        let response = self
            .http
            .put(url)
            .send()
            .await
            .map_err(|source| transport(WHAT, source))?;
        match response.status() {
            s if s.is_success() => Ok(true),
            reqwest::StatusCode::NOT_FOUND => Ok(false),
            s => Err(UpstreamError::from_status(
                WHAT,
                s,
                retry_after(response.headers()),
                "",
            )),
        }
    }

    /// Deregisters; a registration the platform already forgot counts as done.
    pub async fn deregister(&self, registration: &Registration) -> Result<(), UpstreamError> {
        const WHAT: &str = "governance deregistration";
        let url = join(
            &self.base_url,
            &format!("v1/registrations/{}", registration.id),
        )?;
        let response = self
            .http
            .delete(url)
            .send()
            .await
            .map_err(|source| transport(WHAT, source))?;
        match response.status() {
            s if s.is_success() || s == reqwest::StatusCode::NOT_FOUND => {
                tracing::info!(registration_id = %registration.id, "deregistered from the governance platform");
                Ok(())
            }
            s => Err(UpstreamError::from_status(
                WHAT,
                s,
                retry_after(response.headers()),
                "",
            )),
        }
    }

    /// Heartbeats `registration` until `stop` fires (registering again if the platform
    /// forgot it), then deregisters.
    pub async fn keep(self: Arc<Self>, first: Registration, stop: CancellationToken) {
        let mut registration = first;
        loop {
            let every = (registration.lease / 3).max(Duration::from_millis(200));
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            match self.heartbeat(&registration).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(registration_id = %registration.id, "the governance platform forgot this instance; registering again");
                    match self.register().await {
                        Ok(r) => registration = r,
                        Err(e) => {
                            tracing::error!(error = %e, "registering again failed; will retry at the next heartbeat")
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "governance heartbeat failed; will retry"),
            }
        }
        if let Err(e) = self.deregister(&registration).await {
            tracing::warn!(error = %e, "deregistration failed; the lease will expire on its own");
        }
    }
}

fn transport(what: &str, source: reqwest::Error) -> UpstreamError {
    super::unanswered(what, source, "governance.ca_file")
}
