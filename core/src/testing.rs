//! Aids for tests of code built on Waypost (feature `test-util`); not for production use.

use crate::{Endpoint, PickContext, Picker, Strategy};

/// A strategy that always picks the first endpoint (the lowest id: a balancer passes them in
/// id order), for tests whose subject is not the balancing itself.
///
/// ```
/// use waypost_core::testing::First;
/// use waypost_core::{Balancer, ServiceInstance, WatchEvent};
///
/// let inst = |id: &str| ServiceInstance::builder("users", id).host("h").port(1).build();
/// let balancer = Balancer::new(First);
/// balancer.apply(WatchEvent::Snapshot(vec![inst("b")?, inst("a")?]));
/// assert_eq!(balancer.pick()?.instance().id().as_str(), "a");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug, Default)]
pub struct First;

impl Strategy for First {
    fn name(&self) -> &str {
        "first"
    }

    fn build(&self, _: &[Endpoint]) -> Box<dyn Picker> {
        Box::new(FirstPicker)
    }
}

struct FirstPicker;

impl Picker for FirstPicker {
    fn pick(&self, endpoints: &[Endpoint], _: &PickContext<'_>) -> Option<usize> {
        (!endpoints.is_empty()).then_some(0)
    }
}
