//! The instance's shared idempotent producer, made again when librdkafka raises a fatal error.
//!
//! An idempotent producer can hit errors it cannot recover from by itself — a sequence
//! desynchronization after a connection dropped mid-request is one — and from then on refuses
//! every message with `Fatal`. librdkafka's guidance is to make a new producer; until this
//! type did, every publication of the instance (results, dead letters, scheduled commands,
//! commands made from notifications) retried for ever against the dead one.

use std::sync::{Arc, RwLock};

use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError as RdKafkaError, RDKafkaErrorCode};
use rdkafka::message::ToBytes;
use rdkafka::producer::future_producer::OwnedDeliveryResult;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::util::Timeout;

use super::KafkaError;
use crate::text::quote;

/// A cheap handle (clone it freely) on the current producer and the settings to make another.
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    config: ClientConfig,
    current: RwLock<FutureProducer>,
}

impl Publisher {
    /// Makes the first producer from `config`.
    pub fn create(config: ClientConfig) -> Result<Self, KafkaError> {
        let producer: FutureProducer = config.create().map_err(KafkaError::Client)?;
        Ok(Publisher {
            inner: Arc::new(Inner {
                config,
                current: RwLock::new(producer),
            }),
        })
    }

    /// The producer in use now.
    pub fn current(&self) -> FutureProducer {
        self.inner
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Sends through the current producer and waits for the broker's acknowledgement, as
    /// [`FutureProducer::send`]; a fatal error makes a new producer for the next attempt.
    pub async fn send<K, P>(
        &self,
        record: FutureRecord<'_, K, P>,
        queue_timeout: Timeout,
    ) -> OwnedDeliveryResult
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        let producer = self.current();
        let sent = producer.send(record, queue_timeout).await;
        if let Err((e, _)) = &sent {
            self.renew_if_fatal(&producer, e);
        }
        sent
    }

    /// When `producer` failed for good (`e` is librdkafka's fatal error, or the client has one
    /// recorded) and is still the current one, replaces it with a new producer. Returns
    /// whether it did.
    pub fn renew_if_fatal(&self, producer: &FutureProducer, e: &RdKafkaError) -> bool {
        let fatal = producer.client().fatal_error();
        if e.rdkafka_error_code() != Some(RDKafkaErrorCode::Fatal) && fatal.is_none() {
            return false;
        }
        let mut current = self
            .inner
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if current.client().native_ptr() != producer.client().native_ptr() {
            return false; // another task has already replaced it
        }
        let reason = fatal.map_or_else(|| e.to_string(), |(code, s)| format!("{code:?}: {s}"));
        match self.inner.config.create::<FutureProducer>() {
            Ok(fresh) => {
                *current = fresh;
                crate::metrics::metrics()
                    .producer_renewals
                    .with_label_values(&[] as &[&str])
                    .inc();
                tracing::error!(
                    reason = %quote(&reason),
                    "the Kafka producer failed for good; a new one takes over (messages it refused are retried)"
                );
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "the Kafka producer failed for good and a new one could not be made; retrying at the next failure");
                false
            }
        }
    }
}
