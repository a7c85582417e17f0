//! *(issue 29)* What the daemon counts as it works: the counters and
//! histograms every layer adds to, in one place, with the names dashboards
//! rely on. The metrics edge (`edge/metrics.rs`) serves them, beside what it
//! reads of the devices at each scrape.
//!
//! Why process-wide and not owned by the service: the counts come from
//! every layer (the edges count operations and polkit checks, the store its
//! commits, the service its hotplug events), as `tracing` is fed from every
//! layer; passing a handle down each of them would buy nothing, as the
//! daemon has one of each. The families are `prometheus-client`'s own, made
//! of atomics, so counting never waits on a scrape.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// `operation` and `result` (`ok`, or the error's short name).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub operation: &'static str,
    pub result: String,
}

/// `operation`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Operation {
    pub operation: &'static str,
}

/// `action` (the polkit action id) and `result`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Check {
    pub action: &'static str,
    pub result: &'static str,
}

/// `action` (`add`, `remove`, `bind`, `unbind`, `change`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Uevent {
    pub action: &'static str,
}

type Histograms<S> = Family<S, Histogram, fn() -> Histogram>;

/// Every family counted as the daemon works.
pub struct Telemetry {
    operations: Family<Outcome, Counter>,
    operation_seconds: Histograms<Operation>,
    polkit_checks: Family<Check, Counter>,
    polkit_seconds: Histogram,
    commit_seconds: Histogram,
    journal_bytes: Gauge,
    hotplug_events: Family<Uevent, Counter>,
}

/// 1 ms to about 65 s, doubling: a Bind is milliseconds, one stuck in the
/// kernel runs to its deadline.
fn operation_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// 100 µs to about 3 s, doubling: an fsync, or a polkit rule.
fn short_buckets() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

static TELEMETRY: LazyLock<Telemetry> = LazyLock::new(|| Telemetry {
    operations: Family::default(),
    operation_seconds: Family::new_with_constructor(operation_buckets),
    polkit_checks: Family::default(),
    polkit_seconds: short_buckets(),
    commit_seconds: short_buckets(),
    journal_bytes: Gauge::default(),
    hotplug_events: Family::default(),
});

/// The daemon's one set of families.
pub fn get() -> &'static Telemetry {
    &TELEMETRY
}

impl Telemetry {
    /// An operation a client asked for ended: `result` is `Ok` or the
    /// error's short name. `took` is its time after authorization, when it
    /// got that far.
    pub fn operation(
        &self,
        operation: &'static str,
        result: Result<(), &str>,
        took: Option<Duration>,
    ) {
        let result = match result {
            Ok(()) => "ok".to_string(),
            Err(name) => name.to_string(),
        };
        self.operations
            .get_or_create(&Outcome { operation, result })
            .inc();
        if let Some(took) = took {
            self.operation_seconds
                .get_or_create(&Operation { operation })
                .observe(took.as_secs_f64());
        }
    }

    /// A polkit check ended with `result` after `took`.
    pub fn polkit_check(&self, action: &'static str, result: &'static str, took: Duration) {
        self.polkit_checks
            .get_or_create(&Check { action, result })
            .inc();
        self.polkit_seconds.observe(took.as_secs_f64());
    }

    /// A batch of registry changes was made durable in `took`; the journal
    /// is now `journal_bytes` long.
    pub fn commit(&self, took: Duration, journal_bytes: u64) {
        self.commit_seconds.observe(took.as_secs_f64());
        self.journal_bytes
            .set(i64::try_from(journal_bytes).unwrap_or(i64::MAX));
    }

    /// The journal's length after a compaction or at start-up.
    pub fn journal_len(&self, bytes: u64) {
        self.journal_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// A hotplug event arrived from the kernel.
    pub fn hotplug(&self, action: &'static str) {
        self.hotplug_events.get_or_create(&Uevent { action }).inc();
    }

    /// Puts every family into `registry` (they are shared, not copied).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "hypeman_operations",
            "Operations clients asked for, by operation and result (ok or the error's short name)",
            self.operations.clone(),
        );
        registry.register_with_unit(
            "hypeman_operation_duration",
            "How long operations took once authorized",
            Unit::Seconds,
            self.operation_seconds.clone(),
        );
        registry.register(
            "hypeman_polkit_checks",
            "Authorization checks, by polkit action and result",
            self.polkit_checks.clone(),
        );
        registry.register_with_unit(
            "hypeman_polkit_check_duration",
            "How long each authorization check took",
            Unit::Seconds,
            self.polkit_seconds.clone(),
        );
        registry.register_with_unit(
            "hypeman_store_commit_duration",
            "How long each durable write of the registry took (journal and fsync)",
            Unit::Seconds,
            self.commit_seconds.clone(),
        );
        registry.register_with_unit(
            "hypeman_store_journal",
            "The registry journal's length",
            Unit::Bytes,
            self.journal_bytes.clone(),
        );
        registry.register(
            "hypeman_hotplug_events",
            "PCI uevents from the kernel, by action",
            self.hotplug_events.clone(),
        );
    }
}
