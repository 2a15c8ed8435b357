//! Whether a tunnel peer is alive, judged from traffic only (no I/O; time is passed in).
//!
//! A machine that dies silently (kill -9, power loss) answers nothing, not even route-not-found, so its instances
//! would keep getting new connections until the tree's removal arrives (never, for instances of a dead root).
//! Like WireGuard's passive keepalive, we only look at peers we are sending data to: once data went out and
//! nothing authentic came back for `probe_after`, the peer gets a probe every `probe_interval`, which a live peer
//! answers with a keepalive (never with a probe, so two machines cannot ping-pong). Probes unanswered for
//! `give_up_after` while we kept sending data make the peer unreachable. A one-way flow to a live peer stays
//! alive through the probe answers. Any authentic datagram from the peer makes it reachable again.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessConfig {
    /// Data sent and nothing heard for this long: start probing.
    pub probe_after: Duration,
    pub probe_interval: Duration,
    /// Probes unanswered this long while we still send data: the peer is unreachable.
    pub give_up_after: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        Self {
            probe_after: Duration::from_secs(1),
            probe_interval: Duration::from_secs(1),
            give_up_after: Duration::from_secs(3),
        }
    }
}

/// What the packet loop should do for a peer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LivenessAction {
    pub probe: bool,
    /// The peer has just been declared unreachable.
    pub became_unreachable: bool,
}

/// Liveness of one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Liveness {
    /// First data sent since we last heard from the peer: the start of the unanswered stretch.
    unanswered_since: Option<Duration>,
    last_data_sent: Duration,
    first_probe: Option<Duration>,
    last_probe: Option<Duration>,
    unreachable: bool,
}

impl Liveness {
    pub fn unreachable(&self) -> bool {
        self.unreachable
    }

    /// We sent a data packet to the peer (the hot path: a few comparisons, no allocation).
    pub fn data_sent(&mut self, now: Duration) {
        self.last_data_sent = now;
        if self.unanswered_since.is_none() {
            self.unanswered_since = Some(now);
        }
    }

    /// An authentic datagram (of any kind) came from the peer. Returns true when it had been unreachable.
    pub fn heard(&mut self) -> bool {
        let was_unreachable = self.unreachable;
        *self = Liveness { last_data_sent: self.last_data_sent, ..Liveness::default() };
        was_unreachable
    }

    /// Advances the state to `now`: whether to probe, and whether the peer has just become unreachable.
    pub fn poll(&mut self, now: Duration, config: &LivenessConfig) -> LivenessAction {
        let Some(since) = self.unanswered_since else { return LivenessAction::default() };
        if !self.unreachable && now.saturating_sub(self.last_data_sent) >= config.give_up_after {
            // We stopped sending before giving up: nothing to judge until the next data packet.
            *self = Liveness { last_data_sent: self.last_data_sent, ..Liveness::default() };
            return LivenessAction::default();
        }
        if now.saturating_sub(since) < config.probe_after {
            return LivenessAction::default();
        }
        let mut action = LivenessAction::default();
        if let Some(first) = self.first_probe
            && !self.unreachable
            && now.saturating_sub(first) >= config.give_up_after
            && self.last_data_sent > first
        {
            self.unreachable = true;
            action.became_unreachable = true;
        }
        if self.last_probe.is_none_or(|last| now.saturating_sub(last) >= config.probe_interval) {
            self.first_probe.get_or_insert(now);
            self.last_probe = Some(now);
            action.probe = true;
        }
        action
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    /// Polls every 250 ms from `from` to `to` (inclusive), sending data at `send_every` when given; returns the
    /// probe times and the time the peer became unreachable.
    fn run(
        liveness: &mut Liveness,
        from: u64,
        to: u64,
        send_every: Option<u64>,
        answer_probes: bool,
    ) -> (Vec<u64>, Option<u64>) {
        let config = LivenessConfig::default();
        let (mut probes, mut unreachable) = (Vec::new(), None);
        for t in (from..=to).step_by(250) {
            if send_every.is_some_and(|every| t % every == 0) {
                liveness.data_sent(ms(t));
            }
            let action = liveness.poll(ms(t), &config);
            if action.probe {
                probes.push(t);
                if answer_probes {
                    liveness.heard();
                }
            }
            if action.became_unreachable {
                assert!(unreachable.is_none(), "declared once");
                unreachable = Some(t);
            }
        }
        (probes, unreachable)
    }

    #[test]
    fn a_silent_peer_we_keep_sending_to_is_probed_then_declared_unreachable() {
        let mut liveness = Liveness::default();
        let (probes, unreachable) = run(&mut liveness, 0, 6000, Some(500), false);
        assert_eq!(&probes[..4], &[1000, 2000, 3000, 4000], "first probe 1 s after the first unanswered data");
        assert_eq!(unreachable, Some(4000), "3 s of unanswered probes");
        assert!(liveness.unreachable());
        // Still probed while unreachable, so its return is noticed.
        assert!(probes.contains(&6000));
        assert!(liveness.heard(), "heard again: it had been unreachable");
        assert!(!liveness.unreachable());
        assert!(!liveness.heard(), "only the first datagram after reachability returns counts");
    }

    #[test]
    fn a_one_way_flow_to_a_live_peer_stays_reachable_through_probe_answers() {
        let mut liveness = Liveness::default();
        let (probes, unreachable) = run(&mut liveness, 0, 20_000, Some(250), true);
        assert_eq!(unreachable, None);
        assert!(!liveness.unreachable());
        // At most one probe per second: the answer restarts the unanswered stretch.
        assert!(probes.len() <= 20 && probes.len() >= 9, "{probes:?}");
        assert!(probes.windows(2).all(|w| w[1] - w[0] >= 1000), "{probes:?}");
    }

    #[test]
    fn replies_to_data_mean_no_probes() {
        let mut liveness = Liveness::default();
        let config = LivenessConfig::default();
        for t in (0..10_000).step_by(100) {
            liveness.data_sent(ms(t));
            liveness.heard();
            assert_eq!(liveness.poll(ms(t + 50), &config), LivenessAction::default());
        }
    }

    #[test]
    fn a_peer_we_stopped_sending_to_is_not_declared_unreachable() {
        let mut liveness = Liveness::default();
        let config = LivenessConfig::default();
        liveness.data_sent(ms(0));
        assert!(liveness.poll(ms(1000), &config).probe);
        // No more data: after give_up_after without sending, the stretch is forgotten and probing stops.
        let (probes, unreachable) = run(&mut liveness, 1250, 10_000, None, false);
        assert_eq!(unreachable, None);
        assert!(probes.iter().all(|&t| t < 3000), "{probes:?}");
        // A new stretch starts with the next data packet and needs its own 1 s + 3 s.
        let (_, unreachable) = run(&mut liveness, 10_000, 20_000, Some(1000), false);
        assert_eq!(unreachable, Some(14_000));
    }

    #[test]
    fn an_idle_peer_is_left_alone() {
        let mut liveness = Liveness::default();
        let config = LivenessConfig::default();
        for t in (0..10_000).step_by(250) {
            assert_eq!(liveness.poll(ms(t), &config), LivenessAction::default());
        }
        liveness.heard();
        assert_eq!(liveness.poll(ms(20_000), &config), LivenessAction::default());
    }
}
