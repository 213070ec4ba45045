//! Process-wide settings that must be made before any thread starts.

/// Fixes `RAYON_NUM_THREADS` (when unset) to the available parallelism, and shortens candle's
/// worker spin (`CANDLE_BARRIER_POOL_SPIN_LIMIT`, when unset).
///
/// candle asks for its thread count on every matmul, and on Linux machines without a CPU mask it
/// answers by parsing `/proc/cpuinfo` each time unless this variable is set; that costs more than
/// the matmuls of a small model. Its element-wise pool then spins 25,000 times after each op,
/// taking a core from the expert kernels that run next on rayon.
///
/// # Safety
/// Must be called before any other thread exists (first thing in `main`), because it writes the
/// process environment.
pub unsafe fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map_or(1, |n| n.get());
        // SAFETY: the caller guarantees that no other thread runs yet.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // SAFETY: as above.
        unsafe { std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "200") };
    }
    keep_freed_memory();
}

/// glibc serves allocations above its (dynamic) mmap threshold with fresh mappings and returns
/// them on free, so every intermediate tensor of a forward pass faults in pages the kernel must zero
/// again (a sixth of a small model's run time). Keeping freed memory in the heap avoids that.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only adjusts allocator parameters; 1 GiB thresholds are valid values.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

static STOP_REQUESTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static STOPPABLE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Ctrl-C's flag for long runs that stop between steps and write what they have done.
pub fn stop_flag() -> &'static std::sync::atomic::AtomicBool {
    &STOP_REQUESTED
}

/// While the guard lives, the first Ctrl-C only raises [`stop_flag`] (see [`request_stop`]).
pub struct StoppableRun(());

impl StoppableRun {
    pub fn begin() -> Self {
        STOPPABLE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        StoppableRun(())
    }
}

impl Drop for StoppableRun {
    fn drop(&mut self) {
        STOPPABLE.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The Ctrl-C handler's question: `true` when a stoppable run is in progress and this is the first
/// request (it raises [`stop_flag`] and the run winds down); `false` means exit now.
pub fn request_stop() -> bool {
    use std::sync::atomic::Ordering;
    STOPPABLE.load(Ordering::SeqCst) > 0 && !STOP_REQUESTED.swap(true, Ordering::SeqCst)
}
