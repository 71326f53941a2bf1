//! A recording double of [`Netlink`]: interfaces set by the test (some appearing only after a
//! number of listings, like a NIC still probing), every request recorded, typed failures.

use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard};

use super::{Errno, Link, Netlink};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetCall {
    Links,
    SetMtu(u32, u32),
    AddAddress(u32, Ipv4Addr, u8),
    SetUp(u32),
    AddDefaultRoute(u32, Ipv4Addr),
}

/// Which request fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetOp {
    Links,
    SetMtu,
    AddAddress,
    SetUp,
    AddDefaultRoute,
}

#[derive(Default)]
struct State {
    links: Vec<Link>,
    /// (listings left before it shows, the link).
    pending: Vec<(usize, Link)>,
    calls: Vec<NetCall>,
    failures: Vec<(NetOp, Errno)>,
}

#[derive(Default)]
pub struct FakeNetlink {
    state: Mutex<State>,
}

impl FakeNetlink {
    pub fn with_links(links: Vec<Link>) -> FakeNetlink {
        let fake = FakeNetlink::default();
        fake.state().links = links;
        fake
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// `link` is listed from the `(listings + 1)`-th listing on.
    pub fn appear_after_lists(&self, listings: usize, link: Link) {
        self.state().pending.push((listings, link));
    }

    /// Every request matching `op` fails with `errno`.
    pub fn fail(&self, op: NetOp, errno: Errno) {
        self.state().failures.push((op, errno));
    }

    pub fn calls(&self) -> Vec<NetCall> {
        self.state().calls.clone()
    }

    fn call(&self, call: NetCall, op: NetOp) -> Result<(), Errno> {
        let mut s = self.state();
        s.calls.push(call);
        match s.failures.iter().find(|(failing, _)| *failing == op) {
            Some((_, errno)) => Err(errno.clone()),
            None => Ok(()),
        }
    }
}

impl Netlink for FakeNetlink {
    fn links(&self) -> Result<Vec<Link>, Errno> {
        self.call(NetCall::Links, NetOp::Links)?;
        let mut s = self.state();
        let (ready, mut waiting): (Vec<_>, Vec<_>) =
            s.pending.drain(..).partition(|(left, _)| *left == 0);
        for (left, _) in &mut waiting {
            *left -= 1;
        }
        s.pending = waiting;
        s.links.extend(ready.into_iter().map(|(_, link)| link));
        Ok(s.links.clone())
    }

    fn set_mtu(&self, link: u32, mtu: u32) -> Result<(), Errno> {
        self.call(NetCall::SetMtu(link, mtu), NetOp::SetMtu)
    }

    fn add_address(&self, link: u32, ip: Ipv4Addr, prefix_len: u8) -> Result<(), Errno> {
        self.call(NetCall::AddAddress(link, ip, prefix_len), NetOp::AddAddress)
    }

    fn set_up(&self, link: u32) -> Result<(), Errno> {
        self.call(NetCall::SetUp(link), NetOp::SetUp)
    }

    fn add_default_route(&self, link: u32, gateway: Ipv4Addr) -> Result<(), Errno> {
        self.call(
            NetCall::AddDefaultRoute(link, gateway),
            NetOp::AddDefaultRoute,
        )
    }
}
