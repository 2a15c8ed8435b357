//! Outgoing tunnel datagrams gathered for one UDP segmentation offload (GSO) send: packets read from the TUN in
//! one wake-up are sealed in place, back to back, into one buffer; consecutive datagrams to the same endpoint with
//! the same size (the last may be shorter) leave with a single `sendmsg`, which the kernel splits. A bulk TCP
//! stream is exactly that: a run of full-size segments to one peer. Pure bookkeeping; the engine does the I/O.

use super::crypto::TAG_LEN;
use super::tunnel::MAX_PACKET;
use std::net::SocketAddr;

/// Most bytes in one GSO send: the payload of one maximal UDP datagram over IPv4 (65535 - 20 - 8), rounded down.
pub const MAX_BATCH_BYTES: usize = 65_000;
/// Most segments in one GSO send (the kernel's limit, UDP_MAX_SEGMENTS).
pub const MAX_SEGMENTS: usize = 64;

pub struct SendBatch {
    /// Datagrams `[0, len)`, then room to build the next one (its room starts at `len`).
    buf: Box<[u8]>,
    len: usize,
    segment: usize,
    count: usize,
    destination: Option<SocketAddr>,
    /// A shorter datagram ended the run: GSO allows a short segment only at the end.
    closed: bool,
    max_segments: usize,
}

/// A batch ready to send.
#[derive(Debug, PartialEq, Eq)]
pub struct Pending<'a> {
    pub destination: SocketAddr,
    pub contents: &'a [u8],
    /// Size of every segment but the last; `None` for a single datagram.
    pub segment_size: Option<usize>,
    pub count: usize,
}

impl SendBatch {
    /// `room_before`: bytes the engine needs in front of a packet to build its datagram in place.
    pub fn new(room_before: usize, max_segments: usize) -> Self {
        Self {
            buf: vec![0u8; MAX_BATCH_BYTES + room_before + MAX_PACKET + TAG_LEN].into_boxed_slice(),
            len: 0,
            segment: 0,
            count: 0,
            destination: None,
            closed: false,
            max_segments: max_segments.clamp(1, MAX_SEGMENTS),
        }
    }

    /// Where the next datagram is built.
    pub fn slot(&mut self) -> &mut [u8] {
        &mut self.buf[self.len..]
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Lower the segment limit (the kernel refused GSO: then 1).
    pub fn set_max_segments(&mut self, max_segments: usize) {
        self.max_segments = max_segments.clamp(1, MAX_SEGMENTS);
    }

    /// Adds the datagram of `size` bytes built at the start of `slot()`. Returns false, changing nothing, when it
    /// cannot join this batch: the engine sends the batch, then calls `restart_with`.
    pub fn push(&mut self, size: usize, destination: SocketAddr) -> bool {
        if self.count == 0 {
            self.start(size, destination);
            return true;
        }
        let joins = self.destination == Some(destination)
            && !self.closed
            && size <= self.segment
            && self.count < self.max_segments
            && self.len + size <= MAX_BATCH_BYTES;
        if joins {
            self.len += size;
            self.count += 1;
            self.closed = size < self.segment;
        }
        joins
    }

    /// After the batch was sent (and not cleared: the datagram that did not fit still lies after it): starts a
    /// new batch with that datagram, moved to the front.
    pub fn restart_with(&mut self, size: usize, destination: SocketAddr) {
        let from = self.len;
        self.buf.copy_within(from..from + size, 0);
        self.start(size, destination);
    }

    fn start(&mut self, size: usize, destination: SocketAddr) {
        self.len = size;
        self.segment = size;
        self.count = 1;
        self.destination = Some(destination);
        self.closed = false;
    }

    /// Whether no further datagram could join (send it now).
    pub fn full(&self) -> bool {
        self.closed || self.count >= self.max_segments || self.len + self.segment > MAX_BATCH_BYTES
    }

    pub fn pending(&self) -> Option<Pending<'_>> {
        Some(Pending {
            destination: self.destination.filter(|_| self.count > 0)?,
            contents: &self.buf[..self.len],
            segment_size: (self.count > 1).then_some(self.segment),
            count: self.count,
        })
    }

    pub fn clear(&mut self) {
        self.len = 0;
        self.count = 0;
        self.destination = None;
        self.closed = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(batch: &mut SendBatch, fill: u8, size: usize) {
        batch.slot()[..size].fill(fill);
    }

    #[test]
    fn equal_datagrams_to_one_peer_share_a_send_and_a_short_one_ends_it() {
        let (peer, other): (SocketAddr, SocketAddr) = ("192.0.2.1:1".parse().unwrap(), "192.0.2.2:1".parse().unwrap());
        let mut batch = SendBatch::new(20, 64);
        assert_eq!(batch.pending(), None);
        for fill in 1..=3 {
            build(&mut batch, fill, 100);
            assert!(batch.push(100, peer));
        }
        build(&mut batch, 4, 60);
        assert!(batch.push(60, peer), "a shorter last segment joins");
        assert!(batch.full(), "and ends the run");
        build(&mut batch, 5, 100);
        assert!(!batch.push(100, peer));
        let pending = batch.pending().unwrap();
        assert_eq!((pending.destination, pending.segment_size, pending.count), (peer, Some(100), 4));
        assert_eq!(pending.contents.len(), 360);
        assert_eq!((pending.contents[0], pending.contents[299], pending.contents[359]), (1, 3, 4));
        batch.restart_with(100, peer);
        let pending = batch.pending().unwrap();
        assert_eq!((pending.segment_size, pending.count, pending.contents[99]), (None, 1, 5));
        // Another destination, or a larger datagram, starts a new batch.
        build(&mut batch, 6, 100);
        assert!(!batch.push(100, other));
        build(&mut batch, 6, 120);
        assert!(!batch.push(120, peer));
        batch.clear();
        assert!(batch.is_empty() && batch.pending().is_none());
    }

    #[test]
    fn batches_respect_the_segment_and_byte_limits() {
        let peer: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let mut batch = SendBatch::new(20, 3);
        for _ in 0..3 {
            assert!(batch.push(1000, peer));
        }
        assert!(batch.full());
        assert!(!batch.push(1000, peer));
        let mut batch = SendBatch::new(20, 64);
        let mut sent = 0;
        while batch.push(1500, peer) {
            sent += 1;
        }
        assert_eq!(sent, MAX_BATCH_BYTES / 1500);
        batch.set_max_segments(1);
        batch.clear();
        assert!(batch.push(1500, peer));
        assert!(batch.full(), "without GSO every datagram goes alone");
    }
}
