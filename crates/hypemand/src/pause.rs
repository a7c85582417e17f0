//! A test seam: with `--simulate`, `HYPEMAN_PAUSE_AT=<point>` makes the daemon
//! stop itself (SIGSTOP) at that moment of a store write, so a test can kill it
//! exactly there (the crash test's moments between the journal's sync and the
//! reply, and inside a compaction) instead of hoping a timed kill lands there.
//! Never read on a real host: only a simulated one is a test.

use std::sync::OnceLock;

/// The moments a test can stop the daemon at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// Changes are in the journal and synced, not yet visible or answered.
    JournalSynced,
    /// A new snapshot is written and synced as a temp file, not yet renamed.
    SnapshotWritten,
    /// The new snapshot is in place; the journal is not yet cut.
    SnapshotRenamed,
    /// *(issue 26)* A vGPU is claimed in the journal, nothing written to
    /// the host yet.
    VgpuClaimed,
    /// *(issue 26)* The vGPU is written to the host, not yet marked ready.
    VgpuWritten,
    /// *(issue 27)* A lease's holder has ended; its release is not yet
    /// written.
    HolderEnded,
}

const POINTS: [(&str, Point); 6] = [
    ("journal-synced", Point::JournalSynced),
    ("snapshot-written", Point::SnapshotWritten),
    ("snapshot-renamed", Point::SnapshotRenamed),
    ("vgpu-claimed", Point::VgpuClaimed),
    ("vgpu-written", Point::VgpuWritten),
    ("holder-ended", Point::HolderEnded),
];

impl Point {
    fn parse(s: &str) -> Option<Point> {
        POINTS.iter().find(|(n, _)| *n == s).map(|(_, p)| *p)
    }

    fn name(self) -> &'static str {
        POINTS
            .iter()
            .find(|(_, p)| *p == self)
            .map_or("", |(n, _)| n)
    }
}

static AT: OnceLock<Option<Point>> = OnceLock::new();

/// Reads `HYPEMAN_PAUSE_AT`, only when the host is simulated.
pub fn configure(simulated: bool) {
    let point = match std::env::var("HYPEMAN_PAUSE_AT") {
        Ok(v) if simulated => {
            let p = Point::parse(&v);
            if p.is_none() {
                tracing::warn!(value = %v, "HYPEMAN_PAUSE_AT names no pause point; ignored");
            }
            p
        }
        _ => None,
    };
    let _ = AT.set(point);
}

/// Stops the process here if a test asked for this point.
pub fn at(point: Point) {
    if AT.get().copied().flatten() == Some(point) {
        tracing::warn!(point = point.name(), "pausing (HYPEMAN_PAUSE_AT)");
        // SAFETY: raise only sends a signal to this process.
        unsafe {
            libc::raise(libc::SIGSTOP);
        }
    }
}
