//! Large read-mostly buffers (the weights a one-token step streams, the bench's probe) on
//! 2 MiB pages where the OS grants them. A token streams every weight once through 4 KiB
//! pages: a TLB miss at each page and a hardware prefetcher that stops at each boundary. On the
//! 2-core Xeon here, two threads' dot products over SmolLM2's weights read 20.5 GB/s on 4 KiB
//! pages and 25.4 GB/s on huge pages (both with the kernel's software prefetch).
//!
//! Linux backs anonymous memory with huge pages only where asked (`transparent_hugepage` set
//! to `madvise`, as here) or everywhere (`always`); other systems get ordinary pages.

use std::mem::MaybeUninit;

/// The size of a transparent huge page on x86-64 and most of aarch64.
const HUGE_PAGE: usize = 2 << 20;

/// Asks the OS to back the whole huge pages inside `spare` (memory not yet written, such as
/// a new `Vec`'s spare capacity) with huge pages when it is first touched. A hint: refused or
/// elsewhere than Linux, nothing changes.
pub fn advise<T>(spare: &mut [MaybeUninit<T>]) {
    #[cfg(target_os = "linux")]
    {
        let start = spare.as_mut_ptr() as usize;
        let end = start + std::mem::size_of_val(spare);
        let (from, to) = (
            start.next_multiple_of(HUGE_PAGE),
            end / HUGE_PAGE * HUGE_PAGE,
        );
        if to > from {
            // SAFETY: the range lies inside `spare`, which we borrow mutably; MADV_HUGEPAGE
            // changes how its pages are backed, never their contents.
            unsafe { libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = spare;
}

/// `n` copies of `value`, on huge pages where granted.
pub fn filled<T: Clone>(n: usize, value: T) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    advise(v.spare_capacity_mut());
    v.resize(n, value);
    v
}

/// Gives the memory of freed allocations back to the OS now, rather than when the allocator
/// would (mimalloc purges freed memory some 100 ms later, and only when it is next called).
/// Placing the weights frees their first copies group by group: without this, a SmolLM2 load
/// peaked at about 1,050 MB instead of 900 (sampled), and a run's VmHWM, reset at its start,
/// counted some 150 MB the loader had freed.
pub fn return_freed_memory() {
    // SAFETY: collecting only releases free memory of the allocator's own heaps.
    unsafe { libmimalloc_sys::mi_collect(true) }
}
