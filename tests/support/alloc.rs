//! A counting global allocator for the "no allocation per packet / per lookup" tests. Only
//! threads that opt in are counted ([`count_here`]), so the test harness and unrelated threads do
//! not disturb the count. A test binary installs it with
//! `#[global_allocator] static GLOBAL: support::alloc::Counting = support::alloc::Counting;`.
//!
//! The data plane's AES-GCM (aws-lc-rs) is C code that allocates past Rust's allocator. AWS-LC
//! calls `OPENSSL_memory_alloc` / `_free` / `_get_size` instead of `malloc` when the program
//! defines them (its `crypto/mem.c`), so every test binary with this module defines them here
//! and AWS-LC's allocations on an opted-in thread count too ([`aws_lc_allocations_in`] counts
//! them alone). They behave as AWS-LC's own: a size prefix, and the memory zeroed when freed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNT_HERE: Cell<bool> = const { Cell::new(false) };
    /// This thread's own count, so tests running in parallel on other threads never add to it.
    static HERE: Cell<u64> = const { Cell::new(0) };
    /// Of `HERE`, the allocations AWS-LC made.
    static HERE_C: Cell<u64> = const { Cell::new(0) };
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
    counted(&HERE, f)
}

/// Runs `f` with counting on for this thread; returns how many of its allocations AWS-LC made.
pub fn aws_lc_allocations_in(f: impl FnOnce()) -> u64 {
    counted(&HERE_C, f)
}

/// How far `f`, counted, moved this thread's `counter`.
fn counted(counter: &'static std::thread::LocalKey<Cell<u64>>, f: impl FnOnce()) -> u64 {
    let before = counter.with(Cell::get);
    count_here(true);
    f();
    count_here(false);
    counter.with(Cell::get) - before
}

/// AWS-LC's allocation prefix: the size, in a block aligned as `malloc`'s are.
const PREFIX: usize = 16;

fn c_layout(size: usize) -> Option<Layout> {
    Layout::from_size_align(size.checked_add(PREFIX)?, PREFIX).ok()
}

/// AWS-LC's `OPENSSL_malloc`, counted.
#[unsafe(no_mangle)]
pub extern "C" fn OPENSSL_memory_alloc(size: usize) -> *mut c_void {
    if COUNT_HERE.try_with(Cell::get).unwrap_or(false) {
        let _ = HERE_C.try_with(|n| n.set(n.get() + 1));
    }
    note();
    let Some(layout) = c_layout(size) else { return std::ptr::null_mut() };
    // SAFETY: a non-zero size (at least the prefix); the block is written only within it.
    unsafe {
        let base = System.alloc(layout);
        if base.is_null() {
            return std::ptr::null_mut();
        }
        base.cast::<usize>().write(size);
        base.add(PREFIX).cast()
    }
}

/// AWS-LC's `OPENSSL_free`: zeroes the block (as AWS-LC's own does: key schedules are freed here)
/// and frees it.
///
/// # Safety
/// `ptr` is null or came from [`OPENSSL_memory_alloc`] and is not used again.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn OPENSSL_memory_free(ptr: *mut c_void) {
    if ptr.is_null() {
        return;
    }
    // SAFETY: per the contract, `ptr` is `PREFIX` bytes into a block of `size + PREFIX` bytes
    // whose first word is `size`, allocated with `c_layout(size)`.
    unsafe {
        let base = ptr.cast::<u8>().sub(PREFIX);
        let size = base.cast::<usize>().read();
        let layout = c_layout(size).expect("allocated with this layout");
        for i in 0..layout.size() {
            std::ptr::write_volatile(base.add(i), 0);
        }
        System.dealloc(base, layout);
    }
}

/// The size AWS-LC asked for when it allocated `ptr` (it needs it for `OPENSSL_realloc`).
///
/// # Safety
/// `ptr` came from [`OPENSSL_memory_alloc`] and is not freed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn OPENSSL_memory_get_size(ptr: *mut c_void) -> usize {
    // SAFETY: per the contract, the size lies `PREFIX` bytes before `ptr`.
    unsafe { ptr.cast::<u8>().sub(PREFIX).cast::<usize>().read() }
}
