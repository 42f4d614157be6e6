//! The console's charts of the last hour: samples kept in memory by the overview's gathering
//! round (every 2 s; at most an hour's worth, so memory is bounded), served at
//! `GET /api/v1/history`. Rates come from this instance's counters; lag is this instance's
//! partitions; the outbox age is the store's (the same on every instance).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use chrono::{DateTime, Utc};
use prometheus::proto::MetricFamily;
use serde::Serialize;

use super::Overview;

/// How far back the charts go.
pub const WINDOW: Duration = Duration::from_secs(3600);

/// Most samples kept (an hour at one a second; the round takes one every 2 s).
const MAX_SAMPLES: usize = 3600;

/// One point of every chart.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sample {
    pub at: DateTime<Utc>,
    /// Change and result events published per second (this instance's relay).
    pub events_per_s: f64,
    /// Commands finished per second (this instance).
    pub commands_per_s: f64,
    /// Consumer lag of this instance's request partitions.
    pub lag: i64,
    /// The oldest queued event's age (`None`: not read this round).
    pub outbox_age_s: Option<i64>,
    /// Failed requests to each management system per second.
    pub upstream_errors_per_s: BTreeMap<String, f64>,
}

/// Counter totals at one moment.
#[derive(Debug, Clone, Default)]
pub struct Totals {
    pub events: f64,
    pub commands: f64,
    pub lag: i64,
    pub upstream_errors: BTreeMap<String, f64>,
}

impl Totals {
    /// Reads the totals from the process's metrics.
    pub fn read(families: &[MetricFamily]) -> Self {
        let mut t = Totals::default();
        for family in families {
            for m in family.get_metric() {
                let value = m.get_counter().get_value();
                let label = |name: &str| {
                    m.get_label()
                        .iter()
                        .find(|l| l.name() == name)
                        .map(|l| l.value().to_owned())
                };
                match family.name() {
                    "product_sync_relay_published_total" => t.events += value,
                    "product_sync_commands_total" => t.commands += value,
                    "product_sync_consumer_lag" => t.lag += m.get_gauge().get_value() as i64,
                    "product_sync_upstream_requests_total"
                        if label("outcome").as_deref() != Some("ok") =>
                    {
                        let system = label("system").unwrap_or_default();
                        *t.upstream_errors.entry(system).or_default() += value;
                    }
                    _ => {}
                }
            }
        }
        t
    }
}

/// The samples of the last hour.
#[derive(Debug, Default)]
pub struct History {
    samples: VecDeque<Sample>,
    last: Option<(DateTime<Utc>, Totals)>,
}

impl History {
    /// Adds a sample from the totals now and the overview just gathered (rates against the
    /// previous round's totals; the first round only remembers them).
    pub fn record(&mut self, at: DateTime<Utc>, totals: Totals, overview: &Overview) {
        if let Some((then, before)) = &self.last {
            let secs = (at - *then).num_milliseconds() as f64 / 1000.0;
            if secs > 0.0 {
                let rate = |now: f64, was: f64| ((now - was).max(0.0) / secs * 10.0).round() / 10.0;
                let upstream_errors_per_s = totals
                    .upstream_errors
                    .iter()
                    .map(|(system, n)| {
                        let was = before.upstream_errors.get(system).copied().unwrap_or(0.0);
                        (system.clone(), rate(*n, was))
                    })
                    .collect();
                self.samples.push_back(Sample {
                    at,
                    events_per_s: rate(totals.events, before.events),
                    commands_per_s: rate(totals.commands, before.commands),
                    lag: totals.lag,
                    outbox_age_s: overview.outbox.as_ref().map(|o| o.oldest_age_s),
                    upstream_errors_per_s,
                });
            }
        }
        self.last = Some((at, totals));
        let window = chrono::Duration::from_std(WINDOW).unwrap_or(chrono::Duration::hours(1));
        while self
            .samples
            .front()
            .is_some_and(|s| s.at < at - window || self.samples.len() > MAX_SAMPLES)
        {
            self.samples.pop_front();
        }
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.samples.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn totals(events: f64, commands: f64, errors: f64) -> Totals {
        Totals {
            events,
            commands,
            lag: 3,
            upstream_errors: BTreeMap::from([("wms".to_owned(), errors)]),
        }
    }

    #[test]
    fn rates_come_from_two_rounds_and_an_hour_is_kept() {
        let mut h = History::default();
        let t0 = Utc::now();
        h.record(t0, totals(0.0, 0.0, 0.0), &Overview::default());
        assert!(h.samples().is_empty(), "the first round has no rate yet");
        h.record(
            t0 + chrono::Duration::seconds(2),
            totals(100.0, 4.0, 1.0),
            &Overview::default(),
        );
        let s = &h.samples()[0];
        assert_eq!((s.events_per_s, s.commands_per_s, s.lag), (50.0, 2.0, 3));
        assert_eq!(s.upstream_errors_per_s["wms"], 0.5);
        // Two hours later, only the last hour remains.
        for i in 0..3600 {
            let at = t0 + chrono::Duration::seconds(4 + 2 * i);
            h.record(at, totals(100.0 + i as f64, 4.0, 1.0), &Overview::default());
        }
        let at = t0 + chrono::Duration::seconds(4 + 2 * 3599);
        let samples = h.samples();
        assert!(samples.len() <= 1801, "{}", samples.len());
        assert!(samples[0].at >= at - chrono::Duration::hours(1));
    }
}
