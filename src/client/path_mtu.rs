//! The size of the path to the gateway, as the client knows it right now: one value that every
//! part reads and the parts that learn something about the path write.
//!
//! Two things bound the outer (underlay) packet size, and they are learnt differently:
//! - the **link**: the MTU of the route or interface the path leaves by (or `underlay_mtu` from
//!   the client file, which then wins for good). Found at bring-up and followed at run time by
//!   the underlay watcher;
//! - **discovery**: a smaller hop further along (a PPPoE or tunnel hop between two 1500-byte
//!   links), learnt from the UDP socket's errors or by probing (DPLPMTUD).
//!
//! The usable outer size is the smaller of the two; the inner size (the TUN MTU, what the send
//! loop lets through before it answers "too big") is that minus the tunnel's overhead for the
//! underlay's family. Readers on the packet path use [`PathMtu::inner`] (three relaxed atomic
//! loads); whoever applies the size to the TUN device waits on [`PathMtu::changes`].
//!
//! The path is the one to the gateway in use: after a failover it is another path
//! ([`PathMtu::set_gateway`]), whose family may differ and about which nothing discovered on
//! the previous one says anything; the prober searches it afresh ([`PathMtu::gateway_changes`]).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};

use tokio::sync::watch;

use crate::sansio::inner::IpFamily;
use crate::sansio::wire;
use crate::tunnel::MIN_IPV6_MTU;

/// No discovered bound: the link alone decides.
const NONE: u16 = u16::MAX;

pub use crate::sansio::wire::MIN_INNER_MTU;

/// What bounds the outer size now (for the log, the status and the dashboard).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// The route or link the path leaves by.
    Link,
    /// `underlay_mtu` in the client file.
    Configured,
    /// A smaller hop further along, found by discovery.
    Discovered,
}

impl Bound {
    pub fn as_str(self) -> &'static str {
        match self {
            Bound::Link => "link",
            Bound::Configured => "configured",
            Bound::Discovered => "discovered",
        }
    }
}

/// The path MTU state of one client. Shared (`Arc`) between the loops, the underlay watcher and
/// the prober.
#[derive(Debug)]
pub struct PathMtu {
    /// The gateway the path goes to, published on every change (a new path).
    gateway: watch::Sender<IpAddr>,
    /// Whether the underlay is IPv6: the gateway's family, kept apart for the packet path.
    v6: AtomicBool,
    configured: bool,
    link: AtomicU16,
    discovered: AtomicU16,
    /// The inner MTU, published on every change.
    changes: watch::Sender<u16>,
}

impl PathMtu {
    /// A path to `gateway` (its family is the underlay's) whose link MTU is `link` (outer
    /// bytes); `configured`: the value is `underlay_mtu` from the file, not read from the system.
    pub fn new(link: u16, gateway: IpAddr, configured: bool) -> Self {
        let inner = inner_for(link, IpFamily::of_addr(gateway));
        Self {
            gateway: watch::channel(gateway).0,
            v6: AtomicBool::new(gateway.is_ipv6()),
            configured,
            link: AtomicU16::new(link),
            discovered: AtomicU16::new(NONE),
            changes: watch::channel(inner).0,
        }
    }

    /// The usable outer packet size (IP header included): the smaller of the link's and the
    /// discovered bound.
    pub fn outer(&self) -> u16 {
        self.link.load(Ordering::Relaxed).min(self.discovered.load(Ordering::Relaxed))
    }

    /// The usable inner packet size: what the TUN MTU should be and what the engine lets
    /// through.
    pub fn inner(&self) -> u16 {
        inner_for(self.outer(), self.underlay())
    }

    /// The link's MTU (outer bytes).
    pub fn link(&self) -> u16 {
        self.link.load(Ordering::Relaxed)
    }

    /// The discovered bound (outer bytes), if any.
    pub fn discovered(&self) -> Option<u16> {
        match self.discovered.load(Ordering::Relaxed) {
            NONE => None,
            d => Some(d),
        }
    }

    /// What bounds the size now.
    pub fn bound(&self) -> Bound {
        match self.discovered() {
            Some(d) if d < self.link() => Bound::Discovered,
            _ if self.configured => Bound::Configured,
            _ => Bound::Link,
        }
    }

    /// The underlay's family (what the overhead is computed for): the gateway's.
    pub fn underlay(&self) -> IpFamily {
        if self.v6.load(Ordering::Relaxed) { IpFamily::V6 } else { IpFamily::V4 }
    }

    /// The gateway the path goes to.
    pub fn gateway(&self) -> IpAddr {
        *self.gateway.borrow()
    }

    /// Changes of the gateway the path goes to (the current one first): each is a new path,
    /// to search from scratch.
    pub fn gateway_changes(&self) -> watch::Receiver<IpAddr> {
        self.gateway.subscribe()
    }

    /// The path now goes to `gateway` (the client failed over to it). A bound discovered on the
    /// previous path says nothing of this one (a small hop there need not be on the way here),
    /// so it is dropped at once rather than kept until the raise timer; the overhead follows
    /// the new gateway's family. The link bound is the caller's to read for the new path next
    /// (the underlay watcher does). Nothing changes when `gateway` is the one already followed,
    /// so repeating the call (a retried switch) loses nothing discovered. Returns whether the
    /// usable inner MTU changed.
    pub fn set_gateway(&self, gateway: IpAddr) -> bool {
        // Under the channel's lock and before its receivers wake: a prober woken by the change
        // reads the new family and no stale bound.
        let switched = self.gateway.send_if_modified(|g| {
            if *g == gateway {
                return false;
            }
            self.v6.store(gateway.is_ipv6(), Ordering::Relaxed);
            self.discovered.store(NONE, Ordering::Relaxed);
            *g = gateway;
            true
        });
        switched && self.publish()
    }

    /// Whether the link value is `underlay_mtu` from the file (then the system's is not followed).
    pub fn is_configured(&self) -> bool {
        self.configured
    }

    /// The link's MTU changed (the underlay watcher saw it). Ignored when the file configures it.
    /// Returns whether the usable inner MTU changed.
    pub fn set_link(&self, outer: u16) -> bool {
        if self.configured {
            return false;
        }
        self.link.store(outer, Ordering::Relaxed);
        self.publish()
    }

    /// Discovery found the path to fit `outer` bytes at most (`None`: no bound beyond the link,
    /// as after a probe confirmed the link's size). Returns whether the usable inner MTU changed.
    pub fn set_discovered(&self, outer: Option<u16>) -> bool {
        self.discovered.store(outer.unwrap_or(NONE), Ordering::Relaxed);
        self.publish()
    }

    /// Changes of the usable inner MTU (the current value first).
    pub fn changes(&self) -> watch::Receiver<u16> {
        self.changes.subscribe()
    }

    fn publish(&self) -> bool {
        let inner = self.inner();
        self.changes.send_if_modified(|v| {
            let changed = *v != inner;
            *v = inner;
            changed
        })
    }
}

/// What a change of the TUN MTU from `was` to `now` means for the tunnel's IPv6, on a device
/// that should carry it (`wanted`: the session has an IPv6 address and the host IPv6).
///
/// IPv6 needs links of at least 1280 bytes (RFC 8200) and Linux acts on it: a device set below
/// 1280 loses its IPv6 addresses and routes, and raising the MTU again does not bring them back.
/// The TUN still follows the path below 1280 (a device kept at 1280 would make the host's TCP
/// advertise segments the path cannot carry back, and the gateway side would black-hole them);
/// IPv6 through the tunnel pauses meanwhile (the kill-switch keeps it from leaking), and the
/// address and routes are put back when the path grows again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ipv6Step {
    /// Nothing changes for IPv6.
    Keep,
    /// The kernel is dropping the device's IPv6 now.
    Lost,
    /// The device can carry IPv6 again: re-add the address, then the routes.
    Restore,
}

/// See [`Ipv6Step`].
pub fn ipv6_step(was: u16, now: u16, wanted: bool) -> Ipv6Step {
    match (wanted, was >= MIN_IPV6_MTU, now >= MIN_IPV6_MTU) {
        (true, true, false) => Ipv6Step::Lost,
        (true, false, true) => Ipv6Step::Restore,
        _ => Ipv6Step::Keep,
    }
}

/// The inner MTU over an outer one, never below [`MIN_INNER_MTU`].
fn inner_for(outer: u16, underlay: IpFamily) -> u16 {
    wire::tun_mtu_over(outer, underlay).unwrap_or(MIN_INNER_MTU).max(MIN_INNER_MTU)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const GW4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
    const GW4_B: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 6));
    const GW6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2));

    #[test]
    fn the_smaller_bound_wins_and_each_change_is_published_once() {
        let p = PathMtu::new(1500, GW4, false);
        let mut rx = p.changes();
        assert_eq!(p.inner(), 1500 - 28 - wire::OVERHEAD as u16);
        assert_eq!(p.bound(), Bound::Link);
        assert!(p.set_discovered(Some(1280)));
        assert_eq!((p.outer(), p.bound()), (1280, Bound::Discovered));
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 1280 - 28 - wire::OVERHEAD as u16);
        // The link shrinking above the discovered bound changes nothing.
        assert!(!p.set_link(1400));
        assert!(!rx.has_changed().unwrap());
        assert!(p.set_link(1200));
        assert_eq!((p.outer(), p.bound()), (1200, Bound::Link));
        // Lifting the discovered bound changes nothing while the link is smaller still.
        assert!(!p.set_discovered(None));
        assert!(p.set_link(1500));
        assert_eq!(p.inner(), 1500 - 28 - wire::OVERHEAD as u16);
    }

    #[test]
    fn ipv6_underlay_costs_twenty_bytes_more_and_tiny_paths_are_floored() {
        let p = PathMtu::new(1500, GW6, false);
        assert_eq!(p.inner(), 1500 - 48 - wire::OVERHEAD as u16);
        p.set_link(300);
        assert_eq!(p.inner(), MIN_INNER_MTU);
    }

    #[test]
    fn ipv6_pauses_below_1280_and_comes_back_above() {
        use Ipv6Step::*;
        // A 1500 link dropping to 1280 over IPv4: the TUN goes 1436 -> 1216, under IPv6's floor.
        let p = PathMtu::new(1280, GW4, false);
        assert_eq!(ipv6_step(1436, p.inner(), true), Lost);
        assert_eq!(ipv6_step(p.inner(), 1436, true), Restore);
        // Exactly 1280 still carries IPv6; moves on either side of the floor change nothing.
        assert_eq!(ipv6_step(1436, MIN_IPV6_MTU, true), Keep);
        assert_eq!(ipv6_step(MIN_IPV6_MTU - 1, MIN_IPV6_MTU, true), Restore);
        assert_eq!(ipv6_step(1216, 1100, true), Keep);
        assert_eq!(ipv6_step(1400, 1300, true), Keep);
        // A session (or host) without IPv6 has nothing to lose or restore.
        assert_eq!(ipv6_step(1436, 1216, false), Keep);
        assert_eq!(ipv6_step(1216, 1436, false), Keep);
    }

    #[test]
    fn a_configured_link_is_not_followed() {
        let p = PathMtu::new(1400, GW4, true);
        assert!(!p.set_link(1500));
        assert_eq!((p.link(), p.bound()), (1400, Bound::Configured));
        assert!(p.set_discovered(Some(1300)));
        assert_eq!(p.bound(), Bound::Discovered);
    }

    #[test]
    fn a_new_gateway_is_a_new_path_whose_family_sets_the_overhead() {
        let p = PathMtu::new(1500, GW6, false);
        let mut gateways = p.gateway_changes();
        let mut rx = p.changes();
        assert_eq!((p.underlay(), p.gateway()), (IpFamily::V6, GW6));
        assert_eq!(p.inner(), 1500 - 48 - wire::OVERHEAD as u16);
        // Failing over to an IPv4 gateway: 20 bytes less of IP header, so a larger TUN MTU
        // over the same 1500-byte link, and it is published.
        assert!(p.set_gateway(GW4));
        assert_eq!((p.underlay(), p.gateway()), (IpFamily::V4, GW4));
        assert_eq!(p.inner(), 1500 - 28 - wire::OVERHEAD as u16);
        assert_eq!(*rx.borrow_and_update(), 1500 - 28 - wire::OVERHEAD as u16);
        assert!(gateways.has_changed().unwrap());
        assert_eq!(*gateways.borrow_and_update(), GW4);
        // And back: the overhead follows again.
        assert!(p.set_gateway(GW6));
        assert_eq!(p.inner(), 1500 - 48 - wire::OVERHEAD as u16);
        assert_eq!(p.underlay(), IpFamily::V6);
    }

    #[test]
    fn what_was_discovered_on_the_old_path_is_dropped_with_it_and_kept_on_the_same_one() {
        let p = PathMtu::new(1500, GW4, false);
        let mut gateways = p.gateway_changes();
        gateways.mark_unchanged();
        p.set_discovered(Some(1280));
        assert_eq!((p.outer(), p.bound()), (1280, Bound::Discovered));
        // The same gateway again (a retried switch): nothing is lost, nobody is woken.
        assert!(!p.set_gateway(GW4));
        assert_eq!((p.outer(), p.bound()), (1280, Bound::Discovered));
        assert!(!gateways.has_changed().unwrap());
        // Another gateway of the same family: the link decides until discovery says otherwise.
        let mut rx = p.changes();
        assert!(p.set_gateway(GW4_B));
        assert_eq!((p.outer(), p.discovered(), p.bound()), (1500, None, Bound::Link));
        assert_eq!(*rx.borrow_and_update(), 1500 - 28 - wire::OVERHEAD as u16);
        assert!(gateways.has_changed().unwrap());
        // A new gateway wakes the prober even when the size stays (nothing was discovered).
        gateways.mark_unchanged();
        assert!(!p.set_gateway(GW4));
        assert!(gateways.has_changed().unwrap());
        assert_eq!(p.inner(), 1500 - 28 - wire::OVERHEAD as u16);
    }

    #[test]
    fn a_configured_link_stays_across_a_new_path_but_its_family_follows() {
        let p = PathMtu::new(1400, GW4, true);
        p.set_discovered(Some(1300));
        assert!(p.set_gateway(GW6));
        assert_eq!((p.outer(), p.bound()), (1400, Bound::Configured));
        assert_eq!(p.inner(), 1400 - 48 - wire::OVERHEAD as u16);
    }
}
