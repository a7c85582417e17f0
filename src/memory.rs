//! Giving freed heap back to the system. glibc keeps freed pages in its
//! arenas; a daemon that idles for months should not sit on the peak of its
//! busiest minute (a List of thousands of devices, a burst of changes).

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
