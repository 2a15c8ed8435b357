//! Admission: only peers that know the overlay's network key take part in the tree.
//!
//! Why not libp2p `pnet`: it wraps TCP streams in a pre-shared-key cipher and cannot be used with QUIC, which is our
//! main transport. Instead, after libp2p has authenticated a connection (noise / TLS prove the remote's peer id),
//! each side challenges the other over `/canopy/admit/1`:
//!
//! ```text
//! A -> B: Challenge { nonce_a }        B -> A: Challenge { nonce_b }
//! B -> A: Proof(MAC_k(nonce_a, B, A))  A -> B: Proof(MAC_k(nonce_b, A, B))
//! ```
//!
//! `MAC_k` is BLAKE3 in keyed mode with the 32-byte network key. A proof covers the verifier's fresh nonce (no
//! replay) and both peer ids in prover -> verifier order (no reflection, and no relaying: the peer ids are the ones
//! the transport authenticated). Both directions run at once, so each side learns whether the other is a member.
//! Tree messages from a peer are only handed to the overlay once its proof checked out.
//!
//! This module is the pure state machine; the swarm task moves its messages.

use anyhow::bail;
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Domain separation for the MAC input.
const CONTEXT: &[u8] = b"canopy/admit/1";

/// The overlay's shared secret.
#[derive(Clone, PartialEq, Eq)]
pub struct NetworkKey([u8; 32]);

impl std::fmt::Debug for NetworkKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NetworkKey(..)")
    }
}

impl NetworkKey {
    pub fn generate() -> Self {
        Self(rand::random())
    }

    pub fn from_hex(text: &str) -> anyhow::Result<Self> {
        match blake3::Hash::from_hex(text) {
            Ok(hash) => Ok(Self(*hash.as_bytes())),
            Err(_) => bail!("a network key is 64 hexadecimal characters (32 bytes), got {} characters", text.len()),
        }
    }

    pub fn to_hex(&self) -> String {
        blake3::Hash::from_bytes(self.0).to_hex().to_string()
    }

    /// The proof that `prover` knows the key, for `verifier`'s challenge `nonce`.
    pub fn proof(&self, nonce: &[u8; 32], prover: &PeerId, verifier: &PeerId) -> blake3::Hash {
        let mut mac = blake3::Hasher::new_keyed(&self.0);
        mac.update(CONTEXT);
        mac.update(nonce);
        for id in [prover, verifier] {
            let bytes = id.to_bytes();
            mac.update(&(bytes.len() as u32).to_be_bytes());
            mac.update(&bytes);
        }
        mac.finalize()
    }
}

/// `/canopy/admit/1` request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Challenge {
    pub nonce: [u8; 32],
}

/// `/canopy/admit/1` response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proof {
    pub mac: [u8; 32],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerState {
    /// We sent a challenge with this nonce and wait for the proof.
    Challenged([u8; 32]),
    Admitted,
    Refused,
}

/// The outcome of checking a peer's proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admitted,
    Refused,
    /// A proof we did not ask for (or asked for long ago): ignored.
    Unexpected,
}

/// Per-peer admission state of this node.
#[derive(Debug)]
pub struct Admission {
    key: NetworkKey,
    local: PeerId,
    peers: HashMap<PeerId, PeerState>,
}

impl Admission {
    pub fn new(key: NetworkKey, local: PeerId) -> Self {
        Self { key, local, peers: HashMap::new() }
    }

    /// A connection to `peer` is up: the challenge to send, unless the peer is already admitted or challenged (a
    /// second connection while the first is open).
    pub fn on_connected(&mut self, peer: PeerId, nonce: [u8; 32]) -> Option<Challenge> {
        match self.peers.get(&peer) {
            Some(PeerState::Admitted | PeerState::Challenged(_)) => None,
            Some(PeerState::Refused) | None => {
                self.peers.insert(peer, PeerState::Challenged(nonce));
                Some(Challenge { nonce })
            }
        }
    }

    /// Our answer to `peer`'s challenge. Anyone may ask: the proof is bound to the asker and useless elsewhere.
    pub fn answer(&self, peer: &PeerId, challenge: &Challenge) -> Proof {
        Proof { mac: *self.key.proof(&challenge.nonce, &self.local, peer).as_bytes() }
    }

    pub fn on_proof(&mut self, peer: PeerId, proof: &Proof) -> Verdict {
        let Some(PeerState::Challenged(nonce)) = self.peers.get(&peer).copied() else {
            return Verdict::Unexpected;
        };
        // `blake3::Hash` equality is constant-time.
        if self.key.proof(&nonce, &peer, &self.local) == blake3::Hash::from_bytes(proof.mac) {
            self.peers.insert(peer, PeerState::Admitted);
            Verdict::Admitted
        } else {
            self.peers.insert(peer, PeerState::Refused);
            Verdict::Refused
        }
    }

    /// The challenge could not be delivered or answered (connection lost, timeout): ask again next connection.
    pub fn on_failure(&mut self, peer: &PeerId) {
        if let Some(PeerState::Challenged(_)) = self.peers.get(peer) {
            self.peers.remove(peer);
        }
    }

    /// The last connection to `peer` closed: it proves itself again on the next one (it may have been restarted
    /// with another key under the same identity).
    pub fn forget(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }

    /// Neither admitted, refused nor challenged: e.g. its challenge failed in transit and should be sent again.
    pub fn is_unknown(&self, peer: &PeerId) -> bool {
        !self.peers.contains_key(peer)
    }

    pub fn is_admitted(&self, peer: &PeerId) -> bool {
        self.peers.get(peer) == Some(&PeerState::Admitted)
    }

    pub fn is_pending(&self, peer: &PeerId) -> bool {
        matches!(self.peers.get(peer), Some(PeerState::Challenged(_)))
    }

    pub fn admitted_count(&self) -> usize {
        self.peers.values().filter(|s| **s == PeerState::Admitted).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(key_a: &NetworkKey, key_b: &NetworkKey) -> (Admission, Admission) {
        let a = Admission::new(key_a.clone(), PeerId::random());
        let b = Admission::new(key_b.clone(), PeerId::random());
        (a, b)
    }

    /// Runs both directions of the handshake; returns (A's verdict on B, B's verdict on A).
    fn handshake(a: &mut Admission, b: &mut Admission) -> (Verdict, Verdict) {
        let challenge_a = a.on_connected(b.local, rand::random()).unwrap();
        let challenge_b = b.on_connected(a.local, rand::random()).unwrap();
        let proof_b = b.answer(&a.local, &challenge_a);
        let proof_a = a.answer(&b.local, &challenge_b);
        (a.on_proof(b.local, &proof_b), b.on_proof(a.local, &proof_a))
    }

    #[test]
    fn same_key_admits_both_ways() {
        let key = NetworkKey::generate();
        let (mut a, mut b) = pair(&key, &key);
        assert_eq!(handshake(&mut a, &mut b), (Verdict::Admitted, Verdict::Admitted));
        assert!(a.is_admitted(&b.local) && b.is_admitted(&a.local));
        // Already admitted: no new challenge for a second connection...
        assert_eq!(a.on_connected(b.local, [0; 32]), None);
        // ...but after all connections closed, the peer proves itself again.
        a.forget(&b.local);
        assert!(!a.is_admitted(&b.local));
        assert!(a.on_connected(b.local, [0; 32]).is_some());
        a.on_failure(&b.local);
        assert!(a.is_unknown(&b.local));
    }

    #[test]
    fn wrong_key_is_refused_by_both() {
        let (mut a, mut b) = pair(&NetworkKey::generate(), &NetworkKey::generate());
        assert_eq!(handshake(&mut a, &mut b), (Verdict::Refused, Verdict::Refused));
        assert!(!a.is_admitted(&b.local) && !b.is_admitted(&a.local) && !a.is_pending(&b.local));
        // A refused peer is challenged again on its next connection (it may have been restarted with the right key).
        assert!(a.on_connected(b.local, [1; 32]).is_some());
    }

    #[test]
    fn proofs_do_not_replay_or_reflect() {
        let key = NetworkKey::generate();
        let (mut a, b) = pair(&key, &key);
        let first = a.on_connected(b.local, [7; 32]).unwrap();
        let proof = b.answer(&a.local, &first);
        // Reflection: A's own answer to the same nonce (prover A) does not pass as B's proof.
        let reflected = a.answer(&b.local, &first);
        assert_ne!(reflected, proof);
        assert_eq!(a.on_proof(b.local, &reflected), Verdict::Refused);
        // Replay: an old proof does not answer a fresh nonce.
        a.on_connected(b.local, [8; 32]).unwrap();
        assert_eq!(a.on_proof(b.local, &proof), Verdict::Refused);
    }

    #[test]
    fn unsolicited_proof_is_ignored() {
        let key = NetworkKey::generate();
        let (mut a, b) = pair(&key, &key);
        let proof = b.answer(&a.local, &Challenge { nonce: [1; 32] });
        assert_eq!(a.on_proof(b.local, &proof), Verdict::Unexpected);
        assert!(!a.is_admitted(&b.local));
    }

    #[test]
    fn key_hex_round_trip_and_errors() {
        let key = NetworkKey::generate();
        assert_eq!(NetworkKey::from_hex(&key.to_hex()).unwrap(), key);
        let err = NetworkKey::from_hex("abc").unwrap_err();
        assert!(err.to_string().contains("64 hexadecimal"), "{err}");
        assert!(NetworkKey::from_hex(&"zz".repeat(32)).is_err());
    }
}
