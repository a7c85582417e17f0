//! Giving freed heap back to the system. glibc keeps freed pages in its
//! arenas; a daemon that idles for months should not sit on the peak of its
//! busiest minute (a List of thousands of devices, a burst of changes).

/// Large buffers (a List reply of thousands of records, the serialised store)
/// are mapped and unmapped on their own instead of coming from the heap.
/// glibc otherwise raises its mmap threshold after the first such buffer is
/// freed (up to 32 MiB), and from then on every large reply is carved from the
/// heap, where small long-lived allocations made meanwhile pin its pages:
/// measured with `hypeman-bench` at 4096 devices, idle RSS 28-37 MiB with the
/// moving threshold, 22 MiB with a fixed one. Call before any thread starts.
pub fn tune_allocator() {
    // SAFETY: mallopt only sets glibc's allocator parameters.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Trims the heap shortly after a large reply or a change (buffers are freed
/// only once a reply is on the wire). At most one trim is pending at a time.
pub fn trim_soon() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static PENDING: AtomicBool = AtomicBool::new(false);
    if PENDING.swap(true, Ordering::SeqCst) {
        return;
    }
    tokio::spawn(async {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        PENDING.store(false, Ordering::SeqCst);
        release_free_memory();
    });
}

/// Hands memory freed after start-up (the fixture or sysfs walk, the first
/// exports) back to the system: glibc keeps freed heap pages otherwise, and a
/// daemon that idles for months should not sit on its start-up peak.
pub fn release_free_memory() {
    // SAFETY: malloc_trim only walks glibc's own heap and takes its locks.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}
