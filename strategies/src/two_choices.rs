//! The part P2C strategies share: two distinct candidates drawn in proportion to weight.

use std::sync::Arc;

use waypost_core::{Endpoint, EndpointState};

use crate::rng::{Alias, Rng};

/// One candidate of a draw: its index, its state and its weight.
pub(crate) type Candidate<'a> = (usize, &'a EndpointState, u32);

/// The prepared draw of a P2C picker, built once per instance set.
#[derive(Debug)]
pub(crate) struct TwoChoices {
    rng: Arc<Rng>,
    alias: Alias,
    /// Each endpoint's state and weight side by side: one pointer to follow per candidate
    /// instead of two through the endpoint.
    members: Box<[(Arc<EndpointState>, u32)]>,
}

impl TwoChoices {
    pub(crate) fn new(rng: Arc<Rng>, endpoints: &[Endpoint]) -> Self {
        TwoChoices {
            rng,
            alias: Alias::new(endpoints.iter().map(Endpoint::weight)),
            members: endpoints
                .iter()
                .map(|e| (e.shared_state().clone(), e.weight()))
                .collect(),
        }
    }

    /// Two distinct candidates, or `Err` with the whole answer when there is nothing to choose
    /// between: empty, one instance, or (against the Picker contract) another slice — then the
    /// answer stays in range.
    #[inline]
    pub(crate) fn draw(
        &self,
        endpoints: &[Endpoint],
    ) -> Result<(Candidate<'_>, Candidate<'_>), Option<usize>> {
        let n = self.members.len();
        if n <= 1 || endpoints.len() != n {
            return Err((!endpoints.is_empty()).then_some(0));
        }
        let (a, b) = self.alias.draw_two(&self.rng, n);
        let ((sa, wa), (sb, wb)) = (&self.members[a], &self.members[b]);
        Ok(((a, sa, *wa), (b, sb, *wb)))
    }
}
