//! How the C allocator keeps the memory a forward pass frees: glibc's `malloc`, which Rust's
//! default allocator calls on Linux.
//!
//! Exists because every forward pass allocates and frees tensors of megabytes (the output of
//! one `gate_up` product for a 512-token chunk is 32 MiB), and glibc by default serves large
//! blocks with `mmap` and gives them back with `munmap`, and returns the free top of its heaps
//! to the kernel: the next pass then faults the same memory in again, the kernel zeroing every
//! page. On a 512-token prompt of the Phi-3-mini-shaped Q4_K_M bench model (2 threads) page
//! faults took about a fifth of the profile, and the prompt ran at 60-62 tokens/s with
//! glibc's defaults against 86-90 with the settings below (`phi-serve generate`, alternating
//! runs, with `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184` in the environment),
//! for 2% more peak memory.

/// Makes freed memory stay with the process for reuse: no `mmap` for large blocks (they come
/// from the heap and return to it) and no trimming of the heap's top below 2 GiB. Call first
/// thing in `main`. Does nothing on other C libraries.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation policy; blocks already handed out stay
    // valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// Gives the kernel back what loading freed (file buffers, unpacked blocks) now that the
/// weights are in place: the free memory the KV pool is sized from (`serve`) counts it again.
pub fn release_unused() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim returns free pages of glibc's heaps to the kernel; no live block moves.
    unsafe {
        libc::malloc_trim(0);
    }
}
