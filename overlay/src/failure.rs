//! Parent failure detection: missed heartbeats make the parent *suspect*; a direct probe plus indirect probes
//! through a few siblings (SWIM ping-req) then either clear it or declare it dead. A lossy link alone therefore
//! does not trigger a takeover: a sibling that still hears the parent vouches for it.

use crate::Time;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Healthy,
    Probing { seq: u64, deadline: Time },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing due.
    Wait,
    /// Start probing now with this sequence number.
    Probe(u64),
    /// No sign of life within the probe timeout.
    Dead,
}

#[derive(Debug, Clone)]
pub struct Detector {
    last_heard: Time,
    /// Last first-hand sign of life (heartbeat or our own probe answered), never a sibling's vouch: siblings
    /// vouch for the parent from this alone, so vouches cannot circulate among them and keep a dead parent alive.
    last_heard_directly: Time,
    phase: Phase,
    suspect_after: Duration,
    probe_timeout: Duration,
}

impl Detector {
    pub fn new(now: Time, suspect_after: Duration, probe_timeout: Duration) -> Self {
        Detector { last_heard: now, last_heard_directly: now, phase: Phase::Healthy, suspect_after, probe_timeout }
    }

    pub fn last_heard(&self) -> Time {
        self.last_heard
    }

    pub fn last_heard_directly(&self) -> Time {
        self.last_heard_directly
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// A first-hand sign of life (heartbeat, an answer to our own probe).
    pub fn heard(&mut self, now: Time) {
        self.last_heard_directly = self.last_heard_directly.max(now);
        self.clear(now);
    }

    /// Our own probe `seq` answered (ignored when it answers an older probe round).
    pub fn probe_answered(&mut self, now: Time, seq: u64) {
        if self.is_probing(seq) {
            self.heard(now);
        }
    }

    /// A sibling vouched for the parent in probe round `seq`: clears suspicion, but is not first-hand.
    pub fn vouched(&mut self, now: Time, seq: u64) {
        if self.is_probing(seq) {
            self.clear(now);
        }
    }

    fn is_probing(&self, seq: u64) -> bool {
        matches!(self.phase, Phase::Probing { seq: s, .. } if s == seq)
    }

    fn clear(&mut self, now: Time) {
        self.last_heard = self.last_heard.max(now);
        self.phase = Phase::Healthy;
    }

    /// Suspect at once (the driver lost the connection).
    pub fn suspect_now(&mut self, now: Time) {
        if self.phase == Phase::Healthy {
            self.last_heard = self.last_heard.min(now.saturating_sub(self.suspect_after));
        }
    }

    pub fn deadline(&self) -> Time {
        match self.phase {
            Phase::Healthy => self.last_heard + self.suspect_after,
            Phase::Probing { deadline, .. } => deadline,
        }
    }

    pub fn poll(&mut self, now: Time, next_seq: u64) -> Verdict {
        if now < self.deadline() {
            return Verdict::Wait;
        }
        match self.phase {
            Phase::Healthy => {
                self.phase = Phase::Probing { seq: next_seq, deadline: now + self.probe_timeout };
                Verdict::Probe(next_seq)
            }
            Phase::Probing { .. } => Verdict::Dead,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn suspects_then_declares_dead() {
        let mut d = Detector::new(MS(0), MS(1500), MS(500));
        assert_eq!(d.poll(MS(1000), 1), Verdict::Wait);
        assert_eq!(d.deadline(), MS(1500));
        assert_eq!(d.poll(MS(1500), 1), Verdict::Probe(1));
        assert_eq!(d.poll(MS(1800), 2), Verdict::Wait);
        assert_eq!(d.poll(MS(2000), 2), Verdict::Dead);
    }

    #[test]
    fn probe_answer_clears_suspicion_but_stale_answers_do_not() {
        let mut d = Detector::new(MS(0), MS(1500), MS(500));
        assert_eq!(d.poll(MS(1500), 7), Verdict::Probe(7));
        d.probe_answered(MS(1600), 6);
        assert!(matches!(d.phase(), Phase::Probing { .. }));
        d.probe_answered(MS(1600), 7);
        assert_eq!(d.phase(), Phase::Healthy);
        assert_eq!(d.deadline(), MS(3100));
    }

    #[test]
    fn a_vouch_clears_suspicion_without_counting_as_first_hand() {
        let mut d = Detector::new(MS(0), MS(1500), MS(500));
        d.vouched(MS(100), 1);
        assert_eq!(d.deadline(), MS(1500), "a vouch outside a probe round is ignored");
        assert_eq!(d.poll(MS(1500), 1), Verdict::Probe(1));
        d.vouched(MS(1600), 1);
        assert_eq!(d.phase(), Phase::Healthy);
        assert_eq!(d.deadline(), MS(3100));
        assert_eq!(d.last_heard_directly(), MS(0));
        d.heard(MS(1700));
        assert_eq!(d.last_heard_directly(), MS(1700));
    }

    #[test]
    fn suspect_now_moves_the_deadline() {
        let mut d = Detector::new(MS(5000), MS(1500), MS(500));
        d.suspect_now(MS(5100));
        assert_eq!(d.poll(MS(5100), 1), Verdict::Probe(1));
    }
}
