//! The rtnetlink messages the network phase exchanges, as bytes: five requests encoded and the
//! replies decoded (links: index, name and MAC; acks and errors with the kernel's extended-ack
//! text). Pure functions over byte slices, so every layout is unit-tested on the host; the
//! tests check the requests byte for byte against the `netlink-packet-route` crate's encoder.
//!
//! Hand-written rather than that crate: it covers every rtnetlink family (traffic control,
//! rules, neighbours, ...), which cost ~25 s of CPU per arch to compile on every first build,
//! for the five fixed layouts below (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h,
//! linux/if_addr.h). Everything is in the host's byte order, as netlink is.

use std::net::Ipv4Addr;

use guest_protocol::config::MacAddress;

use crate::network::Link;

// nlmsghdr flags (linux/netlink.h).
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
/// In an error reply: the request is echoed as its header only.
const NLM_F_CAPPED: u16 = 0x100;

// Control message types.
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;

// RTM_* message types.
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;

// Attribute types.
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
/// `NLMSGERR_ATTR_MSG`: the extended ack's text.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// `NLA_F_NESTED | NLA_F_NET_BYTEORDER`: flag bits, not part of an attribute's type.
const NLA_TYPE_MASK: u16 = !0xc000;

const AF_INET: u8 = 2;
const IFF_UP: u32 = 1;
const RT_TABLE_MAIN: u8 = 254;
/// `RTPROT_BOOT`: `ip route add` marks static routes as boot-time ones.
const RTPROT_BOOT: u8 = 3;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RTN_UNICAST: u8 = 1;

/// `struct nlmsghdr`.
const HEADER_LEN: usize = 16;
/// `struct ifinfomsg`, before a link's attributes.
const LINK_HEADER_LEN: usize = 16;

/// One request: its type, flags and body (the fixed header and its attributes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    kind: u16,
    pub flags: u16,
    body: Vec<u8>,
}

impl Request {
    /// `RTM_GETLINK`, dump: every interface.
    pub fn links() -> Request {
        Request {
            kind: RTM_GETLINK,
            flags: NLM_F_REQUEST | NLM_F_DUMP,
            body: link_header(0, 0, 0),
        }
    }

    /// `RTM_SETLINK` with `IFLA_MTU`.
    pub fn set_mtu(link: u32, mtu: u32) -> Request {
        let mut body = link_header(link, 0, 0);
        attribute(&mut body, IFLA_MTU, &mtu.to_ne_bytes());
        Request::acked(RTM_SETLINK, 0, body)
    }

    /// `RTM_SETLINK` setting `IFF_UP` and only it.
    pub fn set_up(link: u32) -> Request {
        Request::acked(RTM_SETLINK, 0, link_header(link, IFF_UP, IFF_UP))
    }

    /// `RTM_NEWADDR`: `ip addr add IP/PREFIX dev LINK`, with the subnet's broadcast address.
    pub fn add_address(link: u32, ip: Ipv4Addr, prefix_len: u8) -> Request {
        // struct ifaddrmsg: family, prefix length, flags, scope, index.
        let mut body = vec![AF_INET, prefix_len, 0, RT_SCOPE_UNIVERSE];
        body.extend(link.to_ne_bytes());
        attribute(&mut body, IFA_LOCAL, &ip.octets());
        attribute(&mut body, IFA_ADDRESS, &ip.octets());
        if let Some(broadcast) = broadcast(ip, prefix_len) {
            attribute(&mut body, IFA_BROADCAST, &broadcast.octets());
        }
        Request::acked(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body)
    }

    /// `RTM_NEWROUTE`: `ip route add default via GATEWAY dev LINK`.
    pub fn add_default_route(link: u32, gateway: Ipv4Addr) -> Request {
        // struct rtmsg: family, dst and src prefix lengths, tos, table, protocol, scope, type,
        // flags.
        let mut body = vec![
            AF_INET,
            0,
            0,
            0,
            RT_TABLE_MAIN,
            RTPROT_BOOT,
            RT_SCOPE_UNIVERSE,
            RTN_UNICAST,
        ];
        body.extend(0u32.to_ne_bytes());
        attribute(&mut body, RTA_GATEWAY, &gateway.octets());
        attribute(&mut body, RTA_OIF, &link.to_ne_bytes());
        Request::acked(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body)
    }

    fn acked(kind: u16, flags: u16, body: Vec<u8>) -> Request {
        Request {
            kind,
            flags: NLM_F_REQUEST | NLM_F_ACK | flags,
            body,
        }
    }

    /// The message as sent: header (port 0, the kernel fills in ours) and body.
    pub fn encode(&self, sequence: u32) -> Vec<u8> {
        let len = HEADER_LEN + self.body.len();
        let mut bytes = Vec::with_capacity(len);
        bytes.extend((len as u32).to_ne_bytes());
        bytes.extend(self.kind.to_ne_bytes());
        bytes.extend(self.flags.to_ne_bytes());
        bytes.extend(sequence.to_ne_bytes());
        bytes.extend(0u32.to_ne_bytes());
        bytes.extend(&self.body);
        bytes
    }
}

/// `struct ifinfomsg`: family unspecified, the link's index and the flags to change.
fn link_header(index: u32, flags: u32, change: u32) -> Vec<u8> {
    let mut header = vec![0, 0, 0, 0];
    header.extend(index.to_ne_bytes());
    header.extend(flags.to_ne_bytes());
    header.extend(change.to_ne_bytes());
    header
}

/// Appends one attribute, padded to 4 bytes.
fn attribute(body: &mut Vec<u8>, kind: u16, value: &[u8]) {
    body.extend(((4 + value.len()) as u16).to_ne_bytes());
    body.extend(kind.to_ne_bytes());
    body.extend(value);
    body.resize(body.len().next_multiple_of(4), 0);
}

/// The subnet's broadcast address, as `ip addr add` sets it; none for /31 and /32.
pub fn broadcast(ip: Ipv4Addr, prefix_len: u8) -> Option<Ipv4Addr> {
    (prefix_len < 31).then(|| {
        let host_bits = u32::MAX.checked_shr(u32::from(prefix_len)).unwrap_or(0);
        Ipv4Addr::from(u32::from(ip) | host_bits)
    })
}

/// One message of a reply datagram.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// An interface (`RTM_NEWLINK`): index, name and MAC; the driver is left for sysfs.
    Link(Link),
    /// The end of a dump, with its status (0, or a negative errno if the dump failed).
    Done { error: i32, message: Option<String> },
    /// An ack (`error` 0) or a refusal (a negative errno), with the extended-ack text.
    Ack { error: i32, message: Option<String> },
    /// Anything else (a no-op, an overrun, another message type): passed over.
    Other,
}

/// Why a reply could not be read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("undecodable netlink reply at byte {offset}: {what}")]
pub struct DecodeError {
    pub offset: usize,
    pub what: &'static str,
}

/// Every message in one datagram from the kernel.
pub fn parse(datagram: &[u8]) -> Result<Vec<Reply>, DecodeError> {
    let mut replies = Vec::new();
    let mut offset = 0;
    while offset < datagram.len() {
        let error = |what| DecodeError { offset, what };
        let rest = &datagram[offset..];
        if rest.len() < HEADER_LEN {
            return Err(error("shorter than a message header"));
        }
        let len = u32_at(rest, 0) as usize;
        if len < HEADER_LEN || len > rest.len() {
            return Err(error("message length outside the datagram"));
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let flags = u16::from_ne_bytes([rest[6], rest[7]]);
        let payload = &rest[HEADER_LEN..len];
        replies.push(match kind {
            RTM_NEWLINK => Reply::Link(link(payload).ok_or_else(|| error("short link message"))?),
            NLMSG_ERROR => {
                let status = payload
                    .get(..4)
                    .ok_or_else(|| error("error status missing"))?;
                Reply::Ack {
                    error: i32::from_ne_bytes(status.try_into().expect("4 bytes")),
                    message: ext_ack_message(flags, &payload[4..]),
                }
            }
            // A dump's end carries its status; tolerate one without.
            NLMSG_DONE => Reply::Done {
                error: payload.get(..4).map_or(0, |status| {
                    i32::from_ne_bytes(status.try_into().expect("4 bytes"))
                }),
                message: attributes_message(payload.get(4..).unwrap_or_default()),
            },
            _ => Reply::Other,
        });
        offset += len.next_multiple_of(4);
    }
    Ok(replies)
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
}

/// A link's index, name and MAC address; `None` when the fixed header is cut short.
fn link(payload: &[u8]) -> Option<Link> {
    let header = payload.get(..LINK_HEADER_LEN)?;
    let mut link = Link {
        index: u32_at(header, 4),
        name: String::new(),
        mac: None,
        driver: None,
    };
    for (kind, value) in attributes(&payload[LINK_HEADER_LEN..]) {
        match kind {
            IFLA_IFNAME => {
                let name = value.split(|b| *b == 0).next().unwrap_or_default();
                link.name = String::from_utf8_lossy(name).into_owned();
            }
            IFLA_ADDRESS => link.mac = <[u8; 6]>::try_from(value).ok().map(MacAddress),
            _ => {}
        }
    }
    Some(link)
}

/// The attributes in `bytes`, as (type, value); stops at the first malformed one.
fn attributes(mut bytes: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes([*bytes.first()?, *bytes.get(1)?]));
        let kind = u16::from_ne_bytes([*bytes.get(2)?, *bytes.get(3)?]) & NLA_TYPE_MASK;
        if len < 4 || len > bytes.len() {
            return None;
        }
        let value = &bytes[4..len];
        bytes = bytes.get(len.next_multiple_of(4)..).unwrap_or_default();
        Some((kind, value))
    })
}

/// The extended ack's text from an error's payload after the status: the request (its header
/// only when the kernel capped it, `NLM_F_CAPPED`), then attributes.
fn ext_ack_message(flags: u16, payload: &[u8]) -> Option<String> {
    let request_len = if flags & NLM_F_CAPPED != 0 {
        HEADER_LEN
    } else {
        u32::from_ne_bytes(payload.get(..4)?.try_into().ok()?) as usize
    };
    attributes_message(payload.get(request_len.next_multiple_of(4)..)?)
}

/// The `NLMSGERR_ATTR_MSG` text among `attributes`, if there is a non-empty one.
fn attributes_message(attributes_bytes: &[u8]) -> Option<String> {
    let (_, text) = attributes(attributes_bytes).find(|(kind, _)| *kind == NLMSGERR_ATTR_MSG)?;
    let text = text.split(|b| *b == 0).next().unwrap_or_default();
    Some(String::from_utf8_lossy(text).into_owned()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use netlink_packet_core::{
        NLM_F_CREATE as CRATE_CREATE, NLM_F_EXCL as CRATE_EXCL, NetlinkHeader, NetlinkMessage,
        NetlinkPayload, NetlinkSerializable,
    };
    use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
    use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
    use netlink_packet_route::route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    };
    use netlink_packet_route::{AddressFamily, RouteNetlinkMessage as Crate};

    use super::*;

    /// The crate's bytes for `message` with `flags` and sequence number 1.
    fn crate_encoded<I: NetlinkSerializable>(message: I, flags: u16) -> Vec<u8> {
        let mut packet = NetlinkMessage::new(
            NetlinkHeader::default(),
            NetlinkPayload::InnerMessage(message),
        );
        packet.header.flags = flags;
        packet.header.sequence_number = 1;
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        bytes
    }

    const IP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 15);
    const GATEWAY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    #[test]
    fn link_requests_encode_as_the_crate_does() {
        let dump = crate_encoded(
            Crate::GetLink(LinkMessage::default()),
            NLM_F_REQUEST | NLM_F_DUMP,
        );
        assert_eq!(Request::links().encode(1), dump);

        let mut mtu = LinkMessage::default();
        mtu.header.index = 2;
        mtu.attributes.push(LinkAttribute::Mtu(1400));
        let acked = NLM_F_REQUEST | NLM_F_ACK;
        assert_eq!(
            Request::set_mtu(2, 1400).encode(1),
            crate_encoded(Crate::SetLink(mtu), acked)
        );

        let mut up = LinkMessage::default();
        up.header.index = 2;
        up.header.flags = LinkFlags::Up;
        up.header.change_mask = LinkFlags::Up;
        assert_eq!(
            Request::set_up(2).encode(1),
            crate_encoded(Crate::SetLink(up), acked)
        );
    }

    fn crate_address(prefix_len: u8) -> Vec<u8> {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.prefix_len = prefix_len;
        message.header.index = 3;
        message.header.scope = AddressScope::Universe;
        let attributes = &mut message.attributes;
        attributes.push(AddressAttribute::Local(IpAddr::V4(IP)));
        attributes.push(AddressAttribute::Address(IpAddr::V4(IP)));
        if let Some(broadcast) = broadcast(IP, prefix_len) {
            attributes.push(AddressAttribute::Broadcast(broadcast));
        }
        let flags = NLM_F_REQUEST | NLM_F_ACK | CRATE_CREATE | CRATE_EXCL;
        crate_encoded(Crate::NewAddress(message), flags)
    }

    #[test]
    fn address_requests_encode_as_the_crate_does_with_and_without_broadcast() {
        assert_eq!(Request::add_address(3, IP, 24).encode(1), crate_address(24));
        assert_eq!(Request::add_address(3, IP, 32).encode(1), crate_address(32));
    }

    #[test]
    fn the_default_route_encodes_as_the_crate_does() {
        let mut message = RouteMessage::default();
        message.header.address_family = AddressFamily::Inet;
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        message.header.protocol = RouteProtocol::Boot;
        message.header.scope = RouteScope::Universe;
        message.header.kind = RouteType::Unicast;
        message
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(GATEWAY)));
        message.attributes.push(RouteAttribute::Oif(3));
        let flags = NLM_F_REQUEST | NLM_F_ACK | CRATE_CREATE | CRATE_EXCL;
        assert_eq!(
            Request::add_default_route(3, GATEWAY).encode(1),
            crate_encoded(Crate::NewRoute(message), flags)
        );
    }

    #[test]
    fn broadcast_is_the_last_address_of_the_subnet() {
        let ip = Ipv4Addr::new(192, 0, 2, 15);
        assert_eq!(broadcast(ip, 24), Some(Ipv4Addr::new(192, 0, 2, 255)));
        assert_eq!(broadcast(ip, 25), Some(Ipv4Addr::new(192, 0, 2, 127)));
        assert_eq!(broadcast(ip, 0), Some(Ipv4Addr::BROADCAST));
        assert_eq!(broadcast(ip, 31), None);
        assert_eq!(broadcast(ip, 32), None);
    }

    /// A link as the kernel would send it, encoded by the crate.
    fn crate_link(index: u32, attributes: Vec<LinkAttribute>) -> Vec<u8> {
        let mut link = LinkMessage::default();
        link.header.index = index;
        link.attributes = attributes;
        crate_encoded(Crate::NewLink(link), 0)
    }

    #[test]
    fn link_replies_keep_index_name_and_mac_and_pass_the_rest_over() {
        let mut datagram = crate_link(
            7,
            vec![
                LinkAttribute::Mtu(1500),
                LinkAttribute::IfName("eth0".into()),
                LinkAttribute::Address(vec![0x52, 0x54, 0, 1, 2, 3]),
            ],
        );
        datagram.extend(crate_link(1, vec![LinkAttribute::IfName("lo".into())]));
        datagram.extend(crate_encoded(Crate::NewRoute(RouteMessage::default()), 0));
        let replies = parse(&datagram).unwrap();
        let eth0 = Link {
            index: 7,
            name: "eth0".into(),
            mac: Some(MacAddress([0x52, 0x54, 0, 1, 2, 3])),
            driver: None,
        };
        let lo = Link {
            index: 1,
            name: "lo".into(),
            mac: None,
            driver: None,
        };
        assert_eq!(replies, [Reply::Link(eth0), Reply::Link(lo), Reply::Other]);
    }

    /// A control message (`NLMSG_ERROR` or `NLMSG_DONE`) as the kernel sends it.
    fn control(kind: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
        let mut bytes = ((HEADER_LEN + payload.len()) as u32).to_ne_bytes().to_vec();
        bytes.extend(kind.to_ne_bytes());
        bytes.extend(flags.to_ne_bytes());
        bytes.extend([0; 8]);
        bytes.extend(payload);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes
    }

    fn with_attribute(mut bytes: Vec<u8>, kind: u16, value: &[u8]) -> Vec<u8> {
        attribute(&mut bytes, kind, value);
        bytes
    }

    #[test]
    fn acks_and_refusals_carry_the_status_and_the_extended_ack_after_a_capped_request() {
        let ack = control(NLMSG_ERROR, NLM_F_CAPPED, &[0; 20]);
        let mut refusal = (-libc::EINVAL).to_ne_bytes().to_vec();
        refusal.extend(&Request::set_up(2).encode(1)[..HEADER_LEN]);
        let refusal = with_attribute(refusal, 2, &7u32.to_ne_bytes()); // NLMSGERR_ATTR_OFFS
        let refusal = with_attribute(refusal, NLMSGERR_ATTR_MSG, b"Nexthop has invalid gateway\0");
        let mut datagram = ack;
        datagram.extend(control(NLMSG_ERROR, NLM_F_CAPPED | 0x200, &refusal));
        assert_eq!(
            parse(&datagram).unwrap(),
            [
                Reply::Ack {
                    error: 0,
                    message: None
                },
                Reply::Ack {
                    error: -libc::EINVAL,
                    message: Some("Nexthop has invalid gateway".into())
                },
            ]
        );
    }

    #[test]
    fn the_extended_ack_follows_a_full_echoed_request() {
        let request = Request::set_mtu(2, 70_000).encode(1);
        let mut payload = (-libc::EINVAL).to_ne_bytes().to_vec();
        payload.extend(&request);
        let payload = with_attribute(
            payload,
            NLMSGERR_ATTR_MSG,
            b"mtu greater than device maximum\0",
        );
        assert_eq!(
            parse(&control(NLMSG_ERROR, 0, &payload)).unwrap(),
            [Reply::Ack {
                error: -libc::EINVAL,
                message: Some("mtu greater than device maximum".into())
            }]
        );
    }

    #[test]
    fn a_dump_ends_with_its_status() {
        let done = control(NLMSG_DONE, 0, &0i32.to_ne_bytes());
        let failed = control(NLMSG_DONE, 0, &(-libc::EINTR).to_ne_bytes());
        let bare = control(NLMSG_DONE, 0, &[]);
        let ok = Reply::Done {
            error: 0,
            message: None,
        };
        assert_eq!(parse(&done).unwrap(), [ok]);
        assert_eq!(
            parse(&failed).unwrap(),
            [Reply::Done {
                error: -libc::EINTR,
                message: None
            }]
        );
        assert_eq!(
            parse(&bare).unwrap(),
            [Reply::Done {
                error: 0,
                message: None
            }]
        );
    }

    #[test]
    fn a_garbled_or_textless_error_has_no_message() {
        let mut garbled = 0i32.to_ne_bytes().to_vec();
        garbled.extend([0; HEADER_LEN]);
        garbled.extend([200, 0, 1, 0, b'x']);
        let textless = [0; 4 + HEADER_LEN];
        for payload in [&garbled[..], &textless] {
            let replies = parse(&control(NLMSG_ERROR, NLM_F_CAPPED, payload)).unwrap();
            assert_eq!(
                replies,
                [Reply::Ack {
                    error: 0,
                    message: None
                }]
            );
        }
    }

    #[test]
    fn cut_short_datagrams_are_refused_with_where() {
        let link = crate_link(7, vec![LinkAttribute::IfName("eth0".into())]);
        let mut two = link.clone();
        two.extend(&link[..10]);
        assert_eq!(
            parse(&two),
            Err(DecodeError {
                offset: link.len(),
                what: "shorter than a message header"
            })
        );
        let mut lying = link.clone();
        lying[..4].copy_from_slice(&(link.len() as u32 + 4).to_ne_bytes());
        assert_eq!(
            parse(&lying).unwrap_err().what,
            "message length outside the datagram"
        );
        let short_link = control(RTM_NEWLINK, 0, &[0; 8]);
        assert_eq!(parse(&short_link).unwrap_err().what, "short link message");
        let statusless = control(NLMSG_ERROR, 0, &[]);
        assert_eq!(parse(&statusless).unwrap_err().what, "error status missing");
    }
}
