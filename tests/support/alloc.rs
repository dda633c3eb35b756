//! A counting global allocator for the "no allocation per packet / per lookup" tests. Only
//! threads that opt in are counted ([`count_here`]), so the test harness and unrelated threads do
//! not disturb the count. A test binary installs it with
//! `#[global_allocator] static GLOBAL: support::alloc::Counting = support::alloc::Counting;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNT_HERE: Cell<bool> = const { Cell::new(false) };
    /// This thread's own count, so tests running in parallel on other threads never add to it.
    static HERE: Cell<u64> = const { Cell::new(0) };
}

fn note() {
    // `try_with`: the allocator also runs while thread-locals are torn down; a const-initialised
    // thread-local without a destructor never allocates itself, so there is no recursion.
    if COUNT_HERE.try_with(Cell::get).unwrap_or(false) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        let _ = HERE.try_with(|n| n.set(n.get() + 1));
    }
}

// SAFETY: every method forwards to `System` unchanged; counting has no effect on the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note();
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note();
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Switches counting on or off for the calling thread.
pub fn count_here(on: bool) {
    COUNT_HERE.with(|c| c.set(on));
}

/// Allocations counted so far, on every opted-in thread (for loops running on threads of their
/// own; tests that count on their own thread use [`allocations_in`]).
pub fn allocations() -> u64 {
    ALLOCATIONS.load(Ordering::Relaxed)
}

/// Runs `f` with counting on for this thread; returns how many allocations this thread made.
pub fn allocations_in(f: impl FnOnce()) -> u64 {
    let before = HERE.with(Cell::get);
    count_here(true);
    f();
    count_here(false);
    HERE.with(Cell::get) - before
}
