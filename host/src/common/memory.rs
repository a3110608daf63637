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
