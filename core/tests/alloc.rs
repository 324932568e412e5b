//! The pick path allocates nothing: counted with a global allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use waypost_core::{
    Balancer, Endpoint, PickContext, Picker, ServiceInstance, Strategy, WatchEvent,
};

struct Counting;
thread_local! { static ALLOCS: Cell<usize> = const { Cell::new(0) }; }
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}
#[global_allocator]
static GLOBAL: Counting = Counting;

struct Rotate(Arc<AtomicUsize>);
struct RotatePicker(Arc<AtomicUsize>);
impl Strategy for Rotate {
    fn name(&self) -> &str {
        "rotate"
    }
    fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> {
        Box::new(RotatePicker(self.0.clone()))
    }
}
impl Picker for RotatePicker {
    fn pick(&self, eps: &[Endpoint], _: &PickContext<'_>) -> Option<usize> {
        (!eps.is_empty()).then(|| self.0.fetch_add(1, Ordering::Relaxed) % eps.len())
    }
}

#[test]
fn balancer_pick_and_guard_do_not_allocate() {
    let b = Balancer::new(Rotate(Arc::default()));
    let set = (0..100)
        .map(|i| {
            ServiceInstance::builder("s", format!("i{i}"))
                .host("h")
                .port(1)
                .build()
                .unwrap()
        })
        .collect();
    b.apply(WatchEvent::Snapshot(set));
    let ctx = PickContext::new().with_key(b"user-1");
    // Warm up thread-locals (arc-swap's debt list) outside the count.
    b.pick_with(&ctx).unwrap().success();
    let before = ALLOCS.with(Cell::get);
    for _ in 0..10_000 {
        let g = b.pick_with(&ctx).unwrap();
        g.success();
        drop(b.pick().unwrap());
    }
    assert_eq!(
        ALLOCS.with(Cell::get) - before,
        0,
        "allocations on the pick path"
    );
}
