//! Message kinds, for counting sent messages and bytes per kind (which protocol part grows with N).

use canopy_overlay::Message;
use canopy_overlay::routing::RoutesMessage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Every kind, in [`kind_of`]'s numbering. Routes messages are named by their inner kind.
pub const KIND_NAMES: [&str; 32] = [
    "JoinRequest",
    "Accept",
    "Refuse",
    "Attach",
    "Heartbeat",
    "Report",
    "NotYourChild",
    "Probe",
    "ProbeAck",
    "ProbeRequest",
    "ProbeResult",
    "Redirect",
    "Handover",
    "Leaving",
    "PlacementQuery",
    "PlacementAnswer",
    "Routes.SubnetSync",
    "Routes.SubnetReply",
    "Routes.Moved",
    "Routes.GroupBlocks",
    "Routes.Up",
    "Routes.Lost",
    "Routes.Down",
    "Routes.Query",
    "Routes.Answer",
    "Routes.NotFound",
    "Routes.Renew",
    "Routes.Deploy",
    "Routes.Deployed",
    "Routes.MergeAllocator",
    "Routes.SubnetWant",
    "Routes.SubnetHandOver",
];

/// The index of a message's kind in [`KIND_NAMES`] (the match is exhaustive: a new variant needs a name).
pub fn kind_of(message: &Message) -> usize {
    match message {
        Message::JoinRequest(_) => 0,
        Message::Accept(_) => 1,
        Message::Refuse(_) => 2,
        Message::Attach(_) => 3,
        Message::Heartbeat(_) => 4,
        Message::Report(_) => 5,
        Message::NotYourChild(_) => 6,
        Message::Probe { .. } => 7,
        Message::ProbeAck { .. } => 8,
        Message::ProbeRequest { .. } => 9,
        Message::ProbeResult { .. } => 10,
        Message::Redirect { .. } => 11,
        Message::Handover { .. } => 12,
        Message::Leaving => 13,
        Message::PlacementQuery(_) => 14,
        Message::PlacementAnswer { .. } => 15,
        Message::Routes(r) => match r.as_ref() {
            RoutesMessage::SubnetSync { .. } => 16,
            RoutesMessage::SubnetReply { .. } => 17,
            RoutesMessage::Moved { .. } => 18,
            RoutesMessage::GroupBlocks(_) => 19,
            RoutesMessage::Up(_) => 20,
            RoutesMessage::Lost(_) => 21,
            RoutesMessage::Down(_) => 22,
            RoutesMessage::Query { .. } => 23,
            RoutesMessage::Answer { .. } => 24,
            RoutesMessage::NotFound(_) => 25,
            RoutesMessage::Renew(_) => 26,
            RoutesMessage::Deploy { .. } => 27,
            RoutesMessage::Deployed { .. } => 28,
            RoutesMessage::MergeAllocator(_) => 29,
            RoutesMessage::SubnetWant(_) => 30,
            RoutesMessage::SubnetHandOver(_) => 31,
        },
    }
}

/// Messages and bytes sent of one kind, in total and per live node per second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KindTraffic {
    pub msgs: u64,
    pub bytes: u64,
    pub msgs_per_node_per_s: f64,
    pub bytes_per_node_per_s: f64,
}

/// Sent messages and bytes per kind, counted as they are sent.
#[derive(Debug, Clone, Default)]
pub struct KindCounter {
    counts: [(u64, u64); KIND_NAMES.len()],
}

impl KindCounter {
    pub fn count(&mut self, message: &Message, bytes: usize) {
        let slot = &mut self.counts[kind_of(message)];
        slot.0 += 1;
        slot.1 += bytes as u64;
    }

    /// The kinds that were sent, by name; `node_seconds` is the live node-time the run had.
    pub fn report(&self, node_seconds: f64) -> BTreeMap<String, KindTraffic> {
        let per = |v: u64| if node_seconds > 0.0 { v as f64 / node_seconds } else { 0.0 };
        let mut out: BTreeMap<String, KindTraffic> = BTreeMap::new();
        for (name, &(msgs, bytes)) in KIND_NAMES.iter().zip(&self.counts) {
            if msgs == 0 {
                continue;
            }
            let entry = out.entry((*name).to_string()).or_default();
            entry.msgs += msgs;
            entry.bytes += bytes;
            entry.msgs_per_node_per_s = per(entry.msgs);
            entry.bytes_per_node_per_s = per(entry.bytes);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_counted_apart_and_per_node_second() {
        let mut counter = KindCounter::default();
        counter.count(&Message::Leaving, 10);
        counter.count(&Message::Leaving, 12);
        counter.count(&Message::Probe { seq: 1 }, 5);
        counter.count(&Message::Routes(Box::new(RoutesMessage::GroupBlocks(vec![]))), 7);
        let report = counter.report(2.0);
        assert_eq!(report.len(), 3);
        let leaving = &report["Leaving"];
        assert_eq!((leaving.msgs, leaving.bytes), (2, 22));
        assert_eq!((leaving.msgs_per_node_per_s, leaving.bytes_per_node_per_s), (1.0, 11.0));
        assert_eq!(report["Probe"].msgs, 1);
        assert_eq!(report["Routes.GroupBlocks"].bytes, 7);
    }

    #[test]
    fn every_named_kind_has_a_distinct_name() {
        let named: Vec<&str> = KIND_NAMES.to_vec();
        let mut unique = named.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), named.len());
    }
}
