//! The allocator every long-running imagemesh service runs on: jemalloc, tuned to give freed
//! memory back to the kernel within about a second, with glibc's malloc one environment
//! variable away (`IMAGEMESH_MALLOC=system`) for comparison and for tools that expect it.
//!
//! Why not glibc's malloc: a service that handles many short requests on a multi-threaded
//! tokio runtime spreads its allocations over up to 8 × cores glibc arenas, and glibc returns
//! a freed arena's pages only from the top of its heap. A mounter that had run 600 mounts and
//! held none kept hundreds of MB (`docs/footprint.md`). jemalloc returns dirty pages after
//! `dirty_decay_ms` and purged ones after `muzzy_decay_ms`; its background thread does it even
//! while the process is idle.
//!
//! Each service's `main.rs` has one line, `imagemesh_alloc::global_allocator!();`.
//!
//! The choice is made once, at the first allocation, from the process environment (read with
//! `getenv`, which does not allocate), and never changes: every block is freed by the
//! allocator that gave it out.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU8, Ordering};

use tikv_jemallocator::Jemalloc;

/// jemalloc's options (`malloc_conf`), chosen by soak runs (`docs/footprint.md`):
///
/// - `background_thread:true`: a thread purges unused pages even while the process is idle;
/// - `narenas:1`: one arena instead of 4 × cores. The services run two tokio workers and a few
///   blocking threads; more arenas only spread their small allocations over more slabs that
///   stay partly used (and bring a background thread each);
/// - `tcache:false`: no per-thread caches, which keep freed blocks (and the slabs under them)
///   in threads that have gone idle;
/// - `dirty_decay_ms:1000,muzzy_decay_ms:0`: freed pages go back within about a second, with
///   `MADV_DONTNEED` rather than `MADV_FREE`, so RSS drops when they do;
/// - `oversize_threshold:1048576`: blocks of 1 MiB and more come from the arena that purges on
///   free. The mounter's compressed spans are just over 1 MiB (1 MiB of output and the deflate
///   framing) and sit in jemalloc's 1.25 MiB size class; carved out of reused dirty pages, each
///   can keep up to 256 KiB resident beyond what its cache counts, while a fresh block holds
///   only the pages written. The price is a page fault per page of every such block (the
///   soak's cycles ran about 5 % slower).
///
/// The `_RJEM_MALLOC_CONF` environment variable overrides them. tikv-jemalloc-sys builds
/// jemalloc with the `_rjem_` prefix, so the symbol jemalloc reads its compiled-in options from
/// is `_rjem_malloc_conf` (a `const char *`: a thin pointer to a NUL-terminated string).
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: &u8 = &b"background_thread:true,narenas:1,tcache:false,\
dirty_decay_ms:1000,muzzy_decay_ms:0,oversize_threshold:1048576\0"[0];

/// The environment variable that picks glibc's malloc instead (`system`).
pub const SWITCH: &str = "IMAGEMESH_MALLOC";

const UNDECIDED: u8 = 0;
const JEMALLOC: u8 = 1;
const SYSTEM: u8 = 2;

/// jemalloc, or the system allocator when `IMAGEMESH_MALLOC=system`.
pub struct ServiceAllocator {
    choice: AtomicU8,
}

impl ServiceAllocator {
    pub const fn new() -> Self {
        Self {
            choice: AtomicU8::new(UNDECIDED),
        }
    }

    /// Which allocator this process uses: "jemalloc" or "system".
    pub fn name(&self) -> &'static str {
        match self.choose() {
            SYSTEM => "system",
            _ => "jemalloc",
        }
    }

    #[inline]
    fn choose(&self) -> u8 {
        let choice = self.choice.load(Ordering::Relaxed);
        if choice != UNDECIDED {
            return choice;
        }
        // Racing first allocations (there are none before main's first thread, but it costs
        // nothing to allow them) compute the same answer.
        // SAFETY: getenv reads the environment without allocating; the name is NUL-terminated.
        // Nothing in these processes writes the environment while threads run.
        let value = unsafe { libc::getenv(c"IMAGEMESH_MALLOC".as_ptr()) };
        let system = !value.is_null()
            // SAFETY: getenv returned a NUL-terminated string that lives as long as the process
            // environment.
            && unsafe { std::ffi::CStr::from_ptr(value) }.to_bytes() == b"system";
        let choice = if system { SYSTEM } else { JEMALLOC };
        self.choice.store(choice, Ordering::Relaxed);
        choice
    }
}

impl Default for ServiceAllocator {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: every call forwards to one of two allocators that uphold GlobalAlloc's contract, and
// it is always the same one for the life of the process (the choice never changes once made),
// so a block is freed or reallocated by the allocator that gave it out.
unsafe impl GlobalAlloc for ServiceAllocator {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe {
            match self.choose() {
                SYSTEM => System.alloc(layout),
                _ => Jemalloc.alloc(layout),
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        unsafe {
            match self.choose() {
                SYSTEM => System.alloc_zeroed(layout),
                _ => Jemalloc.alloc_zeroed(layout),
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above; `ptr` came from the same allocator.
        unsafe {
            match self.choose() {
                SYSTEM => System.dealloc(ptr, layout),
                _ => Jemalloc.dealloc(ptr, layout),
            }
        }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        unsafe {
            match self.choose() {
                SYSTEM => System.realloc(ptr, layout, new_size),
                _ => Jemalloc.realloc(ptr, layout, new_size),
            }
        }
    }
}

/// Makes [`ServiceAllocator`] the process's global allocator; one line in each service's
/// `main.rs`.
#[macro_export]
macro_rules! global_allocator {
    () => {
        #[global_allocator]
        static GLOBAL: $crate::ServiceAllocator = $crate::ServiceAllocator::new();

        /// Which allocator this process runs on ("jemalloc" or "system").
        #[allow(dead_code)]
        fn allocator_name() -> &'static str {
            GLOBAL.name()
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_options_string_is_nul_terminated() {
        // SAFETY: MALLOC_CONF points into a static byte string.
        let conf = unsafe { std::ffi::CStr::from_ptr((MALLOC_CONF as *const u8).cast()) };
        assert_eq!(
            conf.to_str().unwrap(),
            "background_thread:true,narenas:1,tcache:false,\
             dirty_decay_ms:1000,muzzy_decay_ms:0,oversize_threshold:1048576"
        );
    }

    #[test]
    fn blocks_round_trip_through_the_chosen_allocator() {
        let allocator = ServiceAllocator::new();
        let layout = Layout::from_size_align(4096, 64).unwrap();
        // SAFETY: a non-zero layout; the block is freed by the same allocator.
        unsafe {
            let block = allocator.alloc_zeroed(layout);
            assert!(!block.is_null());
            assert_eq!(*block.add(100), 0);
            let bigger = allocator.realloc(block, layout, 8192);
            assert!(!bigger.is_null());
            allocator.dealloc(bigger, Layout::from_size_align(8192, 64).unwrap());
        }
        assert_eq!(allocator.name(), "jemalloc");
    }
}
