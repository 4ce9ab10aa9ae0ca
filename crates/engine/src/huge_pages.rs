//! Transparent huge pages for the engine's large CPU buffers (the KV pool, repacked weights).
//!
//! Exists because both are read in long streams, gigabytes per decode step: with 4 KiB pages
//! every page is a TLB miss and the hardware prefetchers stop at each page's end. Linux's
//! usual setting (`madvise`) backs a region with 2 MiB pages only when asked.

/// Asks Linux to back `v`'s buffer with transparent huge pages where the system allows it on
/// request, and returns `v`. Call it before the buffer is first written: memory is still taken
/// only as it is written (2 MiB at a time), and pages already touched stay small. Elsewhere,
/// for buffers under 4 MiB, or when refused, nothing changes.
pub(crate) fn huge_pages<T>(v: Vec<T>) -> Vec<T> {
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let bytes = std::mem::size_of_val(v.as_slice());
        let start = v.as_ptr() as usize;
        let first = start.next_multiple_of(PAGE);
        let end = (start + bytes) / PAGE * PAGE;
        if bytes >= 4 << 20 && end > first {
            // SAFETY: the range lies inside the vector's allocation; the advice changes how it
            // is backed, not its contents.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
        }
    }
    v
}
