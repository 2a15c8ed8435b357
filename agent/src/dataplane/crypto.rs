//! Tunnel encryption: ChaCha20-Poly1305 with one key per pair of machines, derived from the route table's
//! `tunnel_key` (agreed over the control plane later), and a replay window per peer.
//!
//! A sealed data message is `header (12) | counter (8, big endian) | ciphertext | tag (16)`; header and counter
//! are authenticated. The nonce is the counter plus a direction byte, so the two ends of a pair never reuse a
//! nonce under their shared key. Senders start their counter at the wall clock in nanoseconds, so a restarted
//! agent continues above the counters its peers have seen.
//!
//! Any machine holding the key can talk to any other: a receiver derives the pair key from the header's sender id,
//! so it accepts authentic datagrams from machines its (lazily filled) route table does not list.

use super::routes::NodeId;
use super::tunnel::HEADER_LEN;
use lru::LruCache;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, Tag, UnboundKey};
use std::num::NonZeroUsize;
use std::ops::Range;

pub const COUNTER_LEN: usize = 8;
pub const TAG_LEN: usize = 16;
/// Bytes sealing adds to a data message.
pub const SEAL_OVERHEAD: usize = COUNTER_LEN + TAG_LEN;
/// Where the plaintext starts in a sealed message.
pub const PAYLOAD_OFFSET: usize = HEADER_LEN + COUNTER_LEN;

/// The key machines `a` and `b` share (same for both orders).
pub fn pair_cipher(master: &[u8; 32], a: NodeId, b: NodeId) -> LessSafeKey {
    let (low, high) = if a.0 <= b.0 { (a, b) } else { (b, a) };
    let mut material = [0u8; 48];
    material[..32].copy_from_slice(master);
    material[32..40].copy_from_slice(&low.0.to_be_bytes());
    material[40..].copy_from_slice(&high.0.to_be_bytes());
    let key = blake3::derive_key("canopy tunnel pair key v1", &material);
    // ring's ChaCha20-Poly1305 (assembly) seals a 1420-byte packet about 3x faster than the RustCrypto crate.
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &key).expect("a 32-byte ChaCha20-Poly1305 key"))
}

fn nonce(sender: NodeId, receiver: NodeId, counter: u64) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[0] = u8::from(sender.0 < receiver.0);
    nonce[4..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(nonce)
}

/// Seals `buf[PAYLOAD_OFFSET..PAYLOAD_OFFSET + len]` in place; the header must already be in `buf[..HEADER_LEN]`
/// and `buf` must have `TAG_LEN` bytes of room after the payload. Returns the message length.
pub fn seal(cipher: &LessSafeKey, buf: &mut [u8], len: usize, sender: NodeId, receiver: NodeId, counter: u64) -> usize {
    buf[HEADER_LEN..PAYLOAD_OFFSET].copy_from_slice(&counter.to_be_bytes());
    let (aad, rest) = buf.split_at_mut(PAYLOAD_OFFSET);
    let tag = cipher
        .seal_in_place_separate_tag(nonce(sender, receiver, counter), Aad::from(&*aad), &mut rest[..len])
        .expect("ChaCha20-Poly1305 seals any message shorter than 256 GiB");
    rest[len..len + TAG_LEN].copy_from_slice(tag.as_ref());
    PAYLOAD_OFFSET + len + TAG_LEN
}

/// Opens a sealed message in place. Returns its counter and where the plaintext now is.
pub fn open(cipher: &LessSafeKey, message: &mut [u8], sender: NodeId, receiver: NodeId) -> Option<(u64, Range<usize>)> {
    if message.len() < PAYLOAD_OFFSET + TAG_LEN {
        return None;
    }
    let mut counter = [0u8; COUNTER_LEN];
    counter.copy_from_slice(&message[HEADER_LEN..PAYLOAD_OFFSET]);
    let counter = u64::from_be_bytes(counter);
    let end = message.len() - TAG_LEN;
    let tag = Tag::try_from(&message[end..]).ok()?;
    let (aad, rest) = message.split_at_mut(PAYLOAD_OFFSET);
    cipher
        .open_in_place_separate_tag(
            nonce(sender, receiver, counter),
            Aad::from(&*aad),
            tag,
            &mut rest[..end - PAYLOAD_OFFSET],
            0..,
        )
        .ok()?;
    Some((counter, PAYLOAD_OFFSET..end))
}

/// The pair ciphers of this machine, derived on demand from the tunnel key and cached (bounded, LRU). A cipher
/// is cached only once a peer proved it holds the key (or we send to it), so datagrams with made-up sender ids
/// cost a derivation each but cannot push real peers out.
pub struct PairCiphers {
    me: NodeId,
    master: Option<[u8; 32]>,
    cache: LruCache<NodeId, LessSafeKey>,
}

impl PairCiphers {
    pub fn new(me: NodeId, capacity: NonZeroUsize) -> Self {
        Self { me, master: None, cache: LruCache::new(capacity) }
    }

    /// Whether tunnels are sealed (a tunnel key is set).
    pub fn sealing(&self) -> bool {
        self.master.is_some()
    }

    /// Sets (or clears) the tunnel key; a new key forgets every derived cipher.
    pub fn set_key(&mut self, master: Option<[u8; 32]>) {
        if master != self.master {
            self.cache.clear();
            self.master = master;
        }
    }

    /// Seals `buf[PAYLOAD_OFFSET..PAYLOAD_OFFSET + len]` for `peer` (see [`seal`]); `None` without a key.
    pub fn seal(&mut self, buf: &mut [u8], len: usize, peer: NodeId, counter: u64) -> Option<usize> {
        let master = self.master.as_ref()?;
        let cipher = self.cache.get_or_insert(peer, || pair_cipher(master, self.me, peer));
        Some(seal(cipher, buf, len, self.me, peer, counter))
    }

    /// Opens a sealed message from `sender` in place (see [`open`]); `None` when it is not authentic.
    pub fn open(&mut self, message: &mut [u8], sender: NodeId) -> Option<(u64, Range<usize>)> {
        if let Some(cipher) = self.cache.get(&sender) {
            return open(cipher, message, sender, self.me);
        }
        let cipher = pair_cipher(self.master.as_ref()?, self.me, sender);
        let opened = open(&cipher, message, sender, self.me)?;
        self.cache.put(sender, cipher);
        Some(opened)
    }

    #[cfg(test)]
    pub fn cached(&self) -> usize {
        self.cache.len()
    }
}

/// Accepts each counter at most once, tolerating reordering within the last 64 counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplayWindow {
    highest: u64,
    /// Bit i set: counter `highest - i` was seen.
    seen: u64,
}

impl ReplayWindow {
    pub fn accept(&mut self, counter: u64) -> bool {
        if self.seen == 0 || counter > self.highest {
            let shift = counter.saturating_sub(self.highest);
            self.seen = if self.seen == 0 || shift >= 64 { 1 } else { (self.seen << shift) | 1 };
            self.highest = counter;
            return true;
        }
        let age = self.highest - counter;
        if age >= 64 || self.seen & (1 << age) != 0 {
            return false;
        }
        self.seen |= 1 << age;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::super::tunnel::{MessageType, write_header};
    use super::*;

    #[test]
    fn seal_then_open_and_tamper() {
        let master = [7u8; 32];
        let (a, b) = (NodeId(1), NodeId(2));
        let cipher_a = pair_cipher(&master, a, b);
        let cipher_b = pair_cipher(&master, b, a);
        let mut buf = [0u8; PAYLOAD_OFFSET + 5 + TAG_LEN];
        write_header(&mut buf, MessageType::Data, a, true);
        buf[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 5].copy_from_slice(b"hello");
        let len = seal(&cipher_a, &mut buf, 5, a, b, 42);
        assert_ne!(&buf[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 5], b"hello");
        let mut copy = buf;
        let (counter, range) = open(&cipher_b, &mut copy[..len], a, b).expect("opens");
        assert_eq!((counter, &copy[range]), (42, &b"hello"[..]));
        // Wrong direction, flipped bits, another key: rejected.
        assert!(open(&cipher_b, &mut { buf }[..len], b, a).is_none());
        let mut flipped = buf;
        flipped[PAYLOAD_OFFSET] ^= 1;
        assert!(open(&cipher_b, &mut flipped[..len], a, b).is_none());
        let mut header_changed = buf;
        header_changed[3] = 1;
        assert!(open(&cipher_b, &mut header_changed[..len], a, b).is_none());
        let other = pair_cipher(&[8u8; 32], a, b);
        assert!(open(&other, &mut { buf }[..len], a, b).is_none());
        assert!(open(&cipher_b, &mut { buf }[..PAYLOAD_OFFSET + 3], a, b).is_none());
    }

    #[test]
    fn ciphers_for_unlisted_peers_are_derived_and_cached_once_authentic() {
        let master = [9u8; 32];
        let (a, b, stranger) = (NodeId(1), NodeId(2), NodeId(3));
        let mut at_a = PairCiphers::new(a, NonZeroUsize::new(2).unwrap());
        let mut at_b = PairCiphers::new(b, NonZeroUsize::new(2).unwrap());
        let mut buf = [0u8; PAYLOAD_OFFSET + 4 + TAG_LEN];
        write_header(&mut buf, MessageType::Data, a, true);
        assert_eq!(at_a.seal(&mut buf, 4, b, 1), None, "no key, no sealing");
        at_a.set_key(Some(master));
        at_b.set_key(Some(master));
        buf[PAYLOAD_OFFSET..PAYLOAD_OFFSET + 4].copy_from_slice(b"ping");
        let len = at_a.seal(&mut buf, 4, b, 1).unwrap();
        // b never heard of a, yet opens it: the key is derived from the header's sender id.
        let (counter, range) = at_b.open(&mut buf[..len], a).expect("authentic");
        assert_eq!((counter, &buf[range]), (1, &b"ping"[..]));
        assert_eq!(at_b.cached(), 1);
        // A forged sender id does not authenticate and is not cached.
        let mut forged = [0u8; PAYLOAD_OFFSET + 4 + TAG_LEN];
        write_header(&mut forged, MessageType::Data, stranger, true);
        assert!(at_b.open(&mut forged, stranger).is_none());
        assert_eq!(at_b.cached(), 1);
        // Another key: the cache is forgotten and a's old messages no longer open.
        at_b.set_key(Some([1u8; 32]));
        assert_eq!(at_b.cached(), 0);
        let mut again = [0u8; PAYLOAD_OFFSET + 4 + TAG_LEN];
        write_header(&mut again, MessageType::Data, a, true);
        let len = at_a.seal(&mut again, 4, b, 2).unwrap();
        assert!(at_b.open(&mut again[..len], a).is_none());
    }

    #[test]
    fn replay_window() {
        let mut window = ReplayWindow::default();
        assert!(window.accept(1000));
        assert!(!window.accept(1000), "replay");
        assert!(window.accept(1002));
        assert!(window.accept(1001), "reordered within the window");
        assert!(!window.accept(1001));
        assert!(window.accept(1100));
        assert!(!window.accept(1002), "too old");
        assert!(window.accept(1099));
    }
}
