//! IPv4 packet parsing and in-place rewriting for the proxy: validation with etherparse slices, address rewrites
//! with incremental checksum updates (RFC 1624) and TCP MSS clamping. No I/O, no allocation.

use etherparse::{IpNumber, Ipv4HeaderSlice, TcpHeaderSlice, UdpHeaderSlice};
use std::net::Ipv4Addr;

const IPV4_HEADER_LEN: usize = 20;
const IPV4_SRC: usize = 12;
const IPV4_DST: usize = 16;
const IPV4_CHECKSUM: usize = 10;
const TCP_CHECKSUM: usize = 16;
const UDP_CHECKSUM: usize = 6;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_HEADER_LEN: usize = 8;
const TCP_OPTION_END: u8 = 0;
const TCP_OPTION_NOP: u8 = 1;
const TCP_OPTION_MSS: u8 = 2;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;

/// Why a packet could not be handled. Every variant is a counted drop, never a panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Not an IPv4 packet (IPv6 is not carried yet).
    NotIpv4,
    /// Truncated, bad IHL or total length, or a truncated transport header.
    BadHeader,
    /// IPv4 options are not supported by the proxy.
    IpOptions,
    /// Fragments cannot be translated at L4 (ports are only in the first fragment).
    Fragment,
    /// Neither TCP, UDP nor ICMP.
    UnsupportedProtocol,
    /// ICMP other than echo request/reply.
    UnsupportedIcmp,
}

/// The transport protocol of a parsed packet (its IANA protocol number as discriminant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Protocol {
    Icmp = 1,
    Tcp = 6,
    Udp = 17,
}

/// What the proxy needs to know about a valid packet. For ICMP echo the identifier stands in for a port:
/// a request has `(src_port, dst_port) = (id, 0)` and a reply `(0, id)`, so a reply matches its request's reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    pub protocol: Protocol,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags byte (FIN, SYN, RST, ...); 0 for other protocols.
    pub tcp_flags: u8,
    /// Length of the IP packet (its total length field), `<= buf.len()`.
    pub len: usize,
}

/// Validates an IPv4 packet and extracts its addresses, ports and flags.
pub fn parse(buf: &[u8]) -> Result<PacketInfo, Malformed> {
    if buf.first().is_some_and(|b| b >> 4 != 4) {
        return Err(Malformed::NotIpv4);
    }
    let ip = Ipv4HeaderSlice::from_slice(buf).map_err(|_| Malformed::BadHeader)?;
    let total_len = usize::from(ip.total_len());
    if total_len > buf.len() || total_len < IPV4_HEADER_LEN {
        return Err(Malformed::BadHeader);
    }
    if usize::from(ip.ihl()) * 4 != IPV4_HEADER_LEN {
        return Err(Malformed::IpOptions);
    }
    if ip.is_fragmenting_payload() {
        return Err(Malformed::Fragment);
    }
    let l4 = &buf[IPV4_HEADER_LEN..total_len];
    let (protocol, src_port, dst_port, tcp_flags) = match ip.protocol() {
        IpNumber::TCP => {
            let tcp = TcpHeaderSlice::from_slice(l4).map_err(|_| Malformed::BadHeader)?;
            (Protocol::Tcp, tcp.source_port(), tcp.destination_port(), l4[13])
        }
        IpNumber::UDP => {
            let udp = UdpHeaderSlice::from_slice(l4).map_err(|_| Malformed::BadHeader)?;
            let udp_len = usize::from(udp.length());
            if udp_len < 8 || udp_len > l4.len() {
                return Err(Malformed::BadHeader);
            }
            (Protocol::Udp, udp.source_port(), udp.destination_port(), 0)
        }
        IpNumber::ICMP => {
            if l4.len() < ICMP_HEADER_LEN {
                return Err(Malformed::BadHeader);
            }
            let id = u16::from_be_bytes([l4[4], l4[5]]);
            match (l4[0], l4[1]) {
                (ICMP_ECHO_REQUEST, 0) => (Protocol::Icmp, id, 0, 0),
                (ICMP_ECHO_REPLY, 0) => (Protocol::Icmp, 0, id, 0),
                _ => return Err(Malformed::UnsupportedIcmp),
            }
        }
        _ => return Err(Malformed::UnsupportedProtocol),
    };
    Ok(PacketInfo {
        protocol,
        src: ip.source_addr(),
        dst: ip.destination_addr(),
        src_port,
        dst_port,
        tcp_flags,
        len: total_len,
    })
}

/// RFC 1624 eqn. 3: `HC' = ~(~HC + ~m + m')` over the 16-bit words of `old` -> `new`.
fn checksum_update(checksum: u16, old: &[u8; 8], new: &[u8; 8]) -> u16 {
    let mut sum = u32::from(!checksum);
    for i in (0..8).step_by(2) {
        sum += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        sum += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn write_u16(buf: &mut [u8], at: usize, value: u16) {
    buf[at..at + 2].copy_from_slice(&value.to_be_bytes());
}

/// Rewrites source and destination addresses of a packet `parse` accepted, updating the IPv4 and (for TCP and
/// UDP, whose checksums cover a pseudo-header) the transport checksum incrementally. A zero UDP checksum means
/// "none" and stays zero.
pub fn rewrite_addresses(buf: &mut [u8], info: &PacketInfo, new_src: Ipv4Addr, new_dst: Ipv4Addr) {
    let mut old = [0u8; 8];
    old.copy_from_slice(&buf[IPV4_SRC..IPV4_DST + 4]);
    let mut new = [0u8; 8];
    new[..4].copy_from_slice(&new_src.octets());
    new[4..].copy_from_slice(&new_dst.octets());
    if old == new {
        return;
    }
    buf[IPV4_SRC..IPV4_DST + 4].copy_from_slice(&new);
    let ip_sum = checksum_update(read_u16(buf, IPV4_CHECKSUM), &old, &new);
    write_u16(buf, IPV4_CHECKSUM, ip_sum);
    match info.protocol {
        Protocol::Tcp => {
            let at = IPV4_HEADER_LEN + TCP_CHECKSUM;
            let sum = checksum_update(read_u16(buf, at), &old, &new);
            write_u16(buf, at, sum);
        }
        Protocol::Udp => {
            let at = IPV4_HEADER_LEN + UDP_CHECKSUM;
            let current = read_u16(buf, at);
            if current != 0 {
                let sum = checksum_update(current, &old, &new);
                write_u16(buf, at, if sum == 0 { 0xffff } else { sum });
            }
        }
        Protocol::Icmp => {}
    }
}

/// Lowers the MSS option of a TCP SYN to `max_mss` so segments fit the tunnel. Returns whether it changed.
pub fn clamp_mss(buf: &mut [u8], info: &PacketInfo, max_mss: u16) -> bool {
    if info.protocol != Protocol::Tcp || info.tcp_flags & TCP_SYN == 0 {
        return false;
    }
    let tcp_start = IPV4_HEADER_LEN;
    let data_offset = usize::from(buf[tcp_start + 12] >> 4) * 4;
    let options_end = (tcp_start + data_offset).min(info.len);
    let mut at = tcp_start + 20;
    while at < options_end {
        match buf[at] {
            TCP_OPTION_END => return false,
            TCP_OPTION_NOP => at += 1,
            kind => {
                if at + 1 >= options_end {
                    return false;
                }
                let len = usize::from(buf[at + 1]);
                if len < 2 || at + len > options_end {
                    return false;
                }
                if kind == TCP_OPTION_MSS && len == 4 {
                    let mss = read_u16(buf, at + 2);
                    if mss <= max_mss {
                        return false;
                    }
                    write_u16(buf, at + 2, max_mss);
                    // The option need not be 16-bit aligned: update the aligned words that cover it. Bytes that
                    // did not change cancel out in the update, whatever their value.
                    let word_start = (at + 2) & !1;
                    let covered = (buf.len() - word_start).min(4);
                    let checksum_at = tcp_start + TCP_CHECKSUM;
                    let mut old = [0u8; 8];
                    let mut new = [0u8; 8];
                    new[..covered].copy_from_slice(&buf[word_start..word_start + covered]);
                    old[..covered].copy_from_slice(&new[..covered]);
                    let offset = at + 2 - word_start;
                    old[offset..offset + 2].copy_from_slice(&mss.to_be_bytes());
                    let sum = checksum_update(read_u16(buf, checksum_at), &old, &new);
                    write_u16(buf, checksum_at, sum);
                    return true;
                }
                at += len;
            }
        }
    }
    false
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};
    use proptest::prelude::*;

    pub fn tcp_packet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, syn: bool, payload: &[u8]) -> Vec<u8> {
        let mut builder = PacketBuilder::ipv4(src, dst, 64).tcp(sport, dport, 1000, 64000);
        if syn {
            builder = builder.syn();
            builder = builder.options(&[etherparse::TcpOptionElement::MaximumSegmentSize(1460)]).expect("options fit");
        }
        let mut out = Vec::new();
        builder.write(&mut out, payload).expect("writing a test packet");
        out
    }

    pub fn udp_packet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ipv4(src, dst, 64).udp(sport, dport).write(&mut out, payload).expect("writing");
        out
    }

    pub fn icmp_echo(src: [u8; 4], dst: [u8; 4], id: u16, seq: u16, reply: bool) -> Vec<u8> {
        let builder = PacketBuilder::ipv4(src, dst, 64);
        let builder = if reply { builder.icmpv4_echo_reply(id, seq) } else { builder.icmpv4_echo_request(id, seq) };
        let mut out = Vec::new();
        builder.write(&mut out, b"ping").expect("writing");
        out
    }

    /// Recomputes every checksum from scratch with etherparse and compares it to what the packet carries.
    pub fn assert_checksums_valid(buf: &[u8]) {
        let sliced = SlicedPacket::from_ip(buf).expect("valid packet");
        let ip = etherparse::Ipv4HeaderSlice::from_slice(buf).unwrap();
        assert_eq!(ip.header_checksum(), ip.to_header().calc_header_checksum(), "IPv4 checksum");
        match sliced.transport {
            Some(TransportSlice::Tcp(tcp)) => {
                let expected = tcp.to_header().calc_checksum_ipv4(&ip.to_header(), tcp.payload()).unwrap();
                assert_eq!(tcp.checksum(), expected, "TCP checksum");
            }
            Some(TransportSlice::Udp(udp)) if udp.checksum() != 0 => {
                let expected = udp.to_header().calc_checksum_ipv4(&ip.to_header(), udp.payload()).unwrap();
                assert_eq!(udp.checksum(), expected, "UDP checksum");
            }
            _ => {}
        }
    }

    #[test]
    fn parses_tcp_udp_and_echo() {
        let tcp = tcp_packet([10, 16, 0, 2], [10, 30, 0, 5], 40000, 80, true, b"");
        let info = parse(&tcp).unwrap();
        assert_eq!((info.protocol, info.src_port, info.dst_port), (Protocol::Tcp, 40000, 80));
        assert_ne!(info.tcp_flags & TCP_SYN, 0);
        let udp = udp_packet([10, 16, 0, 2], [10, 30, 0, 5], 5000, 53, b"q");
        assert_eq!(parse(&udp).unwrap().protocol, Protocol::Udp);
        let request = parse(&icmp_echo([10, 16, 0, 2], [10, 30, 0, 5], 77, 1, false)).unwrap();
        assert_eq!((request.src_port, request.dst_port), (77, 0));
        let reply = parse(&icmp_echo([10, 30, 0, 5], [10, 16, 0, 2], 77, 1, true)).unwrap();
        assert_eq!((reply.src_port, reply.dst_port), (0, 77));
    }

    #[test]
    fn rejects_bad_input() {
        let udp = udp_packet([10, 16, 0, 2], [10, 30, 0, 5], 5000, 53, b"hello");
        assert_eq!(parse(&udp[..10]), Err(Malformed::BadHeader));
        assert_eq!(parse(&udp[..24]), Err(Malformed::BadHeader), "truncated UDP header");
        let mut fragment = udp.clone();
        fragment[6] |= 0x20; // more fragments
        assert_eq!(parse(&fragment), Err(Malformed::Fragment));
        let mut gre = udp.clone();
        gre[9] = 47;
        assert_eq!(parse(&gre), Err(Malformed::UnsupportedProtocol));
        let mut bad_ihl = udp.clone();
        bad_ihl[0] = 0x44;
        assert_eq!(parse(&bad_ihl), Err(Malformed::BadHeader));
        let mut options = udp.clone();
        options[0] = 0x46;
        assert_eq!(parse(&options), Err(Malformed::IpOptions));
        let mut unreachable = icmp_echo([10, 16, 0, 2], [10, 30, 0, 5], 1, 1, false);
        unreachable[20] = 3;
        assert_eq!(parse(&unreachable), Err(Malformed::UnsupportedIcmp));
        let mut ipv6 = udp;
        ipv6[0] = 0x60;
        assert_eq!(parse(&ipv6), Err(Malformed::NotIpv4));
    }

    #[test]
    fn udp_zero_checksum_stays_zero() {
        let mut udp = udp_packet([10, 16, 0, 2], [10, 30, 0, 5], 5000, 53, b"hello");
        udp[26] = 0;
        udp[27] = 0;
        let info = parse(&udp).unwrap();
        rewrite_addresses(&mut udp, &info, Ipv4Addr::new(10, 30, 1, 1), Ipv4Addr::new(10, 16, 0, 70));
        assert_eq!(&udp[26..28], &[0, 0]);
        assert_checksums_valid(&udp);
    }

    #[test]
    fn mss_is_clamped_with_valid_checksum() {
        let mut syn = tcp_packet([10, 16, 0, 2], [10, 30, 0, 5], 40000, 80, true, b"");
        let info = parse(&syn).unwrap();
        assert!(clamp_mss(&mut syn, &info, 1380));
        let tcp = TcpHeaderSlice::from_slice(&syn[20..]).unwrap();
        let mss = tcp.options_iterator().find_map(|o| match o {
            Ok(etherparse::TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
            _ => None,
        });
        assert_eq!(mss, Some(1380));
        assert_checksums_valid(&syn);
        assert!(!clamp_mss(&mut syn, &info, 1400), "never raises the MSS");
    }

    proptest! {
        #[test]
        fn rewrite_keeps_checksums_valid(
            src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), new_src in any::<[u8; 4]>(),
            new_dst in any::<[u8; 4]>(), sport in any::<u16>(), dport in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 0..64), kind in 0u8..3,
        ) {
            let mut packet = match kind {
                0 => tcp_packet(src, dst, sport, dport, sport % 2 == 0, &payload),
                1 => udp_packet(src, dst, sport, dport, &payload),
                _ => icmp_echo(src, dst, sport, dport, false),
            };
            let info = parse(&packet).unwrap();
            rewrite_addresses(&mut packet, &info, new_src.into(), new_dst.into());
            let after = parse(&packet).unwrap();
            prop_assert_eq!(after.src, Ipv4Addr::from(new_src));
            prop_assert_eq!(after.dst, Ipv4Addr::from(new_dst));
            assert_checksums_valid(&packet);
            if clamp_mss(&mut packet, &after, 1000) { assert_checksums_valid(&packet); }
        }

        /// Fuzz: arbitrary bytes never panic the parser or the rewrites.
        #[test]
        fn garbage_never_panics(mut bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
            if let Ok(info) = parse(&bytes) {
                prop_assert!(info.len <= bytes.len());
                rewrite_addresses(&mut bytes, &info, Ipv4Addr::new(1, 2, 3, 4), Ipv4Addr::new(5, 6, 7, 8));
                clamp_mss(&mut bytes, &info, 536);
            }
        }
    }
}
