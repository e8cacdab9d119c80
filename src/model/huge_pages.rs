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
    // SAFETY: `spare` is borrowed mutably; MADV_HUGEPAGE changes how its pages are backed,
    // never their contents.
    unsafe {
        advise_whole_pages(
            spare.as_ptr(),
            std::mem::size_of_val(spare),
            libc::MADV_HUGEPAGE,
        )
    }
    #[cfg(not(target_os = "linux"))]
    let _ = spare;
}

/// Linux's `MADV_COLLAPSE` (6.1 on; older kernels refuse it with EINVAL, changing nothing).
#[cfg(target_os = "linux")]
const MADV_COLLAPSE: libc::c_int = 25;

/// Has the OS move the whole huge pages inside `data`, written already, onto huge pages now. A
/// hint, like [`advise`], which only reaches memory not yet touched: where the allocator hands
/// back memory it had freed, the parts still backed by 4 KiB pages stay so. The loader's
/// freed copies left 90 MB of SmolLM2's 538 MB of placed f32 weights on 4 KiB pages (smaps:
/// 373 against 465 MB of huge pages in the weights' mapping after collapsing), and the token
/// engine ran 50.2-51.4 tok/s without collapsing against 52.2-53.5 with it (2,000 tokens,
/// three alternating pairs on the 2-core Xeon, NLLs identical).
pub fn collapse<T>(data: &[T]) {
    #[cfg(target_os = "linux")]
    // SAFETY: `data` is borrowed; MADV_COLLAPSE copies its pages into huge pages, never
    // changing their contents.
    unsafe {
        advise_whole_pages(data.as_ptr(), std::mem::size_of_val(data), MADV_COLLAPSE)
    }
    #[cfg(not(target_os = "linux"))]
    let _ = data;
}

/// `madvise(advice)` over the whole huge pages of the `bytes` from `start`.
///
/// Safety: the bytes are one allocation of the caller's, and `advice` keeps their contents.
#[cfg(target_os = "linux")]
unsafe fn advise_whole_pages<T>(start: *const T, bytes: usize, advice: libc::c_int) {
    let start = start as usize;
    let (from, to) = (
        start.next_multiple_of(HUGE_PAGE),
        (start + bytes) / HUGE_PAGE * HUGE_PAGE,
    );
    if to > from {
        // SAFETY: the range lies inside the caller's allocation (see above).
        unsafe { libc::madvise(from as *mut libc::c_void, to - from, advice) };
    }
}

/// `n` copies of `value`, on huge pages where granted.
pub fn filled<T: Clone>(n: usize, value: T) -> Vec<T> {
    let mut v = Vec::with_capacity(n);
    advise(v.spare_capacity_mut());
    v.resize(n, value);
    collapse(&v);
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
