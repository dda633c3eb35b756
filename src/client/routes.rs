//! Routes through the tunnel (rtnetlink), and the gateway's own path outside it.
//!
//! Installed once, when the TUN device comes up, and never touched on re-auth (the tunnel and the
//! assigned address outlive every session). [`Routes::install`]:
//! 1. removes routes a killed run left behind (every route we add carries [`ROUTE_PROTOCOL`], so
//!    they are recognisable; the TUN's own routes died with it, the host routes did not);
//! 2. asks the kernel how it reaches the gateway right now (`ip route get`, which follows whatever
//!    default route, more specific route or multipath choice applies) and, if that path goes
//!    through a router and the tunnel routes would capture the gateway, pins it with a host
//!    route;
//! 3. adds the tunnel routes on the TUN: `0.0.0.0/1` and `128.0.0.0/1`, and `::/1` and
//!    `8000::/1` for IPv6 (more specific than any default route, which is left alone), or the
//!    configured split-tunnel CIDRs of either family.
//!
//! Both families go through the same code: a route is an `IpNet`/`IpAddr`, and only
//! `message` and [`parse_dumped`] look at the family. The gateway's pin and fallback follow
//! whichever family its endpoint is (a /32 or a /128).
//!
//! It returns a [`RouteGuard`] that removes exactly those routes on an explicit stop. The pure
//! part — which routes — is [`tunnel_cidrs`] and [`plan`], unit-tested below.
//!
//! ## Following the underlay
//! A host route pinned once goes stale: the kernel deletes every route through a device that is
//! set down or loses its last IPv4 address (without a route notification), a directly connected
//! gateway has no host route at all, and a laptop moves to another router. With the gateway
//! captured by the tunnel routes, each of these would send the client's own encrypted UDP and
//! control TCP into its TUN. [`TunnelNetwork`] therefore runs an [`UnderlayWatch`] beside the
//! routes. For a captured gateway it keeps two routes of ours for the gateway's address:
//! - the *fallback*: `unreachable GW/32 metric 4294967295`. It names no device, so no link event
//!   removes it, and every real route to the gateway wins over it. Whenever the kernel has no
//!   path outside the tunnel, the gateway is unreachable (sends fail at once), never routed into
//!   the TUN — there is no window in which it is, however slow the watcher;
//! - the *pin* (metric 0): the current underlay path, `GW/32 via ROUTER dev X` or, for a gateway
//!   on the link itself, `GW/32 dev X scope link`. The watcher subscribes to rtnetlink link,
//!   address and route events and, after each burst, recomputes the path from the routing tables
//!   (ignoring our own routes and the TUN: [`choose_underlay`], pure and unit-tested) and
//!   replaces the pin in one netlink call if it changed.
//!
//! The path is chosen from the `local` and `main` tables (longest prefix, then lowest metric,
//! skipping dead and link-down next hops), as the default policy rules do; other policy rules
//! are not followed. When the path or the source address towards the gateway changes, the watcher
//! calls the client's hook (the supervisor rebuilds its control channel and checks at once). It
//! also keeps the data plane's [`PathMtu`] on the MTU of that path (the chosen route's `mtu`
//! metric, else its interface's MTU), so the TUN MTU follows a link or route whose MTU changes,
//! and tells it which gateway the path goes to (after a failover: a new path, whose family sets
//! the overhead and which discovery searches afresh).
//!
//! After a crash (SIGKILL) the pin and the fallback stay, like the old host route did, until the
//! next start or `holdfast client unblock` removes every route carrying [`ROUTE_PROTOCOL`].

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use futures_util::TryStreamExt as _;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteMetric, RouteNextHopFlags, RouteProtocol,
    RouteScope, RouteType, RouteVia,
};
use rtnetlink::{Handle, MulticastGroup, RouteMessageBuilder};

use super::dataplane::DEFAULT_TUN_NAME;
use super::dns::{Dns, DnsError, DnsGuard, PushedDns};
use super::path_mtu::PathMtu;
use crate::config::client::ClientFile;

const TARGET: &str = "holdfast::routes";

/// The routing protocol number every route of ours carries (`ip route` shows `proto 207`). Not one
/// of iproute2's named protocols, so no other software uses it; it is how leftovers of a killed
/// run are found.
pub const ROUTE_PROTOCOL: u8 = 207;

/// The full tunnel: two halves of the IPv4 space and two of the IPv6 space, more specific than
/// the default routes, so no default route is ever replaced (and each comes back untouched on
/// stop).
pub const FULL_TUNNEL: [IpNet; 4] = [
    // Evaluated at compile time: a bad prefix length would fail the build, not panic at run time.
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(0, 0, 0, 0), 1)),
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(128, 0, 0, 0), 1)),
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 0), 1)),
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::new(0x8000, 0, 0, 0, 0, 0, 0, 0), 1)),
];

/// The metric the kernel gives a route added without one: 0 for IPv4, 1024 for IPv6 (it never
/// stores an IPv6 route with metric 0). The gateway's pin is added that way, and found again by it.
pub const fn default_metric(ip: IpAddr) -> u32 {
    match ip {
        IpAddr::V4(_) => 0,
        IpAddr::V6(_) => 1024,
    }
}

/// Why routes could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum RoutesError {
    /// No netlink socket (not Linux, or no permission).
    #[error("cannot open a netlink socket: {0}")]
    Netlink(std::io::Error),
    /// The TUN device does not exist.
    #[error("no network interface named {0}")]
    NoInterface(String),
    /// The kernel has no route to the gateway at all.
    #[error("no route to the gateway {gateway}: {reason}")]
    NoPathToGateway { gateway: IpAddr, reason: String },
    /// The gateway is already routed through the tunnel: traffic to it would loop.
    #[error("the gateway {0} is routed through the tunnel itself")]
    GatewayViaTunnel(IpAddr),
    /// Adding a route failed (what was added before it has been removed again).
    #[error("cannot add the route {route}: {reason}")]
    Add { route: String, reason: String },
    /// Removing a route failed.
    #[error("cannot remove the route {route}: {reason}")]
    Remove { route: String, reason: String },
    /// Listing routes failed.
    #[error("cannot list routes: {0}")]
    List(String),
}

/// How the kernel reaches the gateway outside the tunnel: the next hop, if any, and the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Underlay {
    /// The router; `None` when the gateway is on a directly connected subnet.
    pub via: Option<IpAddr>,
    /// The outgoing interface's index.
    pub oif: u32,
}

/// One route of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteSpec {
    /// The gateway's address (a /32 or /128) via a router of the underlay.
    Host { dst: IpAddr, via: IpAddr, oif: u32 },
    /// A tunnel route on the TUN device.
    Tunnel { net: IpNet, oif: u32 },
    /// The gateway's address on a directly connected link (no router): a device host route, so
    /// that the tunnel routes never capture it while the link's own route is there.
    OnLink { dst: IpAddr, oif: u32 },
    /// The fallback for the gateway's address: unreachable at [`FALLBACK_METRIC`]. Used only when
    /// no real route to the gateway exists (link down, no address, no router): then sending to
    /// the gateway fails instead of entering the tunnel.
    Unreachable { dst: IpAddr },
}

/// The fallback's metric: the highest there is, so that any real route to the gateway wins.
pub const FALLBACK_METRIC: u32 = u32::MAX;

impl fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteSpec::Host { dst, via, oif } => write!(f, "{dst} via {via} dev #{oif}"),
            RouteSpec::Tunnel { net, oif } => write!(f, "{net} dev #{oif}"),
            RouteSpec::OnLink { dst, oif } => write!(f, "{dst} dev #{oif}"),
            RouteSpec::Unreachable { dst } => write!(f, "unreachable {dst} metric {FALLBACK_METRIC}"),
        }
    }
}

/// The CIDRs to route through the tunnel: `configured` (a split tunnel, either family) or the
/// full tunnel when `None`. `0.0.0.0/0` and `::/0` become their family's two halves (each would
/// collide with a default route); host bits are cleared and duplicates dropped. Each DNS server
/// not already covered gets a /32 or /128, so the resolver is reached through the tunnel (the
/// kill-switch lets DNS out nowhere else).
pub fn tunnel_cidrs(configured: Option<&[IpNet]>, dns: &[IpAddr]) -> Vec<IpNet> {
    let mut nets: Vec<IpNet> = Vec::new();
    for net in configured.unwrap_or(&FULL_TUNNEL) {
        if net.prefix_len() == 0 {
            let same_family = |n: &&IpNet| n.addr().is_ipv4() == net.addr().is_ipv4();
            nets.extend(FULL_TUNNEL.iter().filter(same_family));
        } else {
            nets.push(net.trunc());
        }
    }
    for ip in dns {
        if !nets.iter().any(|n| n.contains(ip)) {
            nets.push(IpNet::from(*ip));
        }
    }
    nets.sort();
    nets.dedup();
    nets
}

/// Which routes to add. A host route for the gateway only when it is needed — the gateway is
/// reached through a router and one of the tunnel routes covers it — since otherwise the kernel
/// already sends it the right way.
pub fn plan(
    gateway: IpAddr,
    underlay: Underlay,
    tun_index: u32,
    cidrs: &[IpNet],
) -> Result<Vec<RouteSpec>, RoutesError> {
    if underlay.oif == tun_index {
        return Err(RoutesError::GatewayViaTunnel(gateway));
    }
    let captured = captures(cidrs, gateway);
    let mut routes = Vec::with_capacity(cidrs.len() + 1);
    if let (true, Some(via)) = (captured, underlay.via) {
        routes.push(RouteSpec::Host { dst: gateway, via, oif: underlay.oif });
    }
    routes.extend(cidrs.iter().map(|&net| RouteSpec::Tunnel { net, oif: tun_index }));
    Ok(routes)
}

/// Whether the tunnel routes `cidrs` would carry traffic for `gateway` (of either family). A
/// loopback gateway (tests, a gateway on this host) is delivered locally whatever they say.
pub fn captures(cidrs: &[IpNet], gateway: IpAddr) -> bool {
    !gateway.is_loopback() && cidrs.iter().any(|n| n.contains(&gateway))
}

/// The netlink message that adds (or, sent as a delete, removes exactly) `spec`.
fn message(spec: &RouteSpec) -> RouteMessage {
    let proto = RouteProtocol::Other(ROUTE_PROTOCOL);
    match *spec {
        RouteSpec::Host { dst: IpAddr::V4(dst), via, oif } => {
            let b = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(dst, 32);
            let b = match via {
                IpAddr::V4(v) => b.gateway(v),
                // An IPv4 route through an IPv6 next hop (RFC 5549), as the kernel reported it.
                IpAddr::V6(v) => b.via(v),
            };
            b.output_interface(oif).protocol(proto).build()
        }
        RouteSpec::Host { dst: IpAddr::V6(dst), via, oif } => {
            let b = RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(dst, 128);
            let b = match via {
                IpAddr::V6(v) => b.gateway(v),
                // Cannot come from an IPv6 lookup; keep the message well-formed anyway.
                IpAddr::V4(v) => b.gateway(v.to_ipv6_mapped()),
            };
            b.output_interface(oif).protocol(proto).build()
        }
        RouteSpec::Tunnel { net: IpNet::V4(net), oif } => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.addr(), net.prefix_len())
            .output_interface(oif)
            .scope(RouteScope::Link)
            .protocol(proto)
            .build(),
        RouteSpec::Tunnel { net: IpNet::V6(net), oif } => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(net.addr(), net.prefix_len())
            .output_interface(oif)
            .protocol(proto)
            .build(),
        RouteSpec::OnLink { dst: IpAddr::V4(dst), oif } => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .output_interface(oif)
            .scope(RouteScope::Link)
            .protocol(proto)
            .build(),
        RouteSpec::OnLink { dst: IpAddr::V6(dst), oif } => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(dst, 128)
            .output_interface(oif)
            .protocol(proto)
            .build(),
        RouteSpec::Unreachable { dst: IpAddr::V4(dst) } => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .kind(RouteType::Unreachable)
            .priority(FALLBACK_METRIC)
            .protocol(proto)
            .build(),
        RouteSpec::Unreachable { dst: IpAddr::V6(dst) } => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(dst, 128)
            .kind(RouteType::Unreachable)
            .priority(FALLBACK_METRIC)
            .protocol(proto)
            .build(),
    }
}

/// Runs `f` with a fresh rtnetlink connection in the calling thread's network namespace.
async fn with_handle<T, F, Fut>(f: F) -> Result<T, RoutesError>
where
    F: FnOnce(Handle) -> Fut,
    Fut: Future<Output = Result<T, RoutesError>>,
{
    let (conn, handle, _) = rtnetlink::new_connection().map_err(RoutesError::Netlink)?;
    let task = tokio::spawn(conn);
    let result = f(handle).await;
    task.abort();
    result
}

/// Whether a failed delete means the route is not there (any more): deleted with its device when
/// the TUN went away, or by someone else. Not an error for a cleanup.
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn already_gone(e: &rtnetlink::Error) -> bool {
    matches!(errno(e), Some(libc::ESRCH | libc::ENOENT | libc::ENODEV))
}

/// Installing and removing the tunnel's routes.
pub struct Routes;

impl Routes {
    /// Installs the routes for the TUN `tun_name` (see the module doc). `cidrs` is usually
    /// [`tunnel_cidrs`] of the client file. Call once, when the TUN is up; keep the guard until
    /// an explicit stop. On error nothing of ours is left installed.
    pub async fn install(tun_name: &str, gateway: IpAddr, cidrs: &[IpNet]) -> Result<RouteGuard, RoutesError> {
        Self::install_for(tun_name, gateway, &[], cidrs).await
    }

    /// [`Routes::install`] for a deployment with several gateways: the other gateways' addresses
    /// get host routes over their current underlay too (when the tunnel routes would capture
    /// them), so a failover reaches them outside the tunnel. Only `gateway`'s path is followed
    /// by the underlay watcher; the others are pinned as found at start.
    pub async fn install_for(
        tun_name: &str,
        gateway: IpAddr,
        others: &[IpAddr],
        cidrs: &[IpNet],
    ) -> Result<RouteGuard, RoutesError> {
        let tun_index = ifindex(tun_name)?;
        with_handle(|handle| async move {
            let stale = remove_ours(&handle).await?;
            if stale > 0 {
                tracing::info!(target: TARGET, "removed {stale} route(s) a previous run left");
            }
            let underlay = lookup(&handle, gateway).await?;
            let mut specs = plan(gateway, underlay, tun_index, cidrs)?;
            for &other in others.iter().filter(|o| **o != gateway) {
                // Another gateway without a path now is not fatal: failing over to it fails
                // like any unreachable gateway, and the client tries the next.
                match lookup(&handle, other).await {
                    Ok(u) if u.oif != tun_index => {
                        let pins = plan(other, u, tun_index, cidrs)?;
                        specs.splice(0..0, pins.into_iter().filter(|p| matches!(p, RouteSpec::Host { .. })));
                    }
                    Ok(_) => tracing::warn!(target: TARGET, "gateway {other} is routed through the tunnel; failing over to it will not work"),
                    Err(e) => tracing::warn!(target: TARGET, "{e}; failing over to {other} needs a path to it"),
                }
            }
            let mut added = Vec::with_capacity(specs.len());
            for spec in specs {
                let result = handle.route().add(message(&spec)).execute().await;
                if let (Err(e), RouteSpec::Host { .. }) = (&result, &spec)
                    && errno(e) == Some(libc::EEXIST)
                {
                    // The administrator already pinned the gateway to the underlay with a host
                    // route: that is what ours would do. It is not ours, so a stop leaves it.
                    tracing::debug!(target: TARGET, "host route to {gateway} already present; keeping it");
                    continue;
                }
                if let Err(e) = result {
                    let err = RoutesError::Add { route: spec.to_string(), reason: e.to_string() };
                    // Leave nothing half-done behind.
                    let _ = remove_specs(&handle, &added).await;
                    return Err(err);
                }
                added.push(spec);
            }
            let list: Vec<String> = added.iter().map(ToString::to_string).collect();
            tracing::info!(target: TARGET, "routes installed: {}", list.join(", "));
            Ok(RouteGuard { added })
        })
        .await
    }
}

/// The routes [`Routes::install`] added. [`RouteGuard::restore`] removes them (on an explicit
/// stop). Dropped without `restore` (a crash), the TUN's routes still vanish with the TUN and the
/// host route stays until the next start or `holdfast client unblock`.
#[must_use = "call restore() on stop"]
#[derive(Debug)]
pub struct RouteGuard {
    added: Vec<RouteSpec>,
}

impl RouteGuard {
    /// The routes that were added, in order.
    pub fn routes(&self) -> &[RouteSpec] {
        &self.added
    }

    /// Pins gateways learnt while running (a gateway that joined the deployment after the client
    /// file was written) the way [`Routes::install_for`] pins the file's, so a failover to them
    /// never enters the tunnel. The tunnel routes are up now and would answer a lookup for a
    /// captured address, so a new gateway goes over the underlay a pin of its family installed
    /// at start uses (a deployment's gateways share the client's way out); without such a pin
    /// (the gateways are on the client's own link), a gateway the kernel routes outside the tunnel
    /// needs none, and one it routes into the tunnel is skipped with a warning. Returns how many
    /// routes were added; stop removes them with the rest.
    pub async fn pin_more(&mut self, tun_name: &str, gateways: &[IpAddr]) -> Result<usize, RoutesError> {
        let tun_index = ifindex(tun_name)?;
        let known: Vec<IpAddr> = self
            .added
            .iter()
            .filter_map(|s| match s {
                RouteSpec::Host { dst, .. } | RouteSpec::OnLink { dst, .. } | RouteSpec::Unreachable { dst } => {
                    Some(*dst)
                }
                RouteSpec::Tunnel { .. } => None,
            })
            .collect();
        let new: Vec<IpAddr> = gateways.iter().copied().filter(|g| !known.contains(g)).collect();
        if new.is_empty() {
            return Ok(0);
        }
        let ways: Vec<(IpAddr, u32)> = self
            .added
            .iter()
            .filter_map(|s| match s {
                RouteSpec::Host { via, oif, .. } => Some((*via, *oif)),
                _ => None,
            })
            .collect();
        let added = with_handle(|handle| async move {
            let mut added = Vec::new();
            for g in new {
                let spec = match ways.iter().find(|(via, _)| via.is_ipv4() == g.is_ipv4()) {
                    Some(&(via, oif)) => RouteSpec::Host { dst: g, via, oif },
                    None => {
                        match lookup(&handle, g).await {
                            Ok(u) if u.oif == tun_index => tracing::warn!(
                                target: TARGET,
                                "gateway {g} is routed through the tunnel; failing over to it will not work"
                            ),
                            Ok(_) => {}
                            Err(e) => tracing::debug!(target: TARGET, "{e}; no pin for gateway {g}"),
                        }
                        continue;
                    }
                };
                match handle.route().add(message(&spec)).execute().await {
                    Ok(()) => added.push(spec),
                    Err(e) if errno(&e) == Some(libc::EEXIST) => {}
                    Err(e) => tracing::warn!(target: TARGET, "cannot pin gateway {g}: {e}"),
                }
            }
            Ok(added)
        })
        .await?;
        if !added.is_empty() {
            let list: Vec<String> = added.iter().map(ToString::to_string).collect();
            tracing::info!(target: TARGET, "routes added for the deployment's other gateways: {}", list.join(", "));
        }
        let n = added.len();
        self.added.extend(added);
        Ok(n)
    }

    /// Removes exactly the routes that were added, newest first. Routes already gone (the TUN
    /// was removed first) are fine.
    pub async fn restore(self) -> Result<(), RoutesError> {
        let added = self.added;
        with_handle(|handle| async move { remove_specs(&handle, &added).await }).await?;
        tracing::info!(target: TARGET, "routes restored");
        Ok(())
    }
}

async fn remove_specs(handle: &Handle, specs: &[RouteSpec]) -> Result<(), RoutesError> {
    let mut first_error = None;
    for spec in specs.iter().rev() {
        if let Err(e) = handle.route().del(message(spec)).execute().await
            && !already_gone(&e)
        {
            first_error.get_or_insert(RoutesError::Remove { route: spec.to_string(), reason: e.to_string() });
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// How the kernel routes `gateway` now.
async fn lookup(handle: &Handle, gateway: IpAddr) -> Result<Underlay, RoutesError> {
    underlay_of(gateway, &lookup_route(handle, gateway).await?)
}

/// The kernel's answer to `ip route get GATEWAY`.
async fn lookup_route(handle: &Handle, gateway: IpAddr) -> Result<RouteMessage, RoutesError> {
    let query = match gateway {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(a, 32).build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(a, 128).build(),
    };
    let no_path = |reason: String| RoutesError::NoPathToGateway { gateway, reason };
    handle
        .route()
        .get(query)
        .execute()
        .try_next()
        .await
        .map_err(|e| no_path(e.to_string()))?
        .ok_or_else(|| no_path("the kernel returned no route".into()))
}

/// The MTU of the path the kernel would send `gateway`'s packets on: the route's MTU metric
/// (`ip route ... mtu N`, as a PPPoE or VPN set-up installs) if it has one, else the MTU of the
/// interface it leaves by. What the TUN MTU is sized from when `underlay_mtu` is not set.
pub async fn path_mtu(gateway: IpAddr) -> Result<u16, RoutesError> {
    with_handle(|handle| async move { path_mtu_on(&handle, gateway, None).await }).await
}

/// [`path_mtu`] over an open netlink connection. `pinned`: when the underlay watcher pins the
/// gateway, the routing table it read for that (the dump [`reconcile`] returns) and the TUN's
/// index; then the kernel's answer for the gateway is our pin, a host route without metrics,
/// and the MTU metric is taken from the route the pin copies ([`underlay_route`], which ignores
/// our own routes, so a dump from before the pin changed serves), as the kernel would apply it
/// without the tunnel.
async fn path_mtu_on(
    handle: &Handle,
    gateway: IpAddr,
    pinned: Option<(&[DumpedRoute], u32)>,
) -> Result<u16, RoutesError> {
    let mut underlying = None;
    if let Some((routes, tun_index)) = pinned
        && let (UnderlayChoice::Pin(u), route) = underlay_route(routes, gateway, tun_index)
    {
        underlying = Some((route.and_then(|r| r.mtu), u.oif));
    }
    let (route_mtu, oif) = match underlying {
        Some(found) => found,
        // Not pinned (a local or directly routed gateway, an administrator's host route): the
        // kernel's own answer is the path.
        None => {
            let route = lookup_route(handle, gateway).await?;
            let oif = underlay_of(gateway, &route)?.oif;
            let metric = if from_exception(&route.attributes) {
                // The kernel's answer carries a size it learnt from an ICMP error (an exception
                // that expires), not the route's own metric: that is discovery's (the prober's)
                // to use, and taken as the link's it would cap every raise. The route's own
                // metric, then, from the table itself.
                let routes = dump(handle, gateway).await?;
                underlay_route(&routes, gateway, 0).1.and_then(|r| r.mtu)
            } else {
                mtu_metric(&route.attributes)
            };
            (metric, oif)
        }
    };
    let link_mtu = match route_mtu {
        Some(_) => None,
        None => {
            let link = handle.link().get().match_index(oif).execute().try_next().await;
            let no_link = |reason: String| RoutesError::NoPathToGateway { gateway, reason };
            let link = link
                .map_err(|e| no_link(format!("interface {oif}: {e}")))?
                .ok_or_else(|| no_link(format!("interface {oif} is gone")))?;
            link.attributes.iter().find_map(|a| match a {
                LinkAttribute::Mtu(mtu) => Some(*mtu),
                _ => None,
            })
        }
    };
    choose_path_mtu(route_mtu, link_mtu).ok_or_else(|| RoutesError::NoPathToGateway {
        gateway,
        reason: "neither the route nor its interface has an MTU".into(),
    })
}

/// A route's MTU metric (`ip route ... mtu N`), if it has one.
/// Whether a route lookup's answer comes from a path-MTU exception (the kernel fills the MTU
/// metric of such an answer with the learnt size, and only such an answer has an expiry).
fn from_exception(attrs: &[RouteAttribute]) -> bool {
    attrs.iter().any(|a| matches!(a, RouteAttribute::CacheInfo(ci) if ci.expires != 0))
}

fn mtu_metric(attrs: &[RouteAttribute]) -> Option<u32> {
    attrs.iter().find_map(|a| match a {
        RouteAttribute::Metrics(metrics) => metrics.iter().find_map(|m| match m {
            RouteMetric::Mtu(mtu) => Some(*mtu),
            _ => None,
        }),
        _ => None,
    })
}

/// Brings `path`'s link bound up to date with the MTU of the path to `gateway` now (the route's
/// MTU metric or its interface's MTU), unless `underlay_mtu` configures it. No path right now
/// (link down) changes nothing: the last size stays until one returns. `pinned`: see
/// [`path_mtu_on`].
async fn follow_mtu(handle: &Handle, gateway: IpAddr, pinned: Option<(&[DumpedRoute], u32)>, path: Option<&PathMtu>) {
    let Some(path) = path.filter(|p| !p.is_configured()) else { return };
    match path_mtu_on(handle, gateway, pinned).await {
        Ok(mtu) if mtu != path.link() => {
            // The line that matters is the data plane's, when it applies the change.
            tracing::debug!(target: TARGET, "path to the gateway {gateway}: MTU {} -> {mtu}", path.link());
            path.set_link(mtu);
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(target: TARGET, "path MTU not read: {e}"),
    }
}

/// The path MTU from a route's MTU metric and its interface's MTU: the route's wins (it is set to
/// say the path is narrower than the link), a zero means unset. Capped at what a UDP datagram
/// can use (a loopback's 65536 would not fit `u16`).
pub fn choose_path_mtu(route_mtu: Option<u32>, link_mtu: Option<u32>) -> Option<u16> {
    let mtu = route_mtu.filter(|m| *m > 0).or(link_mtu.filter(|m| *m > 0))?;
    Some(u16::try_from(mtu).unwrap_or(u16::MAX))
}

/// The next hop and device of a route the kernel returned for `gateway`.
fn underlay_of(gateway: IpAddr, route: &RouteMessage) -> Result<Underlay, RoutesError> {
    let oif = route.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    let oif = oif.ok_or_else(|| RoutesError::NoPathToGateway {
        gateway,
        reason: "the route has no outgoing interface".into(),
    })?;
    Ok(Underlay { via: next_hop_of(&route.attributes), oif })
}

/// Removes every route carrying [`ROUTE_PROTOCOL`] (IPv4 and IPv6, any table); returns how many.
async fn remove_ours(handle: &Handle) -> Result<usize, RoutesError> {
    remove_matching_any(handle, |m| m.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL)).await
}

/// Removes the routes (either family) that `select` selects (see [`parse_dumped`]); returns how
/// many.
async fn remove_matching(handle: &Handle, select: impl Fn(&DumpedRoute) -> bool) -> Result<usize, RoutesError> {
    remove_matching_any(handle, |m| parse_dumped(m).is_some_and(|r| select(&r))).await
}

/// Removes every route (IPv4 and IPv6, any table) that `doomed` selects; returns how many.
async fn remove_matching_any(handle: &Handle, doomed: impl Fn(&RouteMessage) -> bool) -> Result<usize, RoutesError> {
    let mut found = Vec::new();
    for dump in [RouteMessageBuilder::<Ipv4Addr>::new().build(), RouteMessageBuilder::<Ipv6Addr>::new().build()] {
        let mut routes = handle.route().get(dump).execute();
        while let Some(r) = routes.try_next().await.map_err(|e| RoutesError::List(e.to_string()))? {
            if doomed(&r) {
                found.push(r);
            }
        }
    }
    let n = found.len();
    for r in found {
        if let Err(e) = handle.route().del(r.clone()).execute().await
            && !already_gone(&e)
        {
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(d) => Some(format!("{d:?}")),
                _ => None,
            });
            let route = format!("{}/{}", dst.unwrap_or_default(), r.header.destination_prefix_length);
            return Err(RoutesError::Remove { route, reason: e.to_string() });
        }
    }
    Ok(n)
}

/// Removes routes a killed client left (for `holdfast client unblock`); returns how many.
pub async fn remove_leftovers() -> Result<usize, RoutesError> {
    with_handle(|handle| async move { remove_ours(&handle).await }).await
}

/// [`remove_leftovers`] from synchronous code, inside or outside a tokio runtime: it runs on its
/// own thread (which inherits the caller's network namespace) with its own small runtime.
pub fn remove_leftovers_blocking() -> Result<usize, RoutesError> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let rt =
                tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(RoutesError::Netlink)?;
            rt.block_on(remove_leftovers())
        })
        .join()
        .unwrap_or_else(|_| Err(RoutesError::List("the route cleanup thread panicked".into())))
    })
}

/// One route from a dump (either family), reduced to what [`choose_underlay`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpedRoute {
    pub net: IpNet,
    /// Routing table id (254 = main, 255 = local).
    pub table: u32,
    pub kind: RouteType,
    /// The metric.
    pub priority: u32,
    /// Carries [`ROUTE_PROTOCOL`].
    pub ours: bool,
    /// The next hops (one, or several for a multipath route).
    pub hops: Vec<NextHop>,
    /// The route's MTU metric, if set (a path narrower than its link).
    pub mtu: Option<u32>,
}

/// One next hop of a [`DumpedRoute`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NextHop {
    pub via: Option<IpAddr>,
    /// Outgoing interface (0 when the route names none, e.g. an unreachable route).
    pub oif: u32,
    /// Not flagged dead or link-down by the kernel.
    pub alive: bool,
}

/// Where the gateway is reached outside the tunnel, as far as pinning is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnderlayChoice {
    /// Pin the gateway to this path.
    Pin(Underlay),
    /// Nothing to pin: the gateway is a local address, or a host route that is not ours (an
    /// administrator's) already pins it.
    Unpinned,
    /// No path outside the tunnel (link down, no address, no router, or an administrator's
    /// unreachable route): the fallback applies.
    NoPath,
}

const TABLE_MAIN: u32 = RouteHeader::RT_TABLE_MAIN as u32;
const TABLE_LOCAL: u32 = 255;

/// Chooses the gateway's underlay path from the routing tables, the way the kernel's default
/// policy would (the `local` table first, then `main`: longest prefix, then lowest metric, dead
/// and link-down next hops skipped) but ignoring our own routes and anything through the TUN —
/// those are exactly what must not decide the gateway's path. Of a multipath route, the first
/// live next hop is taken.
pub fn choose_underlay(routes: &[DumpedRoute], gateway: IpAddr, tun_index: u32) -> UnderlayChoice {
    underlay_route(routes, gateway, tun_index).0
}

/// [`choose_underlay`], with the route that decided it (for a pin: the route the pin copies,
/// whose MTU metric is the path's).
pub fn underlay_route(
    routes: &[DumpedRoute],
    gateway: IpAddr,
    tun_index: u32,
) -> (UnderlayChoice, Option<&DumpedRoute>) {
    let covers = |r: &&DumpedRoute| r.net.contains(&gateway);
    if routes.iter().filter(covers).any(|r| r.table == TABLE_LOCAL && r.kind == RouteType::Local) {
        return (UnderlayChoice::Unpinned, None);
    }
    let mut main: Vec<&DumpedRoute> =
        routes.iter().filter(covers).filter(|r| r.table == TABLE_MAIN && !r.ours).collect();
    main.sort_by_key(|r| (std::cmp::Reverse(r.net.prefix_len()), r.priority));
    for r in main {
        match r.kind {
            RouteType::Unicast => {
                let usable = r.hops.iter().find(|h| h.alive && h.oif != 0 && h.oif != tun_index);
                match usable {
                    // Someone else's host route for the gateway: the kernel follows it already.
                    Some(_) if r.net.prefix_len() == r.net.max_prefix_len() => {
                        return (UnderlayChoice::Unpinned, Some(r));
                    }
                    Some(h) => return (UnderlayChoice::Pin(Underlay { via: h.via, oif: h.oif }), Some(r)),
                    // Dead, or through the tunnel: the kernel would not (or must not) use it.
                    None => continue,
                }
            }
            // The administrator says the gateway is not reachable: do not route around that.
            RouteType::Unreachable | RouteType::BlackHole | RouteType::Prohibit | RouteType::Throw => {
                return (UnderlayChoice::NoPath, Some(r));
            }
            _ => continue,
        }
    }
    (UnderlayChoice::NoPath, None)
}

/// The pin for `choice`, if any.
fn pin_for(gateway: IpAddr, choice: UnderlayChoice) -> Option<RouteSpec> {
    match choice {
        UnderlayChoice::Pin(Underlay { via: Some(via), oif }) => Some(RouteSpec::Host { dst: gateway, via, oif }),
        UnderlayChoice::Pin(Underlay { via: None, oif }) => Some(RouteSpec::OnLink { dst: gateway, oif }),
        UnderlayChoice::Unpinned | UnderlayChoice::NoPath => None,
    }
}

fn next_hop_of(attrs: &[RouteAttribute]) -> Option<IpAddr> {
    attrs.iter().find_map(|a| match a {
        RouteAttribute::Gateway(RouteAddress::Inet(v)) => Some(IpAddr::V4(*v)),
        RouteAttribute::Gateway(RouteAddress::Inet6(v)) => Some(IpAddr::V6(*v)),
        RouteAttribute::Via(RouteVia::Inet6(v)) => Some(IpAddr::V6(*v)),
        _ => None,
    })
}

/// Reduces a dumped route to a [`DumpedRoute`]; `None` for anything but a well-formed IPv4 or
/// IPv6 route.
pub fn parse_dumped(m: &RouteMessage) -> Option<DumpedRoute> {
    // A route dump includes the kernel's path MTU exceptions (RTM_F_CLONED: a /32 or /128
    // "cache" entry per destination an ICMP "too big" was received for). They are not routes:
    // taken as one, a gateway's exception read as "someone else's host route for the gateway"
    // and the pin was removed, leaving only the unreachable fallback.
    if m.header.flags.contains(RouteFlags::Cloned) {
        return None;
    }
    let mut dst = match m.header.address_family {
        AddressFamily::Inet => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        AddressFamily::Inet6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    let mut table = u32::from(m.header.table);
    let mut priority = 0;
    let mut oif = 0;
    let mut multipath = None;
    for attr in &m.attributes {
        match attr {
            RouteAttribute::Destination(RouteAddress::Inet(a)) if dst.is_ipv4() => dst = (*a).into(),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) if dst.is_ipv6() => dst = (*a).into(),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Priority(p) => priority = *p,
            RouteAttribute::Oif(i) => oif = *i,
            RouteAttribute::MultiPath(hops) => multipath = Some(hops),
            _ => {}
        }
    }
    let net = IpNet::new(dst, m.header.destination_prefix_length).ok()?;
    let dead = RouteFlags::Dead | RouteFlags::Linkdown;
    let hops = match multipath {
        Some(hops) => hops
            .iter()
            .map(|h| NextHop {
                via: next_hop_of(&h.attributes),
                oif: h.interface_index,
                alive: !h.flags.intersects(RouteNextHopFlags::Dead | RouteNextHopFlags::Linkdown),
            })
            .collect(),
        None => vec![NextHop { via: next_hop_of(&m.attributes), oif, alive: !m.header.flags.intersects(dead) }],
    };
    Some(DumpedRoute {
        net,
        table,
        kind: m.header.kind,
        priority,
        ours: m.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL),
        hops,
        mtu: mtu_metric(&m.attributes).filter(|m| *m > 0),
    })
}

/// Called when the path or the source address towards the gateway changed.
pub type UnderlayHook = Arc<dyn Fn() + Send + Sync>;

/// What the watcher compares between two looks: the kernel's answer for the gateway (`ip route
/// get`: next hop, device, source address), or `None` when it has none.
type PathSeen = Option<(Underlay, Option<IpAddr>)>;

/// Follows the underlay (see the module doc): keeps the gateway's pin and fallback current when
/// `pin` is set, and calls the hook on each change of the path towards the gateway.
#[derive(Debug)]
pub struct UnderlayWatch {
    gateway: IpAddr,
    pin: bool,
    /// Gateways followed before a failover ([`UnderlayWatch::switch_to`]) whose pin and
    /// fallback were left in place; removed with this gateway's.
    earlier: Vec<IpAddr>,
    /// The watcher; `None` once halted.
    task: Option<tokio::task::JoinHandle<()>>,
}

impl UnderlayWatch {
    /// Brings the gateway's routes up to date once (so the fallback and the pin are in place when
    /// this returns), then watches in a task. `pin`: whether the tunnel captures the gateway.
    /// `path`: the client's path MTU, which is set to the path to `gateway` (its family, and a
    /// new search when the gateway is another) and whose link bound follows the MTU of that path
    /// (route MTU metric or interface MTU; RTM_NEWLINK and RTM_NEWROUTE wake the watcher).
    pub async fn start(
        gateway: IpAddr,
        tun_index: u32,
        pin: bool,
        on_change: UnderlayHook,
        path: Option<Arc<PathMtu>>,
    ) -> Result<Self, RoutesError> {
        let pinned = pin.then_some(gateway);
        // The one place that tells the path MTU which gateway its path goes to: a different one
        // (a failover) is a new path, searched afresh over its own family's overhead; the link
        // bound is then this gateway's, read just below.
        if let Some(p) = &path {
            p.set_gateway(gateway);
        }
        let follow = path.clone();
        let first = with_handle(|h| async move {
            let (first, routes) = look(&h, gateway, pinned, tun_index).await?;
            follow_mtu(&h, gateway, routes.as_deref().map(|r| (r, tun_index)), follow.as_deref()).await;
            Ok(first)
        })
        .await?;
        describe_path(gateway, first, true);
        let task = tokio::spawn(watch(gateway, pinned, tun_index, first, on_change, path));
        Ok(Self { gateway, pin, earlier: Vec::new(), task: Some(task) })
    }

    /// The gateway followed.
    pub fn gateway(&self) -> IpAddr {
        self.gateway
    }

    /// Follows `gateway` from now on (the client failed over to it), as [`UnderlayWatch::start`]
    /// does. The previous gateway's pin stays as last found (like the other gateways' pins, so
    /// failing back to it never enters the tunnel), and its fallback too; both go with
    /// [`UnderlayWatch::remove`]. On error nothing is followed; calling again retries.
    pub async fn switch_to(
        &mut self,
        gateway: IpAddr,
        tun_index: u32,
        pin: bool,
        on_change: UnderlayHook,
        path: Option<Arc<PathMtu>>,
    ) -> Result<(), RoutesError> {
        // Halted first: the old watcher must not set the path MTU after the new one has.
        self.halt().await;
        let next = Self::start(gateway, tun_index, pin, on_change, path).await?;
        let mut earlier = std::mem::take(&mut self.earlier);
        if self.pin && !earlier.contains(&self.gateway) {
            earlier.push(self.gateway);
        }
        earlier.retain(|g| *g != gateway);
        *self = Self { earlier, ..next };
        Ok(())
    }

    /// Stops watching (the routes stay as they are).
    async fn halt(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            // Only the cancellation comes back: the watcher never ends by itself.
            let _ = task.await;
        }
    }

    /// Stops watching and removes the gateway's pin and fallback (and those of the gateways
    /// followed before).
    pub async fn remove(mut self) -> Result<(), RoutesError> {
        self.halt().await;
        let mut targets: Vec<IpNet> = self.earlier.iter().copied().map(IpNet::from).collect();
        if self.pin {
            targets.push(IpNet::from(self.gateway));
        }
        if targets.is_empty() {
            return Ok(());
        }
        with_handle(
            |handle| async move { remove_matching(&handle, |r| r.ours && targets.contains(&r.net)).await.map(drop) },
        )
        .await
    }
}

/// One look at the underlay: pins (when `pin` names the gateway) and returns what the kernel
/// now does with the gateway's address, and the routing table read to pin (for the path MTU).
async fn look(
    handle: &Handle,
    gateway: IpAddr,
    pin: Option<IpAddr>,
    tun_index: u32,
) -> Result<(PathSeen, Option<Vec<DumpedRoute>>), RoutesError> {
    let routes = match pin {
        Some(gw) => Some(reconcile(handle, gw, tun_index).await?),
        None => None,
    };
    let seen = match lookup_route(handle, gateway).await {
        Ok(route) => {
            let src = route.attributes.iter().find_map(|a| match a {
                RouteAttribute::PrefSource(RouteAddress::Inet(v)) => Some(IpAddr::V4(*v)),
                RouteAttribute::PrefSource(RouteAddress::Inet6(v)) => Some(IpAddr::V6(*v)),
                _ => None,
            });
            underlay_of(gateway, &route).ok().map(|u| (u, src))
        }
        // Unreachable (our fallback) or no route at all.
        Err(_) => None,
    };
    Ok((seen, routes))
}

/// Makes the gateway's fallback and pin match the routing tables. Stateless: what is installed
/// is read back from the dump, since the kernel removes routes without telling (link down).
/// Returns that dump (as read before any change).
async fn reconcile(handle: &Handle, gw: IpAddr, tun_index: u32) -> Result<Vec<DumpedRoute>, RoutesError> {
    let routes = dump(handle, gw).await?;
    let host = IpNet::from(gw);
    let ours_for_gw = |r: &&DumpedRoute| r.ours && r.net == host && r.table == TABLE_MAIN;
    if !routes.iter().filter(ours_for_gw).any(|r| r.kind == RouteType::Unreachable) {
        add(handle, &RouteSpec::Unreachable { dst: gw }, false).await?;
    }
    let current = routes
        .iter()
        .filter(ours_for_gw)
        .find(|r| r.kind == RouteType::Unicast && r.priority == default_metric(gw))
        .and_then(|r| r.hops.first())
        .map(|h| match h.via {
            Some(via) => RouteSpec::Host { dst: gw, via, oif: h.oif },
            None => RouteSpec::OnLink { dst: gw, oif: h.oif },
        });
    let wanted = pin_for(gw, choose_underlay(&routes, gw, tun_index));
    match (current, wanted) {
        (current, wanted) if current == wanted => {}
        // One netlink call: the old path is replaced by the new, no gap in between.
        (Some(_), Some(next)) => add(handle, &next, true).await?,
        (None, Some(next)) => add(handle, &next, false).await?,
        (Some(stale), None) => match handle.route().del(message(&stale)).execute().await {
            Err(e) if !already_gone(&e) => {
                return Err(RoutesError::Remove { route: stale.to_string(), reason: e.to_string() });
            }
            _ => {}
        },
        (None, None) => {}
    }
    Ok(routes)
}

/// Adds `spec` (replacing the route of the same destination and metric when `replace`). A route
/// that already exists is fine: the next look compares again.
async fn add(handle: &Handle, spec: &RouteSpec, replace: bool) -> Result<(), RoutesError> {
    let req = handle.route().add(message(spec));
    let req = if replace { req.replace() } else { req };
    match req.execute().await {
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(RoutesError::Add { route: spec.to_string(), reason: e.to_string() }),
        Ok(()) => Ok(()),
    }
}

/// Every route of `like`'s family.
async fn dump(handle: &Handle, like: IpAddr) -> Result<Vec<DumpedRoute>, RoutesError> {
    let query = match like {
        IpAddr::V4(_) => RouteMessageBuilder::<Ipv4Addr>::new().build(),
        IpAddr::V6(_) => RouteMessageBuilder::<Ipv6Addr>::new().build(),
    };
    let mut routes = handle.route().get(query).execute();
    let mut out = Vec::new();
    while let Some(r) = routes.try_next().await.map_err(|e| RoutesError::List(e.to_string()))? {
        out.extend(parse_dumped(&r));
    }
    Ok(out)
}

/// A flapping link changes the path again and again: after one change at info, further ones
/// within this window are logged at debug, so the log shows the change, not every flap.
const PATH_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Logs a change of the gateway's path (once per change, not per event): at info when `loud`,
/// else at debug.
fn describe_path(gateway: IpAddr, now: PathSeen, loud: bool) {
    let line = match now {
        Some((u, src)) => {
            let via = u.via.map(|v| format!(" via {v}")).unwrap_or_default();
            let src = src.map(|s| format!(" from {s}")).unwrap_or_default();
            format!("gateway {gateway} reached{via} dev #{}{src}", u.oif)
        }
        None => format!(
            "no path to the gateway {gateway} outside the tunnel; it stays unreachable (never \
             routed into the tunnel) until one returns"
        ),
    };
    if loud {
        tracing::info!(target: TARGET, "{line}");
    } else {
        tracing::debug!(target: TARGET, "{line}");
    }
}

/// Pause before looking again after a look failed (a route add refused mid-change), or before
/// re-subscribing after the event socket failed (it should not).
const WATCH_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

/// Without events, look again this often anyway: a netlink socket that overflows during an event
/// storm drops notifications, and a look is one dump.
const WATCH_BACKSTOP: std::time::Duration = std::time::Duration::from_secs(30);

/// The watcher task: subscribe, look, then look again after every burst of events.
async fn watch(
    gateway: IpAddr,
    pin: Option<IpAddr>,
    tun_index: u32,
    mut last: PathSeen,
    on_change: UnderlayHook,
    path: Option<Arc<PathMtu>>,
) {
    use futures_util::StreamExt as _;
    let mut last_loud: Option<tokio::time::Instant> = None;
    let mut groups = vec![MulticastGroup::Link, MulticastGroup::Ipv4Ifaddr, MulticastGroup::Ipv4Route];
    if gateway.is_ipv6() {
        groups.extend([MulticastGroup::Ipv6Ifaddr, MulticastGroup::Ipv6Route]);
    }
    loop {
        match rtnetlink::new_multicast_connection(&groups) {
            Ok((conn, handle, mut events)) => {
                let follow = async {
                    // Subscribed first, then looked: nothing between the two is missed.
                    loop {
                        let wait = match look(&handle, gateway, pin, tun_index).await {
                            Ok((now, routes)) => {
                                if now != last {
                                    let t = tokio::time::Instant::now();
                                    let loud = last_loud.is_none_or(|l| t - l >= PATH_LOG_EVERY);
                                    if loud {
                                        last_loud = Some(t);
                                    }
                                    describe_path(gateway, now, loud);
                                    last = now;
                                    on_change();
                                }
                                let pinned = routes.as_deref().map(|r| (r, tun_index));
                                follow_mtu(&handle, gateway, pinned, path.as_deref()).await;
                                WATCH_BACKSTOP
                            }
                            Err(e) => {
                                tracing::debug!(target: TARGET, "underlay look failed: {e}");
                                WATCH_RETRY
                            }
                        };
                        // Wait for the next event (or the timeout), then take the whole burst.
                        if let Ok(None) = tokio::time::timeout(wait, events.next()).await {
                            return;
                        }
                        while events.try_recv().is_ok() {}
                    }
                };
                tokio::select! {
                    () = conn => {}
                    () = follow => {}
                }
                tracing::debug!(target: TARGET, "underlay event socket closed; re-subscribing");
            }
            Err(e) => tracing::debug!(target: TARGET, "cannot watch the underlay: {e}"),
        }
        tokio::time::sleep(WATCH_RETRY).await;
    }
}

/// Why the tunnel's routes or resolver could not be set up or restored.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Routes(#[from] RoutesError),
    #[error(transparent)]
    Dns(#[from] DnsError),
}

/// Everything the client changes on the host when its tunnel comes up, for a client file: the
/// routes ([`Routes::install`] with [`tunnel_cidrs`] of `[network] routes` and `dns`), the
/// [`UnderlayWatch`] that keeps the gateway's own path outside the tunnel, and the resolver
/// ([`Dns::apply`] with `[network] dns`). Brought up once, when the TUN device exists; left alone
/// on re-auth; [`TunnelNetwork::down`] on an explicit stop.
#[must_use = "call down() on stop"]
#[derive(Debug)]
pub struct TunnelNetwork {
    routes: RouteGuard,
    underlay: UnderlayWatch,
    dns: DnsGuard,
    /// The resolvers and search domains `dns` set (to tell whether a new snapshot changes them).
    dns_set: (Vec<IpAddr>, Vec<String>),
    tun: String,
    /// The data plane's path MTU, which the watcher keeps following after a re-attach.
    path_mtu: Option<Arc<PathMtu>>,
    /// The gateways learnt while running ([`TunnelNetwork::pin_gateways`]), pinned again after
    /// a re-attach.
    learnt: Vec<IpAddr>,
}

impl TunnelNetwork {
    /// Installs the routes, starts following the underlay towards `gateway`, the gateway in use
    /// (calling `on_underlay_change` on each change of the path to it, and keeping `path_mtu`'s
    /// link bound on the MTU of that path), then points the resolver at the tunnel. On error
    /// everything done so far is undone and the error returned (nothing half-done stays).
    /// [`TunnelNetwork::follow_gateway`] follows a failover.
    ///
    /// The resolvers are `[network] dns` applied to what the gateway pushed (`pushed`, from the
    /// current snapshot); [`TunnelNetwork::update_dns`] follows later snapshots.
    pub async fn up(
        file: &ClientFile,
        gateway: IpAddr,
        pushed: &PushedDns,
        on_underlay_change: UnderlayHook,
        path_mtu: Option<Arc<PathMtu>>,
    ) -> Result<Self, NetworkError> {
        let net = &file.network;
        let (tun, cidrs) = tun_and_cidrs(file);
        let routes = install(file, tun, &cidrs, gateway).await?;
        let underlay = Self::watch_underlay(tun, &cidrs, gateway, on_underlay_change, path_mtu.clone()).await;
        let underlay = match underlay {
            Ok(u) => u,
            Err(e) => {
                if let Err(undo) = routes.restore().await {
                    tracing::warn!(target: TARGET, "{undo}");
                }
                return Err(e.into());
            }
        };
        let dns_set = net.dns.effective(&pushed.servers, &pushed.search_domains);
        match Dns::apply(tun, &dns_set.0, &dns_set.1) {
            Ok(dns) => Ok(Self { routes, underlay, dns, dns_set, tun: tun.to_owned(), path_mtu, learnt: Vec::new() }),
            Err(e) => {
                if let Err(undo) = Self::remove_routes(routes, underlay).await {
                    tracing::warn!(target: TARGET, "{undo}");
                }
                Err(e.into())
            }
        }
    }

    /// Pins the deployment's gateways learnt while running (see [`RouteGuard::pin_more`]), now
    /// and after every re-attach.
    pub async fn pin_gateways(&mut self, gateways: &[IpAddr]) -> Result<usize, NetworkError> {
        self.learnt = gateways.to_vec();
        Ok(self.routes.pin_more(&self.tun, gateways).await?)
    }

    /// The resolvers set now (empty: the system's own were left alone).
    pub fn resolvers(&self) -> &[IpAddr] {
        &self.dns_set.0
    }

    /// Follows a new snapshot's resolvers: when `[network] dns` applied to `pushed` gives other
    /// resolvers than those set, sets them (or restores the system's when there are none now).
    /// Returns whether anything changed.
    pub fn update_dns(&mut self, file: &ClientFile, pushed: &PushedDns) -> Result<bool, DnsError> {
        let want = file.network.dns.effective(&pushed.servers, &pushed.search_domains);
        if want == self.dns_set {
            return Ok(false);
        }
        if want.0.is_empty() {
            std::mem::replace(&mut self.dns, DnsGuard::unset()).restore()?;
        } else {
            // Applying over our own file keeps the original it recorded, so the guard of the
            // previous setting is not needed to restore it.
            self.dns = Dns::apply(&self.tun, &want.0, &want.1)?;
        }
        self.dns_set = want;
        Ok(true)
    }

    /// Starts following the underlay towards `gateway` (the gateway in use: its pin, and the
    /// path MTU) on the TUN `tun`, whose routes are `cidrs`.
    async fn watch_underlay(
        tun: &str,
        cidrs: &[IpNet],
        gateway: IpAddr,
        on_underlay_change: UnderlayHook,
        path_mtu: Option<Arc<PathMtu>>,
    ) -> Result<UnderlayWatch, RoutesError> {
        let captured = captures(cidrs, gateway);
        UnderlayWatch::start(gateway, ifindex(tun)?, captured, on_underlay_change, path_mtu).await
    }

    /// Follows the gateway in use after a failover to `gateway`: its path is the one pinned and
    /// whose MTU the data plane uses from now on (see [`UnderlayWatch::switch_to`]). Nothing
    /// when it is the gateway followed already. On error the caller retries.
    pub async fn follow_gateway(
        &mut self,
        file: &ClientFile,
        gateway: IpAddr,
        on_underlay_change: UnderlayHook,
    ) -> Result<(), NetworkError> {
        if self.underlay.gateway() == gateway && self.underlay.task.is_some() {
            return Ok(());
        }
        let (tun, cidrs) = tun_and_cidrs(file);
        let captured = captures(&cidrs, gateway);
        let tun_index = ifindex(tun)?;
        self.underlay.switch_to(gateway, tun_index, captured, on_underlay_change, self.path_mtu.clone()).await?;
        tracing::info!(target: TARGET, "following the path to the gateway in use, {gateway}");
        Ok(())
    }

    /// Puts the routes (and per-link DNS settings) back on a TUN device that was re-created
    /// under the same name: the kernel removed the old device's routes with it, and the underlay
    /// watcher must follow the new interface index. The resolver file, if that is the backend,
    /// never went away. On error the caller retries; the kill-switch blocks meanwhile.
    pub async fn reattach(&mut self, file: &ClientFile, on_underlay_change: UnderlayHook) -> Result<(), NetworkError> {
        self.underlay.halt().await;
        let gateway = self.underlay.gateway();
        let (tun, cidrs) = tun_and_cidrs(file);
        // Also removes what is left of ours (the gateways' pins and fallbacks) before adding.
        let routes = install(file, tun, &cidrs, gateway).await?;
        // The old guard's routes are gone (with the device, or removed as stale just now).
        let _old = std::mem::replace(&mut self.routes, routes);
        // The file's gateways are covered by the install; the learnt ones are pinned again. A
        // failure there is logged, not retried: failing over to such a gateway fails like any
        // unreachable one, and nothing leaks.
        if !self.learnt.is_empty()
            && let Err(e) = self.routes.pin_more(tun, &self.learnt).await
        {
            tracing::warn!(target: TARGET, "cannot route to the deployment's gateways: {e}");
        }
        self.underlay = Self::watch_underlay(tun, &cidrs, gateway, on_underlay_change, self.path_mtu.clone()).await?;
        self.dns.reattach(&self.dns_set.0, &self.dns_set.1)?;
        Ok(())
    }

    /// The routes that were added at start (the gateway's pin and fallback, which follow the
    /// underlay, not included).
    pub fn routes(&self) -> &[RouteSpec] {
        self.routes.routes()
    }

    /// Restores the resolver, then removes the routes. Both are attempted; the first error is
    /// returned.
    pub async fn down(mut self) -> Result<(), NetworkError> {
        // The watcher stops first, so it cannot put a pin back while the routes go.
        self.underlay.halt().await;
        let dns = self.dns.restore();
        let routes = Self::remove_routes(self.routes, self.underlay).await;
        dns?;
        routes?;
        Ok(())
    }

    /// The tunnel routes first, then the gateway's pin and fallback: while the tunnel routes
    /// exist, the gateway never loses the routes that keep it out of the tunnel.
    async fn remove_routes(routes: RouteGuard, underlay: UnderlayWatch) -> Result<(), RoutesError> {
        let tunnel = routes.restore().await;
        let gateway = underlay.remove().await;
        tunnel?;
        gateway
    }
}

/// [`Routes::install_for`] on `tun` with `cidrs` ([`tun_and_cidrs`] of `file`) for `gateway`,
/// the gateway in use, and the other gateways of the deployment `file` names.
async fn install(file: &ClientFile, tun: &str, cidrs: &[IpNet], gateway: IpAddr) -> Result<RouteGuard, RoutesError> {
    let others: Vec<IpAddr> = file.all_endpoints().iter().map(|e| e.ip()).collect();
    Routes::install_for(tun, gateway, &others, cidrs).await
}

/// The TUN name and the CIDRs routed through it, for a client file.
fn tun_and_cidrs(file: &ClientFile) -> (&str, Vec<IpNet>) {
    let net = &file.network;
    let tun = net.tun_name.as_deref().unwrap_or(DEFAULT_TUN_NAME);
    let mut cidrs = tunnel_cidrs(net.routes.as_deref(), net.dns.configured());
    if !crate::tunnel::device_has_ipv6(tun) {
        // The kernel refuses IPv6 routes on it (IPv6 disabled, or a TUN MTU below IPv6's
        // minimum); there is no IPv6 traffic to route either. They are added when it has IPv6
        // again (`ClientDataPlane::tun_readdressed` -> `TunnelNetwork::reattach`).
        cidrs.retain(|n| n.addr().is_ipv4());
    }
    (tun, cidrs)
}

/// The index of interface `name` in the calling thread's network namespace.
fn ifindex(name: &str) -> Result<u32, RoutesError> {
    let missing = || RoutesError::NoInterface(name.to_owned());
    let c = std::ffi::CString::new(name).map_err(|_| missing())?;
    // SAFETY: `c` is a valid NUL-terminated string; if_nametoindex only reads it.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(missing()),
        i => Ok(i),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_lookup_answered_from_a_path_mtu_exception_is_told_apart() {
        use rtnetlink::packet_route::route::RouteCacheInfo;
        let exception = |expires: u32| {
            // struct rta_cacheinfo: eight native-endian u32, `expires` the third.
            let mut raw = [0u8; 32];
            raw[8..12].copy_from_slice(&expires.to_ne_bytes());
            vec![
                RouteAttribute::Metrics(vec![RouteMetric::Mtu(1280)]),
                RouteAttribute::CacheInfo(RouteCacheInfo::parse(&raw).unwrap()),
            ]
        };
        assert!(from_exception(&exception(58_000)));
        assert!(!from_exception(&exception(0)));
        assert!(!from_exception(&[RouteAttribute::Metrics(vec![RouteMetric::Mtu(1400)])]));
    }

    #[test]
    fn path_mtu_prefers_the_route_metric_then_the_link() {
        assert_eq!(choose_path_mtu(Some(1400), Some(1500)), Some(1400));
        assert_eq!(choose_path_mtu(None, Some(1280)), Some(1280));
        assert_eq!(choose_path_mtu(Some(0), Some(1280)), Some(1280), "0 means unset");
        assert_eq!(choose_path_mtu(None, Some(65536)), Some(u16::MAX), "loopback, capped");
        assert_eq!(choose_path_mtu(None, None), None);
        assert_eq!(choose_path_mtu(Some(0), Some(0)), None);
    }

    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn full_tunnel_by_default() {
        assert_eq!(tunnel_cidrs(None, &[]), nets(&["0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"]));
        // A default route in the config becomes its family's two halves.
        assert_eq!(tunnel_cidrs(Some(&nets(&["0.0.0.0/0"])), &[]), nets(&["0.0.0.0/1", "128.0.0.0/1"]));
        assert_eq!(tunnel_cidrs(Some(&nets(&["::/0"])), &[]), nets(&["::/1", "8000::/1"]));
    }

    #[test]
    fn split_tunnel_normalises_and_adds_uncovered_dns() {
        let configured = nets(&["10.1.2.3/16", "10.1.0.0/16", "172.16.0.0/12"]);
        let dns: Vec<IpAddr> =
            vec!["10.1.9.9".parse().unwrap(), "100.64.0.1".parse().unwrap(), "2001:2::53".parse().unwrap()];
        assert_eq!(
            tunnel_cidrs(Some(&configured), &dns),
            nets(&["10.1.0.0/16", "100.64.0.1/32", "172.16.0.0/12", "2001:2::53/128"])
        );
        // Split-tunnel IPv6 CIDRs are normalised like IPv4 ones.
        assert_eq!(
            tunnel_cidrs(Some(&nets(&["fd00:1::5/64", "2001:db8::/32"])), &[]),
            nets(&["2001:db8::/32", "fd00:1::/64"])
        );
        // Full tunnel already covers every resolver.
        assert_eq!(tunnel_cidrs(None, &dns).len(), 4);
    }

    #[test]
    fn host_route_only_when_routed_and_captured() {
        let gw: IpAddr = "203.0.113.7".parse().unwrap();
        let routed = Underlay { via: Some("192.168.1.1".parse().unwrap()), oif: 2 };
        let full = tunnel_cidrs(None, &[]);
        assert_eq!(
            plan(gw, routed, 9, &full).unwrap(),
            vec![
                RouteSpec::Host { dst: gw, via: "192.168.1.1".parse().unwrap(), oif: 2 },
                RouteSpec::Tunnel { net: full[0], oif: 9 },
                RouteSpec::Tunnel { net: full[1], oif: 9 },
                RouteSpec::Tunnel { net: full[2], oif: 9 },
                RouteSpec::Tunnel { net: full[3], oif: 9 },
            ]
        );
        // Directly connected gateway: no host route.
        let connected = Underlay { via: None, oif: 2 };
        assert_eq!(plan(gw, connected, 9, &full).unwrap().len(), 4);
        // Split tunnel that does not cover the gateway: no host route either.
        let split = nets(&["10.0.0.0/8"]);
        assert_eq!(plan(gw, routed, 9, &split).unwrap(), vec![RouteSpec::Tunnel { net: split[0], oif: 9 }]);
        // IPv6 gateway: the IPv6 full tunnel captures it, so it is pinned like an IPv4 one...
        let gw6: IpAddr = "2001:db8::1".parse().unwrap();
        let routed6 = Underlay { via: Some("fe80::1".parse().unwrap()), oif: 2 };
        assert_eq!(
            plan(gw6, routed6, 9, &full).unwrap()[0],
            RouteSpec::Host { dst: gw6, via: "fe80::1".parse().unwrap(), oif: 2 }
        );
        // ... but an IPv4-only split tunnel does not.
        assert_eq!(plan(gw6, routed6, 9, &split).unwrap().len(), 1);
        assert!(!captures(&full, "::1".parse().unwrap()), "loopback is never captured");
    }

    #[test]
    fn refuses_a_gateway_routed_through_the_tunnel() {
        let gw: IpAddr = "203.0.113.7".parse().unwrap();
        let looped = Underlay { via: None, oif: 9 };
        assert!(matches!(plan(gw, looped, 9, &FULL_TUNNEL), Err(RoutesError::GatewayViaTunnel(_))));
    }

    #[test]
    fn messages_carry_our_protocol_and_the_right_shape() {
        let host = RouteSpec::Host { dst: "203.0.113.7".parse().unwrap(), via: "192.168.1.1".parse().unwrap(), oif: 2 };
        let m = message(&host);
        assert_eq!(m.header.protocol, RouteProtocol::Other(ROUTE_PROTOCOL));
        assert_eq!(m.header.destination_prefix_length, 32);
        assert!(m.attributes.contains(&RouteAttribute::Gateway(RouteAddress::Inet("192.168.1.1".parse().unwrap()))));
        assert!(m.attributes.contains(&RouteAttribute::Oif(2)));

        let tun = message(&RouteSpec::Tunnel { net: FULL_TUNNEL[1], oif: 9 });
        assert_eq!(tun.header.scope, RouteScope::Link);
        assert_eq!(tun.header.destination_prefix_length, 1);
        assert!(tun.attributes.contains(&RouteAttribute::Destination(RouteAddress::Inet(Ipv4Addr::new(128, 0, 0, 0)))));
        assert!(!tun.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(_))));
        let tun6 = message(&RouteSpec::Tunnel { net: FULL_TUNNEL[3], oif: 9 });
        assert_eq!(tun6.header.address_family, AddressFamily::Inet6);
        assert_eq!(tun6.header.destination_prefix_length, 1);
        assert!(tun6.attributes.contains(&RouteAttribute::Destination(RouteAddress::Inet6("8000::".parse().unwrap()))));

        let host6 =
            message(&RouteSpec::Host { dst: "2001:2::1".parse().unwrap(), via: "fe80::1".parse().unwrap(), oif: 3 });
        assert_eq!(host6.header.destination_prefix_length, 128);
    }

    #[test]
    fn display_names_the_route() {
        let s = RouteSpec::Tunnel { net: FULL_TUNNEL[0], oif: 7 }.to_string();
        assert_eq!(s, "0.0.0.0/1 dev #7");
    }

    #[test]
    fn unknown_interface_is_a_clear_error() {
        assert!(matches!(ifindex("nope-holdfast"), Err(RoutesError::NoInterface(_))));
        assert!(matches!(ifindex("a\0b"), Err(RoutesError::NoInterface(_))));
    }

    const TUN: u32 = 9;

    fn hop(via: Option<&str>, oif: u32) -> NextHop {
        NextHop { via: via.map(|v| v.parse().unwrap()), oif, alive: true }
    }

    fn route(net: &str, priority: u32, hops: Vec<NextHop>) -> DumpedRoute {
        DumpedRoute {
            net: net.parse().unwrap(),
            table: TABLE_MAIN,
            kind: RouteType::Unicast,
            priority,
            ours: false,
            hops,
            mtu: None,
        }
    }

    fn pin(via: Option<&str>, oif: u32) -> UnderlayChoice {
        UnderlayChoice::Pin(Underlay { via: via.map(|v| v.parse().unwrap()), oif })
    }

    /// A laptop: wired and wireless default routes, their subnets, our tunnel routes, our pin
    /// and fallback, and the gateway somewhere on the internet.
    fn laptop() -> Vec<DumpedRoute> {
        let ours = |mut r: DumpedRoute| {
            r.ours = true;
            r
        };
        let mut fallback = ours(route("203.0.113.7/32", FALLBACK_METRIC, vec![hop(None, 0)]));
        fallback.kind = RouteType::Unreachable;
        vec![
            route("0.0.0.0/0", 100, vec![hop(Some("192.168.1.1"), 2)]),
            route("0.0.0.0/0", 600, vec![hop(Some("10.0.0.1"), 3)]),
            route("192.168.1.0/24", 100, vec![hop(None, 2)]),
            route("10.0.0.0/24", 600, vec![hop(None, 3)]),
            ours(route("0.0.0.0/1", 0, vec![hop(None, TUN)])),
            ours(route("128.0.0.0/1", 0, vec![hop(None, TUN)])),
            // A stale pin of ours: never a candidate.
            ours(route("203.0.113.7/32", 0, vec![hop(Some("172.16.0.1"), 4)])),
            fallback,
        ]
    }

    #[test]
    fn the_underlay_is_the_best_route_that_is_not_ours_nor_the_tunnel() {
        let gw: IpAddr = "203.0.113.7".parse().unwrap();
        let mut routes = laptop();
        // Lowest metric wins among equal prefixes.
        assert_eq!(choose_underlay(&routes, gw, TUN), pin(Some("192.168.1.1"), 2));
        // Wired link down: its routes are flagged (or gone); wireless takes over.
        routes[0].hops[0].alive = false;
        assert_eq!(choose_underlay(&routes, gw, TUN), pin(Some("10.0.0.1"), 3));
        // Only our own routes and the tunnel left: no path, whatever ours say.
        routes.drain(..4);
        assert_eq!(choose_underlay(&routes, gw, TUN), UnderlayChoice::NoPath);
        // A gateway on a connected subnet: on the link, no router.
        let near: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(choose_underlay(&laptop(), near, TUN), pin(None, 3));
        // A longer prefix beats a lower metric.
        let mut routes = laptop();
        routes.push(route("203.0.113.0/24", 1000, vec![hop(Some("10.0.0.254"), 3)]));
        assert_eq!(choose_underlay(&routes, gw, TUN), pin(Some("10.0.0.254"), 3));
    }

    #[test]
    fn nothing_to_pin_for_a_local_or_already_pinned_gateway_and_no_path_when_forbidden() {
        let gw: IpAddr = "203.0.113.7".parse().unwrap();
        // An administrator's own host route already pins it.
        let mut routes = laptop();
        routes.push(route("203.0.113.7/32", 0, vec![hop(Some("10.0.0.1"), 3)]));
        assert_eq!(choose_underlay(&routes, gw, TUN), UnderlayChoice::Unpinned);
        // A local address of this host.
        let mut routes = laptop();
        let mut local = route("203.0.113.7/32", 0, vec![hop(None, 1)]);
        (local.table, local.kind) = (TABLE_LOCAL, RouteType::Local);
        routes.push(local);
        assert_eq!(choose_underlay(&routes, gw, TUN), UnderlayChoice::Unpinned);
        // An administrator's unreachable route: respected, not routed around.
        let mut routes = laptop();
        let mut forbidden = route("203.0.113.0/24", 0, vec![]);
        forbidden.kind = RouteType::Prohibit;
        routes.push(forbidden);
        assert_eq!(choose_underlay(&routes, gw, TUN), UnderlayChoice::NoPath);
        // Other tables and routes through the tunnel are not the underlay.
        let mut other = route("203.0.113.0/24", 0, vec![hop(Some("10.0.0.77"), 3)]);
        other.table = 100;
        let via_tun = route("203.0.113.0/25", 0, vec![hop(None, TUN)]);
        let mut routes = laptop();
        routes.extend([other, via_tun]);
        assert_eq!(choose_underlay(&routes, gw, TUN), pin(Some("192.168.1.1"), 2));
    }

    #[test]
    fn an_ipv6_gateway_is_chosen_the_same_way() {
        let gw: IpAddr = "2001:db8:77::1".parse().unwrap();
        let ours = |mut r: DumpedRoute| {
            r.ours = true;
            r
        };
        let mut routes = vec![
            route("::/0", 1024, vec![hop(Some("fe80::1"), 2)]),
            route("2001:db8:1::/64", 256, vec![hop(None, 2)]),
            route("fe80::/64", 256, vec![hop(None, 2)]),
            ours(route("::/1", 1024, vec![hop(None, TUN)])),
            ours(route("8000::/1", 1024, vec![hop(None, TUN)])),
        ];
        assert_eq!(choose_underlay(&routes, gw, TUN), pin(Some("fe80::1"), 2));
        assert_eq!(
            pin_for(gw, pin(Some("fe80::1"), 2)),
            Some(RouteSpec::Host { dst: gw, via: "fe80::1".parse().unwrap(), oif: 2 })
        );
        // On the link: an on-link /128.
        let near: IpAddr = "2001:db8:1::9".parse().unwrap();
        assert_eq!(choose_underlay(&routes, near, TUN), pin(None, 2));
        assert_eq!(pin_for(near, pin(None, 2)), Some(RouteSpec::OnLink { dst: near, oif: 2 }));
        // Someone else's /128 already pins it.
        routes.push(route("2001:db8:77::1/128", 1024, vec![hop(Some("fe80::2"), 2)]));
        assert_eq!(choose_underlay(&routes, gw, TUN), UnderlayChoice::Unpinned);
        // Default route gone: no path.
        assert_eq!(choose_underlay(&routes[1..5], gw, TUN), UnderlayChoice::NoPath);
        assert_eq!(default_metric(gw), 1024);
    }

    #[test]
    fn a_pinned_gateways_path_mtu_is_the_metric_of_the_route_the_pin_copies() {
        let gw: IpAddr = "203.0.113.7".parse().unwrap();
        let mut routes = laptop();
        // The wired default route says its path is narrower than the link (PPPoE behind it).
        routes[0].mtu = Some(1492);
        let (choice, route) = underlay_route(&routes, gw, TUN);
        assert_eq!(choice, pin(Some("192.168.1.1"), 2));
        assert_eq!(route.and_then(|r| r.mtu), Some(1492));
        // Our own pin (no metric) never decides, however it is set.
        assert!(routes.iter().any(|r| r.ours && r.net == IpNet::from(gw) && r.mtu.is_none()));
        // Wired down: the wireless route, without a metric (its interface's MTU applies).
        routes[0].hops[0].alive = false;
        let (choice, route) = underlay_route(&routes, gw, TUN);
        assert_eq!((choice, route.and_then(|r| r.mtu)), (pin(Some("10.0.0.1"), 3), None));
        // The metric is read back from a netlink message.
        let mut m = message(&RouteSpec::OnLink { dst: gw, oif: 2 });
        m.attributes.push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(1400)]));
        assert_eq!(parse_dumped(&m).unwrap().mtu, Some(1400));
    }

    #[test]
    fn multipath_takes_the_first_live_next_hop() {
        let gw: IpAddr = "203.0.113.7".parse().unwrap();
        let mut dead = hop(Some("192.168.1.1"), 2);
        dead.alive = false;
        let routes = vec![route("0.0.0.0/0", 0, vec![dead, hop(Some("10.0.0.1"), 3)])];
        assert_eq!(choose_underlay(&routes, gw, TUN), pin(Some("10.0.0.1"), 3));
    }

    #[test]
    fn pins_and_fallback_are_shaped_as_the_kernel_needs() {
        let gw: IpAddr = "198.18.0.2".parse().unwrap();
        assert_eq!(pin_for(gw, pin(None, 2)), Some(RouteSpec::OnLink { dst: gw, oif: 2 }));
        assert_eq!(
            pin_for(gw, pin(Some("198.18.1.1"), 2)),
            Some(RouteSpec::Host { dst: gw, via: "198.18.1.1".parse().unwrap(), oif: 2 })
        );
        assert_eq!(pin_for(gw, UnderlayChoice::NoPath), None);
        assert_eq!(pin_for(gw, UnderlayChoice::Unpinned), None);

        let on_link = message(&RouteSpec::OnLink { dst: gw, oif: 2 });
        assert_eq!(on_link.header.scope, RouteScope::Link);
        assert_eq!(on_link.header.destination_prefix_length, 32);
        assert!(on_link.attributes.contains(&RouteAttribute::Oif(2)));
        let fallback = message(&RouteSpec::Unreachable { dst: gw });
        assert_eq!(fallback.header.kind, RouteType::Unreachable);
        assert_eq!(fallback.header.protocol, RouteProtocol::Other(ROUTE_PROTOCOL));
        assert!(fallback.attributes.contains(&RouteAttribute::Priority(FALLBACK_METRIC)));
        assert!(!fallback.attributes.iter().any(|a| matches!(a, RouteAttribute::Oif(_))));
        // Our own messages read back as ours, with what the chooser needs.
        let back = parse_dumped(&fallback).unwrap();
        assert!(back.ours);
        assert_eq!((back.net, back.priority), (IpNet::from(gw), FALLBACK_METRIC));
        let back =
            parse_dumped(&message(&RouteSpec::Host { dst: gw, via: "198.18.1.1".parse().unwrap(), oif: 2 })).unwrap();
        assert_eq!(back.hops, vec![hop(Some("198.18.1.1"), 2)]);
        assert_eq!(back.table, TABLE_MAIN);
        // IPv6 pins and fallbacks read back as /128s of their family.
        let gw6: IpAddr = "2001:db8::1".parse().unwrap();
        let v6 =
            parse_dumped(&message(&RouteSpec::Host { dst: gw6, via: "fe80::1".parse().unwrap(), oif: 3 })).unwrap();
        assert_eq!((v6.net, v6.hops.clone()), (IpNet::from(gw6), vec![hop(Some("fe80::1"), 3)]));
        let fb6 = parse_dumped(&message(&RouteSpec::Unreachable { dst: gw6 })).unwrap();
        assert_eq!((fb6.net.prefix_len(), fb6.kind, fb6.ours), (128, RouteType::Unreachable, true));
        assert_eq!(RouteSpec::Unreachable { dst: gw }.to_string(), "unreachable 198.18.0.2 metric 4294967295");
        let on_link6 = message(&RouteSpec::OnLink { dst: gw6, oif: 2 });
        assert_eq!(on_link6.header.destination_prefix_length, 128);
        // A path MTU exception in a dump (a "cache" entry, RTM_F_CLONED) is no route.
        let mut exception = message(&RouteSpec::Host { dst: gw, via: "198.18.1.1".parse().unwrap(), oif: 2 });
        exception.header.protocol = RouteProtocol::Unspec;
        exception.header.flags |= RouteFlags::Cloned;
        assert_eq!(parse_dumped(&exception), None);
    }
}
