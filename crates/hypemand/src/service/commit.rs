//! The commit path: every change to the registry passes here, and is on disk
//! before anyone can see it or is answered.
//!
//! A change is checked against the *staged* registry (the published one and
//! the changes on their way to disk), numbered, and handed to the store's
//! writer thread, all under one short lock that never waits for the disk. The
//! caller then waits for its change to be durable. The writer takes every
//! change waiting, appends them to the journal with one write and one sync
//! (group commit: changes that arrive while a sync is in flight share the
//! next one), applies them to the *published* registry readers see, and only
//! then answers each caller. Readers never wait: they take the published
//! snapshot.
//!
//! Once the journal is as large as the snapshot (or `--journal-limit`), a
//! thread of its own writes a new snapshot from the published registry while
//! changes go on; the writer then cuts the journal to what came after. A clean
//! stop writes the snapshot and removes the journal.
//!
//! If the journal cannot be written, the changes of that write and every
//! change staged after them fail with `StoreFailed` (they were checked against
//! a state that will not be), the staged registry is reset to the published
//! one, and the journal is cut back to before the write. If even that fails,
//! the next write first rewrites the snapshot and starts a new journal, so
//! the daemon recovers without a restart once the disk does.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;

use tokio::sync::oneshot;

use super::error::{change_error, not_found, stopping, store_failed, Result};
use super::Service;
use crate::pause::{self, Point};
use crate::store::journal::{self, Journal};
use crate::store::{Change, Opened, Registry, Store, StoredDevice};

/// Changes waiting for the disk at most; more callers wait for a place.
const MAX_IN_FLIGHT: usize = 1024;
/// Changes written with one sync at most.
const MAX_BATCH: usize = 256;
/// The journal is compacted once it is this large, or as large as the
/// snapshot if that is larger: a rewrite then costs about as much as the
/// changes it absorbs, so a change costs the same at any registry size.
const MIN_COMPACTION: u64 = 1 << 20;

struct Staged {
    registry: Registry,
    /// The number the next change gets.
    next: u64,
    /// Set at a clean stop: nothing more is taken.
    closed: bool,
}

enum Msg {
    Change {
        seq: u64,
        // Boxed: a device with a lease makes this variant large.
        change: Box<Change>,
        done: oneshot::Sender<std::result::Result<(), String>>,
    },
    Compacted {
        seq: u64,
        /// The journal's length when the snapshot was taken.
        offset: u64,
        result: std::result::Result<u64, String>,
    },
    /// Write what is left, compact, and end; `None` when the service goes
    /// without a clean stop (the unit tests).
    Stop(Option<oneshot::Sender<()>>),
}

/// The registry's two copies and the way to the writer thread.
pub struct Commits {
    published: Arc<RwLock<Arc<Registry>>>,
    staged: Arc<Mutex<Staged>>,
    tx: mpsc::Sender<Msg>,
    permits: tokio::sync::Semaphore,
}

impl Drop for Commits {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop(None));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The published registry as it is now.
fn read(published: &RwLock<Arc<Registry>>) -> Arc<Registry> {
    published.read().unwrap_or_else(|p| p.into_inner()).clone()
}

impl Commits {
    /// Takes over what start-up read and starts the writer thread.
    /// `limit` overrides the journal's compaction size.
    pub fn start(store: Store, opened: Opened, limit: Option<u64>) -> std::io::Result<Commits> {
        let published = Arc::new(RwLock::new(Arc::new(opened.registry.clone())));
        let staged = Arc::new(Mutex::new(Staged {
            registry: opened.registry,
            next: opened.seq + 1,
            closed: false,
        }));
        let (tx, rx) = mpsc::channel();
        crate::telemetry::get().journal_len(opened.journal.len());
        let writer = Writer {
            store,
            journal: opened.journal,
            published: published.clone(),
            staged: staged.clone(),
            rx,
            tx: tx.clone(),
            durable: opened.seq,
            snapshot_seq: opened.snapshot_seq,
            snapshot_bytes: opened.snapshot_bytes,
            limit,
            compacting: None,
            retry_at: 0,
            needs_reset: false,
            stop: None,
        };
        std::thread::Builder::new()
            .name("hypemand-store".into())
            .spawn(move || writer.run())?;
        Ok(Commits {
            published,
            staged,
            tx,
            permits: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
        })
    }

    /// The registry readers see. Cheap: an `Arc` clone.
    pub fn snapshot(&self) -> Arc<Registry> {
        read(&self.published)
    }

    /// Decides a change from the staged registry with `f` (`None`: nothing
    /// to change), stages it, and waits until it is durable and published.
    pub async fn commit_with<T>(
        &self,
        f: impl FnOnce(&Registry) -> Result<(Option<Change>, T)>,
    ) -> Result<T> {
        let _place = self.permits.acquire().await.map_err(|_| stopping())?;
        let (done, out) = {
            let mut staged = lock(&self.staged);
            if staged.closed {
                return Err(stopping());
            }
            let (change, out) = f(&staged.registry)?;
            let Some(change) = change else {
                return Ok(out);
            };
            // Checked as it is applied: a change that breaks a rule changes nothing.
            staged
                .registry
                .apply(change.clone())
                .map_err(change_error)?;
            let seq = staged.next;
            let (done, rx) = oneshot::channel();
            let sent = self.tx.send(Msg::Change {
                seq,
                change: Box::new(change),
                done,
            });
            if sent.is_err() {
                return Err(store_failed("the store's writer has stopped"));
            }
            staged.next += 1;
            (rx, out)
        };
        match done.await {
            Ok(Ok(())) => Ok(out),
            Ok(Err(why)) => Err(store_failed(why)),
            Err(_) => Err(store_failed("the store's writer has stopped")),
        }
    }

    /// Takes nothing more, writes what is waiting, compacts the journal into
    /// the snapshot and waits for all of it.
    pub async fn close(&self) {
        let (done, rx) = oneshot::channel();
        {
            let mut staged = lock(&self.staged);
            staged.closed = true;
            let _ = self.tx.send(Msg::Stop(Some(done)));
        }
        let _ = rx.await;
    }
}

/// The store's writer thread: the only code that writes the journal and,
/// through the compaction thread it starts, the snapshot.
struct Writer {
    store: Store,
    journal: Journal,
    published: Arc<RwLock<Arc<Registry>>>,
    staged: Arc<Mutex<Staged>>,
    rx: mpsc::Receiver<Msg>,
    /// For the compaction thread's answer.
    tx: mpsc::Sender<Msg>,
    /// The last change on disk.
    durable: u64,
    /// The last change `devices.json` holds.
    snapshot_seq: u64,
    snapshot_bytes: u64,
    limit: Option<u64>,
    /// The compaction thread, while one runs.
    compacting: Option<JoinHandle<()>>,
    /// After a failed compaction: the journal length to try again at.
    retry_at: u64,
    /// The journal could not be cut back after a failed write: start anew.
    needs_reset: bool,
    /// Set once a stop is asked for, with whom to tell when it is done.
    stop: Option<Option<oneshot::Sender<()>>>,
}

struct Pending {
    seq: u64,
    change: Change,
    done: oneshot::Sender<std::result::Result<(), String>>,
}

impl Writer {
    fn run(mut self) {
        while self.stop.is_none() {
            let Ok(first) = self.rx.recv() else { break };
            let mut batch = Vec::new();
            self.take(first, &mut batch);
            while batch.len() < MAX_BATCH && self.stop.is_none() {
                match self.rx.try_recv() {
                    Ok(m) => self.take(m, &mut batch),
                    Err(_) => break,
                }
            }
            if !batch.is_empty() {
                self.write(batch);
            }
            self.maybe_compact();
        }
        self.finish();
        if let Some(Some(done)) = self.stop.take() {
            let _ = done.send(());
        }
    }

    fn take(&mut self, msg: Msg, batch: &mut Vec<Pending>) {
        match msg {
            Msg::Change { seq, change, done } => batch.push(Pending {
                seq,
                change: *change,
                done,
            }),
            Msg::Compacted {
                seq,
                offset,
                result,
            } => self.compacted(seq, offset, result),
            Msg::Stop(done) => self.stop = Some(done),
        }
    }

    /// Appends `batch` with one write and one sync, then publishes it and
    /// answers each caller.
    fn write(&mut self, batch: Vec<Pending>) {
        if self.needs_reset {
            if let Err(why) = self.reset() {
                return self.fail(batch, &why);
            }
        }
        let mut bytes = Vec::with_capacity(batch.len() * 512);
        for (i, p) in batch.iter().enumerate() {
            let end = i + 1 == batch.len();
            if let Err(e) = journal::encode(&mut bytes, p.seq, &p.change, end) {
                let why = format!("cannot encode change {}: {e}", p.seq);
                return self.fail(batch, &why);
            }
        }
        let (first, last) = (batch[0].seq, batch[batch.len() - 1].seq);
        let began = std::time::Instant::now();
        if let Err(f) = self.journal.append(&bytes) {
            let why = format!(
                "cannot write the journal {}: {}",
                self.journal.path().display(),
                f.error
            );
            tracing::error!(error = %why, changes = batch.len(), rolled_back = f.rolled_back, "journal write failed");
            self.needs_reset = !f.rolled_back;
            return self.fail(batch, &why);
        }
        crate::telemetry::get().commit(began.elapsed(), self.journal.len());
        pause::at(Point::JournalSynced);
        let mut answers = Vec::with_capacity(batch.len());
        {
            let mut guard = self.published.write().unwrap_or_else(|p| p.into_inner());
            let registry = Arc::make_mut(&mut guard);
            for p in batch {
                if let Err(e) = registry.apply(p.change) {
                    // Checked against the staged registry: unreachable.
                    tracing::error!(seq = p.seq, error = %e, "a journaled change does not apply");
                }
                answers.push(p.done);
            }
        }
        self.durable = last;
        tracing::trace!(first, last, bytes = bytes.len(), "journaled");
        for done in answers {
            let _ = done.send(Ok(()));
        }
    }

    fn snapshot(&self) -> Arc<Registry> {
        read(&self.published)
    }

    /// Fails `batch` and every change staged after it, and resets the staged
    /// registry to the published one.
    fn fail(&mut self, batch: Vec<Pending>, why: &str) {
        for p in batch {
            let _ = p.done.send(Err(why.to_string()));
        }
        let staged = self.staged.clone();
        let mut staged = lock(&staged);
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Msg::Change { done, .. } => {
                    let _ = done.send(Err(format!(
                        "an earlier change could not be written: {why}"
                    )));
                }
                other => self.take(other, &mut Vec::new()),
            }
        }
        staged.registry = (*self.snapshot()).clone();
        staged.next = self.durable + 1;
    }

    /// After a journal write that could not be cut back: a snapshot of what
    /// is durable, and a new, empty journal.
    fn reset(&mut self) -> std::result::Result<(), String> {
        if self.compacting.is_some() {
            return Err("the journal is being compacted after a failed write; try again".into());
        }
        let registry = self.snapshot();
        let bytes = self
            .store
            .save(&registry, self.durable)
            .map_err(|e| e.to_string())?;
        self.journal
            .drop_prefix(self.journal.len())
            .map_err(|e| format!("cannot start a new journal: {e}"))?;
        tracing::info!(
            seq = self.durable,
            "the registry was written afresh after a failed journal write"
        );
        self.snapshot_seq = self.durable;
        self.snapshot_bytes = bytes;
        self.needs_reset = false;
        Ok(())
    }

    fn threshold(&self) -> u64 {
        self.limit
            .unwrap_or_else(|| MIN_COMPACTION.max(self.snapshot_bytes))
    }

    /// Starts a compaction once the journal is large enough.
    fn maybe_compact(&mut self) {
        let len = self.journal.len();
        if self.compacting.is_some()
            || self.needs_reset
            || len == 0
            || len < self.threshold()
            || len < self.retry_at
        {
            return;
        }
        let registry = self.snapshot();
        let (store, tx, seq) = (self.store.clone(), self.tx.clone(), self.durable);
        let spawned = std::thread::Builder::new()
            .name("hypemand-compact".into())
            .spawn(move || {
                let result = store.save(&registry, seq);
                drop(registry);
                if result.is_ok() {
                    pause::at(Point::SnapshotRenamed);
                }
                let _ = tx.send(Msg::Compacted {
                    seq,
                    offset: len,
                    result: result.map_err(|e| e.to_string()),
                });
            });
        match spawned {
            Ok(handle) => self.compacting = Some(handle),
            Err(e) => {
                tracing::error!(error = %e, "cannot start compacting the journal");
                self.retry_at = len + self.threshold();
            }
        }
    }

    fn compacted(&mut self, seq: u64, offset: u64, result: std::result::Result<u64, String>) {
        if let Some(handle) = self.compacting.take() {
            let _ = handle.join();
        }
        match result {
            Ok(bytes) => {
                self.snapshot_seq = seq;
                self.snapshot_bytes = bytes;
                // The journal's first `offset` bytes are in the snapshot now.
                // If they cannot be cut, replay skips them: nothing is lost.
                if let Err(e) = self.journal.drop_prefix(offset) {
                    tracing::error!(error = %e, path = %self.journal.path().display(), "cannot cut the compacted journal");
                    self.retry_at = self.journal.len() + self.threshold();
                }
                crate::telemetry::get().journal_len(self.journal.len());
                tracing::debug!(
                    seq,
                    snapshot_bytes = bytes,
                    journal_bytes = self.journal.len(),
                    "journal compacted"
                );
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot compact the journal; it keeps growing until a later try succeeds");
                self.retry_at = self.journal.len() + self.threshold();
            }
        }
    }

    /// A clean stop: waits for a running compaction, then writes the
    /// snapshot and removes the journal, unless the snapshot holds it all.
    fn finish(&mut self) {
        if let Some(handle) = self.compacting.take() {
            // Its answer is sent before it ends.
            let _ = handle.join();
            while let Ok(msg) = self.rx.try_recv() {
                if let Msg::Compacted {
                    seq,
                    offset,
                    result,
                } = msg
                {
                    self.compacted(seq, offset, result);
                }
            }
        }
        if self.snapshot_seq == self.durable && self.journal.is_empty() && !self.needs_reset {
            return;
        }
        let registry = self.snapshot();
        match self.store.save(&registry, self.durable) {
            Ok(_) => {
                if let Err(e) = self.journal.remove() {
                    tracing::warn!(error = %e, path = %self.journal.path().display(), "cannot remove the journal after the final snapshot (it is skipped at the next start)");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot write the final snapshot; the journal is kept and replayed at the next start");
            }
        }
    }
}

impl Service {
    /// Checks `change`, waits until it is on disk, and publishes it.
    pub(crate) async fn commit(&self, change: Change) -> Result<()> {
        self.commits.commit_with(|_| Ok((Some(change), ()))).await?;
        self.forget_blockers();
        self.change_notify.notify_one();
        Ok(())
    }

    /// Changes one stored device durably, by id; `NotFound` if it is gone.
    /// Read, changed and staged under one lock, so no other change of the
    /// record comes in between.
    pub(crate) async fn modify(
        &self,
        id: &str,
        f: impl FnOnce(&mut StoredDevice),
    ) -> Result<StoredDevice> {
        let after = self
            .commits
            .commit_with(|registry| {
                let before = registry.by_id(id).cloned().ok_or_else(|| not_found(id))?;
                let mut after = (*before).clone();
                f(&mut after);
                // The id, name and address are keys: they never change this way.
                after.id.clone_from(&before.id);
                after.name.clone_from(&before.name);
                after.pci_address = before.pci_address;
                let change = (after != *before).then(|| Change::Replace(after.clone()));
                Ok((change, after))
            })
            .await?;
        self.forget_blockers();
        self.change_notify.notify_one();
        Ok(after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::registry::tests::sample;
    use std::time::Duration;

    fn commits(dir: &std::path::Path) -> Commits {
        Commits::start(Store::new(dir), Opened::empty(dir), None).unwrap()
    }

    async fn add(c: &Commits, addr: &str, name: &str) -> Result<()> {
        let d = sample(addr, name);
        c.commit_with(move |_| Ok((Some(Change::Add(d)), ()))).await
    }

    /// Bounded wait for a condition another thread makes true.
    fn wait_for(what: &str, f: impl Fn() -> bool) {
        for _ in 0..2000 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("{what} never happened");
    }

    /// Changes staged while a write is in flight share the next write and
    /// its sync: one `end` line for all of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn changes_that_wait_share_one_sync() {
        let dir = tempfile::tempdir().unwrap();
        let c = Arc::new(commits(dir.path()));
        let journal = dir.path().join(journal::JOURNAL_NAME);
        // A reader holding the published registry keeps the writer from
        // publishing its first write, so it cannot take the next one yet.
        let reader = c.published.read().unwrap();
        let first = tokio::spawn({
            let c = c.clone();
            async move { add(&c, "0000:01:00.0", "first").await }
        });
        wait_for("the first write", || {
            std::fs::metadata(&journal).is_ok_and(|m| m.len() > 0)
        });
        let mut rest = Vec::new();
        for i in 0..10 {
            let c = c.clone();
            rest.push(tokio::spawn(async move {
                add(&c, &format!("0000:02:00.{}", i % 8), &format!("n{i}")).await
            }));
        }
        // Two of the ten conflict (same address): refused at staging, never written.
        wait_for("ten changes staged", || lock(&c.staged).next == 10);
        drop(reader);
        first.await.unwrap().unwrap();
        let mut written = 0;
        for r in rest {
            match r.await.unwrap() {
                Ok(()) => written += 1,
                Err(hypeman_api::Error::AlreadyRegistered(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(written, 8);
        let text = std::fs::read_to_string(&journal).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 9, "{text}");
        let ends: Vec<usize> = lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.contains("\"end\":true"))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(
            ends,
            vec![0, 8],
            "one write for the first, one for the rest"
        );
        assert_eq!(c.snapshot().len(), 9);
    }

    /// A change is published once answered; a change refused at staging is
    /// never written; a clean stop leaves one snapshot and takes nothing more.
    #[tokio::test]
    async fn a_refused_change_is_never_written_and_a_stop_compacts() {
        let dir = tempfile::tempdir().unwrap();
        let c = commits(dir.path());
        add(&c, "0000:01:00.0", "dev-a").await.unwrap();
        assert_eq!(c.snapshot().len(), 1);
        let again = add(&c, "0000:01:00.0", "dev-b").await.unwrap_err();
        assert!(
            matches!(again, hypeman_api::Error::AlreadyRegistered(_)),
            "{again}"
        );
        let journal = std::fs::read_to_string(dir.path().join(journal::JOURNAL_NAME)).unwrap();
        assert_eq!(journal.lines().count(), 1, "{journal}");
        c.close().await;
        // A clean stop: one snapshot holding it all, no journal.
        assert!(!dir.path().join(journal::JOURNAL_NAME).exists());
        let opened = Store::new(dir.path()).open().unwrap();
        assert_eq!((opened.registry.len(), opened.seq), (1, 1));
        assert!(matches!(
            add(&c, "0000:02:00.0", "dev-c").await,
            Err(hypeman_api::Error::Failed(_))
        ));
    }
}
