//! Faults a demo origin can be given (`demo-backend --stall-ms --stall-every-ms --error-rate
//! --reset-rate`), so the balance benchmark has real backends that stall, fail and reset: a stall
//! window that recurs on a fixed period, and shares of requests answered 503 or reset, chosen by a
//! seeded hash of each request's number (the same requests on every run, spread with no pattern a
//! balancer's rotation could line up with).

use std::time::Duration;

/// A window at the end of every period during which no answer goes out (a GC pause, a full
/// disk flush): an answer due in it waits until it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stall {
    /// How long each stall lasts.
    pub length: Duration,
    /// Time from the start of one stall to the start of the next.
    pub every: Duration,
}

impl Stall {
    /// How long an answer due `elapsed` after the origin started must wait: until the end of the
    /// stall it falls in, zero outside one. The first period starts clean.
    pub fn wait(&self, elapsed: Duration) -> Duration {
        let every = self.every.as_nanos().max(1);
        let into = elapsed.as_nanos() % every;
        let clean = every.saturating_sub(self.length.as_nanos());
        if into < clean { Duration::ZERO } else { Duration::from_nanos((every - into) as u64) }
    }
}

/// What becomes of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Answered normally (after the delay and any stall).
    Answer,
    /// Answered 503 at once.
    Unavailable,
    /// The connection is reset (SO_LINGER 0, then closed) before any response byte.
    Reset,
}

/// The faults of one origin; the default has none.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    pub stall: Option<Stall>,
    /// Share of requests answered 503, 0.0-1.0.
    pub error_rate: f64,
    /// Share of requests whose connection is reset, 0.0-1.0.
    pub reset_rate: f64,
}

/// Independent seeds, so a request chosen for one fault is not thereby chosen for the other.
const ERROR_SEED: u64 = 0x5eed_0503;
const RESET_SEED: u64 = 0x5eed_0f57;

impl Faults {
    /// What the origin's `n`th request (counted from 0) gets. A reset wins over a 503.
    pub fn fate(&self, n: u64) -> Fate {
        if chosen(n, RESET_SEED, self.reset_rate) {
            Fate::Reset
        } else if chosen(n, ERROR_SEED, self.error_rate) {
            Fate::Unavailable
        } else {
            Fate::Answer
        }
    }

    /// Why these faults cannot be served, if they cannot.
    pub fn problem(&self) -> Option<String> {
        let rate = |v: f64| v.is_finite() && (0.0..=1.0).contains(&v);
        if !rate(self.error_rate) {
            return Some(format!("error rate {} is not a share 0.0-1.0", self.error_rate));
        }
        if !rate(self.reset_rate) {
            return Some(format!("reset rate {} is not a share 0.0-1.0", self.reset_rate));
        }
        match self.stall {
            Some(s) if s.length.is_zero() || s.length >= s.every => {
                Some(format!("a stall of {:?} every {:?} must be shorter than its period and not 0", s.length, s.every))
            }
            _ => None,
        }
    }
}

/// Whether request `n` falls in the `rate` share picked by `seed`.
fn chosen(n: u64, seed: u64, rate: f64) -> bool {
    // The top 53 bits as a fraction in [0, 1).
    let unit = (splitmix64(n ^ seed) >> 11) as f64 / (1u64 << 53) as f64;
    rate > 0.0 && unit < rate
}

/// SplitMix64's finaliser: a fixed, well-spread hash of a counter.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn a_stall_holds_answers_to_its_end_and_only_in_it() {
        let s = Stall { length: MS(300), every: MS(3000) };
        assert_eq!(s.wait(MS(0)), Duration::ZERO);
        assert_eq!(s.wait(MS(2699)), Duration::ZERO);
        assert_eq!(s.wait(MS(2700)), MS(300));
        assert_eq!(s.wait(MS(2950)), MS(50));
        assert_eq!(s.wait(MS(3000)), Duration::ZERO);
        assert_eq!(s.wait(MS(5800)), MS(200));
    }

    #[test]
    fn shares_follow_the_rates_and_a_reset_wins() {
        let f = Faults { stall: None, error_rate: 0.10, reset_rate: 0.02 };
        let n = 100_000u64;
        let count = |want: Fate| (0..n).filter(|&i| f.fate(i) == want).count() as f64 / n as f64;
        let (errors, resets) = (count(Fate::Unavailable), count(Fate::Reset));
        assert!((resets - 0.02).abs() < 0.002, "resets {resets}");
        // A 503 is picked among the requests not reset.
        assert!((errors - 0.10 * 0.98).abs() < 0.005, "errors {errors}");
        assert_eq!(Faults::default().fate(7), Fate::Answer);
        assert_eq!(f.fate(12345), f.fate(12345));
    }

    #[test]
    fn bad_faults_are_named() {
        assert!(Faults { error_rate: 1.5, ..Faults::default() }.problem().is_some());
        assert!(Faults { reset_rate: f64::NAN, ..Faults::default() }.problem().is_some());
        let stall = |l, e| Faults { stall: Some(Stall { length: MS(l), every: MS(e) }), ..Faults::default() };
        assert!(stall(300, 300).problem().is_some());
        assert!(stall(0, 300).problem().is_some());
        assert_eq!(stall(300, 3000).problem(), None);
    }
}
