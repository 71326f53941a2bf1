//! [`Netlink`] on the kernel: `NETLINK_ROUTE` requests built by `netlink-packet-route`, replies
//! framed by `netlink-packet-core` (links: index, name and MAC only), on a blocking
//! `netlink-sys` socket (pure Rust, no C, no async runtime). One socket per request: the phase makes a handful of them. Extended acks
//! are asked for, so a refusal carries the kernel's own explanation.

use std::fs;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use guest_protocol::config::MacAddress;
use netlink_packet_core::{
    DecodeError, Emitable, NLM_F_ACK, NLM_F_CAPPED, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REQUEST, NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable, NlasIterator,
};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkHeader, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

use super::{Errno, Link, Netlink};

/// Where an interface's bound driver is linked.
const SYS_CLASS_NET: &str = "/sys/class/net";
/// Larger than any message the kernel sends (a dump part is at most 32 KiB).
const RECEIVE_BUFFER: usize = 64 * 1024;
/// `NLMSGERR_ATTR_MSG`: the extended ack's text.
const NLMSGERR_ATTR_MSG: u16 = 1;

pub struct Rtnetlink;

/// The requests the phase sends. Its own type rather than the crate's `RouteNetlinkMessage`,
/// whose codec covers every rtnetlink family (traffic control, rules, neighbours, ...): only
/// these four encoders and the link decoder end up in guest-init.
enum Request {
    GetLink(LinkMessage),
    SetLink(LinkMessage),
    NewAddress(AddressMessage),
    NewRoute(RouteMessage),
}

/// `RTM_*` message types (linux/rtnetlink.h).
const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const RTM_SETLINK: u16 = 19;
const RTM_NEWADDR: u16 = 20;
const RTM_NEWROUTE: u16 = 24;

impl Request {
    fn body(&self) -> &dyn Emitable {
        match self {
            Request::GetLink(link) | Request::SetLink(link) => link,
            Request::NewAddress(address) => address,
            Request::NewRoute(route) => route,
        }
    }
}

impl NetlinkSerializable for Request {
    fn message_type(&self) -> u16 {
        match self {
            Request::GetLink(_) => RTM_GETLINK,
            Request::SetLink(_) => RTM_SETLINK,
            Request::NewAddress(_) => RTM_NEWADDR,
            Request::NewRoute(_) => RTM_NEWROUTE,
        }
    }

    fn buffer_len(&self) -> usize {
        self.body().buffer_len()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        self.body().emit(buffer)
    }
}

/// A reply: a link's index, name and MAC, or something passed over.
enum Reply {
    Link(Link),
    Other,
}

/// `IFLA_*` attributes read from a link (linux/if_link.h).
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
/// `struct ifinfomsg`, before a link's attributes.
const LINK_HEADER_LEN: usize = 16;

impl NetlinkDeserializable for Reply {
    type Error = DecodeError;

    /// Only the two attributes the phase needs are read: the crate's full `LinkMessage`
    /// decoder knows every link kind's attributes and would double guest-init's size.
    fn deserialize(header: &NetlinkHeader, payload: &[u8]) -> Result<Reply, DecodeError> {
        if header.message_type != RTM_NEWLINK {
            return Ok(Reply::Other);
        }
        let link_header = LinkHeader::parse(payload)?;
        let mut link = Link {
            index: link_header.index,
            name: String::new(),
            mac: None,
            driver: None,
        };
        let attributes = payload.get(LINK_HEADER_LEN..).unwrap_or_default();
        for attribute in NlasIterator::new(attributes) {
            let attribute = attribute?;
            let value = attribute.value();
            match attribute.kind() {
                IFLA_IFNAME => {
                    let name = value.split(|b| *b == 0).next().unwrap_or_default();
                    link.name = String::from_utf8_lossy(name).into_owned();
                }
                IFLA_ADDRESS => link.mac = <[u8; 6]>::try_from(value).ok().map(MacAddress),
                _ => {}
            }
        }
        Ok(Reply::Link(link))
    }
}

impl Netlink for Rtnetlink {
    fn links(&self) -> Result<Vec<Link>, Errno> {
        let replies = request(Request::GetLink(LinkMessage::default()), NLM_F_DUMP)?;
        Ok(replies
            .into_iter()
            .filter_map(|reply| match reply {
                Reply::Link(mut link) => {
                    link.driver = driver(&link.name);
                    Some(link)
                }
                Reply::Other => None,
            })
            .collect())
    }

    fn set_mtu(&self, link: u32, mtu: u32) -> Result<(), Errno> {
        let mut message = LinkMessage::default();
        message.header.index = link;
        message.attributes.push(LinkAttribute::Mtu(mtu));
        request(Request::SetLink(message), NLM_F_ACK).map(drop)
    }

    fn add_address(&self, link: u32, ip: Ipv4Addr, prefix_len: u8) -> Result<(), Errno> {
        let mut message = AddressMessage::default();
        message.header.family = AddressFamily::Inet;
        message.header.prefix_len = prefix_len;
        message.header.index = link;
        message.header.scope = AddressScope::Universe;
        message
            .attributes
            .push(AddressAttribute::Local(IpAddr::V4(ip)));
        message
            .attributes
            .push(AddressAttribute::Address(IpAddr::V4(ip)));
        if let Some(broadcast) = broadcast(ip, prefix_len) {
            message
                .attributes
                .push(AddressAttribute::Broadcast(broadcast));
        }
        let flags = NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        request(Request::NewAddress(message), flags).map(drop)
    }

    fn set_up(&self, link: u32) -> Result<(), Errno> {
        let mut message = LinkMessage::default();
        message.header.index = link;
        message.header.flags = LinkFlags::Up;
        message.header.change_mask = LinkFlags::Up;
        request(Request::SetLink(message), NLM_F_ACK).map(drop)
    }

    fn add_default_route(&self, link: u32, gateway: Ipv4Addr) -> Result<(), Errno> {
        let mut message = RouteMessage::default();
        message.header.address_family = AddressFamily::Inet;
        message.header.destination_prefix_length = 0;
        message.header.table = RouteHeader::RT_TABLE_MAIN;
        // `ip route add` marks static routes as boot-time ones too.
        message.header.protocol = RouteProtocol::Boot;
        message.header.scope = RouteScope::Universe;
        message.header.kind = RouteType::Unicast;
        message
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        message.attributes.push(RouteAttribute::Oif(link));
        let flags = NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        request(Request::NewRoute(message), flags).map(drop)
    }
}

/// The driver bound to the interface's device, from sysfs (netlink does not say).
fn driver(name: &str) -> Option<String> {
    if name.is_empty() || name.contains('/') {
        return None;
    }
    let target = fs::read_link(Path::new(SYS_CLASS_NET).join(name).join("device/driver")).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// The subnet's broadcast address, as `ip addr add` sets it; none for /31 and /32.
fn broadcast(ip: Ipv4Addr, prefix_len: u8) -> Option<Ipv4Addr> {
    (prefix_len < 31).then(|| {
        let host_bits = u32::MAX.checked_shr(u32::from(prefix_len)).unwrap_or(0);
        Ipv4Addr::from(u32::from(ip) | host_bits)
    })
}

/// Send one request and collect its replies until the ack (or, for a dump, the end).
fn request(message: Request, flags: u16) -> Result<Vec<Reply>, Errno> {
    let io = |err: std::io::Error| Errno::from_io(&err);
    let mut socket = Socket::new(NETLINK_ROUTE).map_err(io)?;
    // Best effort: old kernels answer without the explanation or with the full request.
    let _ = socket.set_ext_ack(true);
    let _ = socket.set_cap_ack(true);
    socket.bind_auto().map_err(io)?;
    socket.connect(&SocketAddr::new(0, 0)).map_err(io)?;

    let mut packet = NetlinkMessage::new(
        NetlinkHeader::default(),
        NetlinkPayload::InnerMessage(message),
    );
    packet.header.flags = NLM_F_REQUEST | flags;
    packet.header.sequence_number = 1;
    packet.finalize();
    let mut bytes = vec![0; packet.buffer_len()];
    packet.serialize(&mut bytes);
    socket.send(&bytes, 0).map_err(io)?;

    let mut replies = Vec::new();
    let mut buffer: Vec<u8> = Vec::with_capacity(RECEIVE_BUFFER);
    loop {
        buffer.clear();
        let size = socket.recv(&mut buffer, libc::MSG_TRUNC).map_err(io)?;
        if size > buffer.len() {
            return Err(Errno::with_message(
                libc::EMSGSIZE,
                format!("a {size}-byte netlink reply does not fit the receive buffer"),
            ));
        }
        let mut offset = 0;
        while offset < buffer.len() {
            let reply: NetlinkMessage<Reply> = NetlinkMessage::deserialize(&buffer[offset..])
                .map_err(|err| {
                    Errno::with_message(libc::EPROTO, format!("undecodable netlink reply: {err}"))
                })?;
            let length = reply.header.length as usize;
            match reply.payload {
                NetlinkPayload::Done(_) => return Ok(replies),
                NetlinkPayload::Error(error) => {
                    return match error.code {
                        None => Ok(replies),
                        Some(code) => Err(Errno {
                            code: code.get().abs(),
                            message: ext_ack_message(reply.header.flags, &error.header),
                        }),
                    };
                }
                NetlinkPayload::InnerMessage(inner) => replies.push(inner),
                NetlinkPayload::Noop | NetlinkPayload::Overrun(_) => {}
                _ => {}
            }
            if length == 0 {
                break;
            }
            offset += length.next_multiple_of(4);
        }
        // A request without NLM_F_ACK that is not a dump ends with its one reply.
        if flags & (NLM_F_ACK | NLM_F_DUMP) == 0 {
            return Ok(replies);
        }
    }
}

/// The extended ack's text from an error's payload: the request (its header only when the
/// kernel capped it, `NLM_F_CAPPED`), then attributes.
fn ext_ack_message(flags: u16, payload: &[u8]) -> Option<String> {
    const NLMSG_HEADER: usize = 16;
    let request_len = if flags & NLM_F_CAPPED != 0 {
        NLMSG_HEADER
    } else {
        u32::from_ne_bytes(payload.get(..4)?.try_into().ok()?) as usize
    };
    let mut attributes = payload.get(request_len.next_multiple_of(4)..)?;
    while attributes.len() >= 4 {
        let len = u16::from_ne_bytes([attributes[0], attributes[1]]) as usize;
        let kind = u16::from_ne_bytes([attributes[2], attributes[3]]);
        if len < 4 || len > attributes.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = &attributes[4..len];
            let text = text.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(text).into_owned()).filter(|t| !t.is_empty());
        }
        attributes = attributes
            .get(len.next_multiple_of(4)..)
            .unwrap_or_default();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast_is_the_last_address_of_the_subnet() {
        let ip = Ipv4Addr::new(192, 0, 2, 15);
        assert_eq!(broadcast(ip, 24), Some(Ipv4Addr::new(192, 0, 2, 255)));
        assert_eq!(broadcast(ip, 25), Some(Ipv4Addr::new(192, 0, 2, 127)));
        assert_eq!(broadcast(ip, 0), Some(Ipv4Addr::BROADCAST));
        assert_eq!(broadcast(ip, 31), None);
        assert_eq!(broadcast(ip, 32), None);
    }

    fn attribute(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend(((4 + value.len()) as u16).to_ne_bytes());
        bytes.extend(kind.to_ne_bytes());
        bytes.extend(value);
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        bytes
    }

    #[test]
    fn reads_the_extended_ack_after_a_capped_or_full_request() {
        let mut capped = vec![0u8; 16];
        capped.extend(attribute(2, &7u32.to_ne_bytes())); // NLMSGERR_ATTR_OFFS
        capped.extend(attribute(
            NLMSGERR_ATTR_MSG,
            b"Nexthop has invalid gateway\0",
        ));
        assert_eq!(
            ext_ack_message(NLM_F_CAPPED, &capped).as_deref(),
            Some("Nexthop has invalid gateway")
        );

        let mut full = 22u32.to_ne_bytes().to_vec();
        full.resize(22, 0xaa);
        full.resize(24, 0);
        full.extend(attribute(
            NLMSGERR_ATTR_MSG,
            b"mtu greater than device maximum\0",
        ));
        assert_eq!(
            ext_ack_message(0, &full).as_deref(),
            Some("mtu greater than device maximum")
        );
    }

    #[test]
    fn a_payload_without_text_or_garbled_has_no_message() {
        assert_eq!(ext_ack_message(NLM_F_CAPPED, &[0; 16]), None);
        assert_eq!(ext_ack_message(0, &[]), None);
        let mut garbled = vec![0u8; 16];
        garbled.extend([200, 0, 1, 0, b'x']);
        assert_eq!(ext_ack_message(NLM_F_CAPPED, &garbled), None);
    }

    /// The bytes of `packet` as sent: header and body.
    fn encode<I: NetlinkSerializable>(body: I) -> Vec<u8> {
        let mut packet =
            NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(body));
        packet.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        packet.finalize();
        let mut bytes = vec![0; packet.buffer_len()];
        packet.serialize(&mut bytes);
        bytes
    }

    #[test]
    fn requests_encode_exactly_like_the_crate_s_full_codec() {
        use netlink_packet_route::RouteNetlinkMessage as Full;
        let mut link = LinkMessage::default();
        link.header.index = 2;
        link.attributes.push(LinkAttribute::Mtu(1400));
        let mut address = AddressMessage::default();
        address.header.family = AddressFamily::Inet;
        address.header.prefix_len = 24;
        address
            .attributes
            .push(AddressAttribute::Local(IpAddr::V4(Ipv4Addr::new(
                192, 0, 2, 15,
            ))));
        let mut route = RouteMessage::default();
        route.header.address_family = AddressFamily::Inet;
        route
            .attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(
                192, 0, 2, 2,
            ))));
        let pairs = [
            (
                Request::GetLink(LinkMessage::default()),
                Full::GetLink(LinkMessage::default()),
            ),
            (Request::SetLink(link.clone()), Full::SetLink(link)),
            (
                Request::NewAddress(address.clone()),
                Full::NewAddress(address),
            ),
            (Request::NewRoute(route.clone()), Full::NewRoute(route)),
        ];
        for (ours, full) in pairs {
            assert_eq!(encode(ours), encode(full));
        }
    }

    #[test]
    fn only_link_replies_are_decoded() {
        let mut link = LinkMessage::default();
        link.header.index = 3;
        link.attributes.push(LinkAttribute::IfName("eth0".into()));
        let bytes = encode(netlink_packet_route::RouteNetlinkMessage::NewLink(link));
        let reply: NetlinkMessage<Reply> = NetlinkMessage::deserialize(&bytes).unwrap();
        let NetlinkPayload::InnerMessage(Reply::Link(decoded)) = reply.payload else {
            panic!("not decoded as a link");
        };
        assert_eq!(decoded.index, 3);
        assert_eq!(decoded.name, "eth0");
        assert_eq!(decoded.mac, None);
        let route = encode(netlink_packet_route::RouteNetlinkMessage::NewRoute(
            RouteMessage::default(),
        ));
        let reply: NetlinkMessage<Reply> = NetlinkMessage::deserialize(&route).unwrap();
        assert!(matches!(
            reply.payload,
            NetlinkPayload::InnerMessage(Reply::Other)
        ));
    }

    #[test]
    fn link_replies_keep_index_name_and_mac() {
        let mut link = LinkMessage::default();
        link.header.index = 7;
        link.attributes.push(LinkAttribute::Mtu(1500));
        link.attributes.push(LinkAttribute::IfName("eth0".into()));
        link.attributes
            .push(LinkAttribute::Address(vec![0x52, 0x54, 0, 1, 2, 3]));
        let bytes = encode(netlink_packet_route::RouteNetlinkMessage::NewLink(link));
        let reply: NetlinkMessage<Reply> = NetlinkMessage::deserialize(&bytes).unwrap();
        let NetlinkPayload::InnerMessage(Reply::Link(link)) = reply.payload else {
            panic!("not decoded as a link");
        };
        assert_eq!(link.index, 7);
        assert_eq!(link.name, "eth0");
        assert_eq!(link.mac, Some(MacAddress([0x52, 0x54, 0, 1, 2, 3])));
        // A name with a slash never reaches sysfs.
        assert_eq!(driver("../x"), None);
    }
}
