//! Process-wide memory settings.

/// Turns transparent huge pages off for this process (Linux; elsewhere a no-op).
///
/// The engine allocates and frees tens of megabytes every epoch (state deltas, Arrow IPC and
/// Parquet buffers, gathered batches). With huge pages, the allocator (mimalloc) hands such
/// memory back to the kernel in pieces of huge pages, and the next touch of one makes the
/// kernel zero a whole 2 MiB page: on the OVER benchmark (1,000,000 keys, 200,000-row
/// epochs) a fifth of all CPU time was the kernel clearing pages, and the engine ran about
/// 15 % slower (medians of 3 side by side), more on some runs. Databases that churn memory
/// the same way (Redis, MongoDB) advise the same. The setting only affects this process.
pub fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_THP_DISABLE) takes plain integers and changes only a flag of this
    // process's memory map; it touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Cache lines [`prefetch`] asks for at most: a value's head is what the next step reads.
const PREFETCH_LINES: usize = 4;

/// Asks the CPU to bring the first few cache lines of `value` into cache, without waiting
/// for them (x86-64; elsewhere nothing). Code that works through values in an order of its
/// own (a million state entries, each a cache miss) asks a few values ahead: misses asked
/// for together overlap instead of queueing one behind the other.
#[inline]
pub fn prefetch<T: ?Sized>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let start = (value as *const T).cast::<i8>();
        let len = std::mem::size_of_val(value).min(PREFETCH_LINES * 64);
        for offset in (0..len).step_by(64) {
            // SAFETY: a prefetch reads nothing into the program and cannot fault; the address
            // lies within `value`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}
