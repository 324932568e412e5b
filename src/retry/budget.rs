//! The retry budget: retries as a share of recent requests, so that a failing service is not
//! hit by a retry storm (the idea of Finagle's and tower's retry budgets).

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The window is kept as this many slots; deposits and withdrawals expire slot by slot.
const SLOTS: usize = 10;
/// Token amounts are kept in thousandths so that a ratio like 0.2 stays exact.
const UNIT: i64 = 1000;

/// A retry setting that cannot be used; the message says what is wrong and what fits.
///
/// ```
/// let e = waypost::retry::RetryBudget::new(-1.0, 0).unwrap_err();
/// assert!(e.to_string().contains("ratio"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid retry setting: {message}")]
pub struct InvalidRetry {
    message: String,
}

/// Bounds retries to a share of recent requests plus a small floor.
///
/// Every call deposits `ratio` of a token; every retry withdraws a whole one, and succeeds only
/// if enough are left. Deposits and withdrawals count for a sliding window (default 10 s). A
/// reserve of `min_per_sec` × window tokens lets a client with little traffic retry at all.
/// With the default (ratio 0.2, 10 per second) retries add at most about 20 % to the load of a
/// service whose instances all fail, instead of multiplying it by the number of attempts.
///
/// Clones share one budget.
///
/// ```
/// use waypost::retry::RetryBudget;
/// let budget = RetryBudget::new(0.5, 0)?; // half a retry per request, no floor
/// assert!(!budget.try_withdraw()); // nothing deposited yet
/// budget.deposit();
/// budget.deposit();
/// assert!(budget.try_withdraw()); // two requests pay for one retry
/// assert!(!budget.try_withdraw());
/// # Ok::<(), waypost::retry::InvalidRetry>(())
/// ```
#[derive(Clone)]
pub struct RetryBudget {
    shared: Arc<Shared>,
}

struct Shared {
    deposit: i64,
    reserve: i64,
    slot: Duration,
    ratio: f64,
    min_per_sec: u32,
    window: Mutex<Window>,
}

struct Window {
    slots: [i64; SLOTS],
    current: usize,
    started: Option<Instant>,
}

impl Default for RetryBudget {
    /// 20 % of requests plus 10 retries per second, over a 10 s window.
    fn default() -> Self {
        Self::build(0.2, 10, Duration::from_secs(10))
    }
}

impl fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryBudget")
            .field("ratio", &self.shared.ratio)
            .field("min_per_sec", &self.shared.min_per_sec)
            .field("window", &(self.shared.slot * SLOTS as u32))
            .field("available", &self.available())
            .finish()
    }
}

impl RetryBudget {
    /// A budget allowing `ratio` retries per request (0 to 1000, e.g. 0.2) plus `min_per_sec`
    /// retries per second, over a 10 s window.
    pub fn new(ratio: f64, min_per_sec: u32) -> Result<Self, InvalidRetry> {
        Self::with_window(ratio, min_per_sec, Duration::from_secs(10))
    }

    /// As [`new`](Self::new) with a window of `window` (1 s to 1 h) instead of 10 s.
    pub fn with_window(
        ratio: f64,
        min_per_sec: u32,
        window: Duration,
    ) -> Result<Self, InvalidRetry> {
        if !(0.0..=1000.0).contains(&ratio) {
            return Err(InvalidRetry {
                message: format!(
                    "retry budget ratio {ratio} is outside 0..=1000 (0.2 means one retry per five requests)"
                ),
            });
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&window) {
            return Err(InvalidRetry {
                message: format!("retry budget window {window:?} is outside 1 s..=1 h"),
            });
        }
        Ok(Self::build(ratio, min_per_sec, window))
    }

    /// A budget that allows no retries at all.
    pub fn none() -> Self {
        Self::build(0.0, 0, Duration::from_secs(10))
    }

    fn build(ratio: f64, min_per_sec: u32, window: Duration) -> Self {
        let secs = i64::try_from(window.as_secs()).unwrap_or(i64::MAX);
        RetryBudget {
            shared: Arc::new(Shared {
                deposit: (ratio * UNIT as f64).round() as i64,
                reserve: i64::from(min_per_sec)
                    .saturating_mul(secs)
                    .saturating_mul(UNIT),
                slot: window / SLOTS as u32,
                ratio,
                min_per_sec,
                window: Mutex::new(Window {
                    slots: [0; SLOTS],
                    current: 0,
                    started: None,
                }),
            }),
        }
    }

    /// Records a request (the client does this once per call).
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// Takes one retry from the budget; `false` if it is spent.
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(Instant::now())
    }

    /// Retries the budget allows right now.
    pub fn available(&self) -> u64 {
        self.available_at(Instant::now())
    }

    pub(crate) fn deposit_at(&self, now: Instant) {
        let mut w = self.window(now);
        let cur = w.current;
        w.slots[cur] = w.slots[cur].saturating_add(self.shared.deposit);
    }

    pub(crate) fn try_withdraw_at(&self, now: Instant) -> bool {
        let mut w = self.window(now);
        if self.balance(&w) < UNIT {
            return false;
        }
        let cur = w.current;
        w.slots[cur] = w.slots[cur].saturating_sub(UNIT);
        true
    }

    pub(crate) fn available_at(&self, now: Instant) -> u64 {
        let w = self.window(now);
        u64::try_from(self.balance(&w) / UNIT).unwrap_or(0)
    }

    fn balance(&self, w: &Window) -> i64 {
        w.slots
            .iter()
            .fold(self.shared.reserve, |acc, s| acc.saturating_add(*s))
    }

    /// The window, with the slots that fell out of it since the last call cleared.
    fn window(&self, now: Instant) -> MutexGuard<'_, Window> {
        // Every update leaves the window consistent, so a poisoned lock is still usable.
        let mut w = self.shared.window.lock().unwrap_or_else(|p| p.into_inner());
        let slot = self.shared.slot;
        let started = *w.started.get_or_insert(now);
        let steps = now.saturating_duration_since(started).as_nanos() / slot.as_nanos().max(1);
        if steps > 0 {
            if steps >= SLOTS as u128 {
                w.slots = [0; SLOTS];
            } else {
                for _ in 0..steps {
                    w.current = (w.current + 1) % SLOTS;
                    let cur = w.current;
                    w.slots[cur] = 0;
                }
            }
            // `steps` fits: it is at most the elapsed time in slots, and slots are ≥ 100 ms.
            let advance = slot.saturating_mul(u32::try_from(steps).unwrap_or(u32::MAX));
            w.started = Some(started.checked_add(advance).unwrap_or(now));
        }
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_a_share_of_requests() {
        let b = RetryBudget::new(0.2, 0).unwrap();
        let t = Instant::now();
        for _ in 0..100 {
            b.deposit_at(t);
        }
        let mut granted = 0;
        while b.try_withdraw_at(t) {
            granted += 1;
        }
        assert_eq!(granted, 20);
    }

    #[test]
    fn the_floor_allows_retries_without_traffic() {
        let b = RetryBudget::new(0.2, 2).unwrap();
        let t = Instant::now();
        // 2 per second over a 10 s window: 20 in reserve.
        assert_eq!(b.available_at(t), 20);
        for _ in 0..20 {
            assert!(b.try_withdraw_at(t));
        }
        assert!(!b.try_withdraw_at(t));
    }

    #[test]
    fn deposits_and_withdrawals_expire_with_the_window() {
        let b = RetryBudget::new(1.0, 0).unwrap();
        let t = Instant::now();
        for _ in 0..5 {
            b.deposit_at(t);
        }
        assert_eq!(b.available_at(t), 5);
        // Half a window later the deposits still count...
        assert_eq!(b.available_at(t + Duration::from_secs(5)), 5);
        // ...a whole window later they are gone.
        assert_eq!(b.available_at(t + Duration::from_secs(11)), 0);

        // A spent floor comes back once the withdrawals leave the window.
        let b = RetryBudget::new(0.0, 1).unwrap();
        while b.try_withdraw_at(t) {}
        assert!(!b.try_withdraw_at(t + Duration::from_secs(1)));
        assert!(b.try_withdraw_at(t + Duration::from_secs(11)));
    }

    #[test]
    fn none_allows_nothing_and_bad_settings_are_rejected() {
        let b = RetryBudget::none();
        b.deposit();
        assert!(!b.try_withdraw());
        assert!(RetryBudget::new(-0.1, 0).is_err());
        assert!(RetryBudget::new(f64::NAN, 0).is_err());
        assert!(RetryBudget::with_window(0.2, 0, Duration::from_millis(10)).is_err());
    }

    #[test]
    fn clones_share_the_budget() {
        let a = RetryBudget::new(1.0, 0).unwrap();
        let b = a.clone();
        a.deposit();
        assert!(b.try_withdraw());
        assert!(!a.try_withdraw());
    }
}
