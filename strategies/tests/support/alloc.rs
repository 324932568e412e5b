//! What the allocation tests share: a global allocator that counts each thread's allocations
//! (per thread, so that tests running in parallel do not disturb each other's counts), the
//! instance sets and the request contexts.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use waypost_core::{PickContext, ServiceInstance};

/// The set sizes every test runs at.
pub const SIZES: [usize; 2] = [10, 10_000];

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // `try_with`: the allocator also runs while thread-locals are being torn down.
        let _ = ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

pub fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

/// How many calls [`count`] makes.
pub const PICKS: u64 = 20_000;

/// Allocations made by `PICKS` calls of `f`, after a warm-up call (thread-local RNG state,
/// arc-swap's per-thread slots).
pub fn count(mut f: impl FnMut(u64)) -> u64 {
    f(0);
    let before = allocations();
    for i in 1..=PICKS {
        f(i);
    }
    allocations() - before
}

pub fn instances(n: usize) -> Vec<ServiceInstance> {
    (0..n)
        .map(|i| {
            ServiceInstance::builder("users", format!("users-{i:05}"))
                .host("10.0.0.1")
                .port(8080)
                .weight(1 + (i % 10) as u32)
                .build()
                .unwrap()
        })
        .collect()
}

/// Request `i`'s context: every other one has a hash key, so hashing strategies run both their
/// keyed path and their documented no-key fallback, and the others see keys they ignore.
pub fn context(i: u64) -> PickContext<'static> {
    if i % 2 == 0 {
        PickContext::new().with_hash(i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    } else {
        PickContext::new()
    }
}
