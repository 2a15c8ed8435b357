//! Node identity.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// The longest identity we carry; an Ed25519 libp2p `PeerId` is 38 bytes.
pub const MAX_ID_LEN: usize = 48;

/// A node's identity: the raw bytes of its libp2p `PeerId` in the agent, a short counter in the simulator.
///
/// Stored inline (no heap) and `Copy`, because member lists and routes carry many of them.
#[derive(Clone, Copy)]
pub struct NodeId {
    len: u8,
    bytes: [u8; MAX_ID_LEN],
}

impl NodeId {
    /// `None` when `bytes` is empty or longer than [`MAX_ID_LEN`].
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() || bytes.len() > MAX_ID_LEN {
            return None;
        }
        let mut id = NodeId { len: bytes.len() as u8, bytes: [0; MAX_ID_LEN] };
        id.bytes[..bytes.len()].copy_from_slice(bytes);
        Some(id)
    }

    /// A compact id for simulations and tests.
    pub fn from_u64(n: u64) -> Self {
        Self::from_bytes(&n.to_be_bytes()).expect("8 bytes fit")
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }

    /// A 64-bit digest of the id for scanning short lists: equal ids have equal keys, and different ids almost
    /// never do (a match is confirmed by comparing the ids). A list of keys fits in a cache line or two where the
    /// ids themselves (49 bytes each, inside larger records) would take one each.
    pub fn key(&self) -> u64 {
        // Every word counts: libp2p ids share their first bytes (the multihash prefix), simulator ids are all in the
        // first word.
        let word = |i: usize| u64::from_ne_bytes(self.bytes[i * 8..(i + 1) * 8].try_into().expect("8 bytes"));
        (0..MAX_ID_LEN / 8)
            .fold(u64::from(self.len), |acc, i| acc.rotate_left(23).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ word(i))
    }
}

// Bytes past `len` are always zero (every constructor zero-fills), so equality can compare the whole fixed-size
// buffer, as a few word compares instead of a memcmp call for a variable length.
// Ids are compared on every message and in long scans (lease renewals). Hash only the used bytes.
impl PartialEq for NodeId {
    fn eq(&self, other: &Self) -> bool {
        // Word by word, folded with xor: comparing the byte arrays (or arrays of words) with `==` compiles to a call
        // to `bcmp`, which was 14% of a 10k-node simulation.
        let word =
            |b: &[u8; MAX_ID_LEN], i: usize| u64::from_ne_bytes(b[i * 8..(i + 1) * 8].try_into().expect("8 bytes"));
        let differing = (0..MAX_ID_LEN / 8).fold(0, |acc, i| acc | (word(&self.bytes, i) ^ word(&other.bytes, i)));
        self.len == other.len && differing == 0
    }
}

impl Eq for NodeId {}

impl std::hash::Hash for NodeId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(self.as_bytes());
    }
}

/// Where `id` is in a list of ids kept with their keys (`keys[i]` the key of the `i`th id): `is_at(i)` confirms a
/// key's match against the whole id.
pub(crate) fn position_by_key(keys: &[u64], id: &NodeId, is_at: impl Fn(usize) -> bool) -> Option<usize> {
    let key = id.key();
    let mut start = 0;
    while let Some(offset) = keys[start..].iter().position(|k| *k == key) {
        let i = start + offset;
        if is_at(i) {
            return Some(i);
        }
        start = i + 1;
    }
    None
}

impl PartialOrd for NodeId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// Lexicographic on the bytes.
impl Ord for NodeId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// Lower-case hex of the last 6 bytes: short enough for logs, long enough to tell peers apart.
impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.as_bytes();
        for byte in &b[b.len().saturating_sub(6)..] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl Serialize for NodeId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(self.as_bytes())
    }
}

impl<'de> Deserialize<'de> for NodeId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = NodeId;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "1 to {MAX_ID_LEN} bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<NodeId, E> {
                NodeId::from_bytes(v).ok_or_else(|| E::invalid_length(v.len(), &self))
            }
        }
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_cbor() {
        let id = NodeId::from_bytes(&[7; 38]).unwrap();
        let mut buf = Vec::new();
        ciborium::into_writer(&id, &mut buf).unwrap();
        let back: NodeId = ciborium::from_reader(&buf[..]).unwrap();
        assert_eq!(id, back);
    }

    #[test]
    fn equal_exactly_when_the_bytes_are() {
        assert_eq!(NodeId::from_bytes(&[1, 2]), NodeId::from_bytes(&[1, 2]));
        assert_ne!(NodeId::from_bytes(&[1, 2]), NodeId::from_bytes(&[1, 2, 0]), "a trailing zero is a longer id");
        assert_ne!(NodeId::from_bytes(&[1, 2]), NodeId::from_bytes(&[1, 3]));
        assert_eq!(NodeId::from_u64(7), NodeId::from_bytes(&7u64.to_be_bytes()).unwrap());
        // Every word counts, the last byte's too.
        let mut last = [9; MAX_ID_LEN];
        assert_eq!(NodeId::from_bytes(&last), NodeId::from_bytes(&last));
        last[MAX_ID_LEN - 1] = 8;
        assert_ne!(NodeId::from_bytes(&last), NodeId::from_bytes(&[9; MAX_ID_LEN]));
    }

    #[test]
    fn keys_tell_apart_simulator_ids_and_ids_with_a_shared_prefix() {
        let keys: std::collections::HashSet<u64> = (0..100_000).map(|n| NodeId::from_u64(n).key()).collect();
        assert_eq!(keys.len(), 100_000);
        // libp2p ids: the same multihash prefix, different digests.
        let peer = |n: u8| {
            let mut bytes = [0u8; 38];
            bytes[..6].copy_from_slice(&[0x00, 0x24, 0x08, 0x01, 0x12, 0x20]);
            bytes[37] = n;
            NodeId::from_bytes(&bytes).unwrap()
        };
        let keys: std::collections::HashSet<u64> = (0..=255).map(|n| peer(n).key()).collect();
        assert_eq!(keys.len(), 256);
        assert_eq!(peer(3).key(), peer(3).key());
        assert_ne!(NodeId::from_bytes(&[1, 2]).unwrap().key(), NodeId::from_bytes(&[1, 2, 0]).unwrap().key());
        let found = position_by_key(&[peer(1).key(), peer(2).key()], &peer(2), |i| i == 1);
        assert_eq!(found, Some(1));
    }

    #[test]
    fn rejects_empty_and_oversized() {
        assert!(NodeId::from_bytes(&[]).is_none());
        assert!(NodeId::from_bytes(&[1; MAX_ID_LEN + 1]).is_none());
    }
}
