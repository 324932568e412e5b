//! The part P2C strategies share: two distinct candidates drawn in proportion to weight.

use std::sync::Arc;

use waypost_core::{Endpoint, EndpointState};

use crate::rng::{by_weight, Alias, Rng, RETRY_DRAWS};

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
        Ok((self.candidate(a), self.candidate(b)))
    }

    /// As [`draw`](Self::draw), both candidates among those not `excluded`, each in proportion
    /// to weight among them: drawn until one is not excluded (a few draws), then chosen from
    /// the weights left. `Err` with the whole answer when fewer than two are left.
    pub(crate) fn draw_excluding(
        &self,
        endpoints: &[Endpoint],
        excluded: &dyn Fn(usize) -> bool,
    ) -> Result<(Candidate<'_>, Candidate<'_>), Option<usize>> {
        let n = self.members.len();
        if endpoints.len() != n {
            return Err((0..endpoints.len()).find(|&i| !excluded(i)));
        }
        let one = |skip: &dyn Fn(usize) -> bool| {
            (0..RETRY_DRAWS)
                .map(|_| self.alias.draw(&self.rng, n))
                .find(|&i| !skip(i))
                .or_else(|| {
                    let weight = |i: usize| u64::from(self.members[i].1);
                    by_weight(n, weight, skip, |total| self.rng.below_u64(total))
                })
        };
        let a = one(excluded).ok_or(None)?;
        let b = one(&|i| i == a || excluded(i)).ok_or(Some(a))?;
        Ok((self.candidate(a), self.candidate(b)))
    }

    #[inline]
    fn candidate(&self, i: usize) -> Candidate<'_> {
        let (state, weight) = &self.members[i];
        (i, state, *weight)
    }
}
