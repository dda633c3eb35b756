//! Routes through the tunnel (rtnetlink).
//!
//! Installed once, when the TUN device comes up, and never touched on re-auth (the tunnel and the
//! assigned address outlive every session). [`Routes::install`]:
//! 1. removes routes a killed run left behind (every route we add carries [`ROUTE_PROTOCOL`], so
//!    they are recognisable; the TUN's own routes died with it, the host route did not);
//! 2. asks the kernel how it reaches the gateway right now (`ip route get`, which follows whatever
//!    default route, more specific route or multipath choice applies) and, if that path goes
//!    through a router and the tunnel routes would capture the gateway, pins it with a host
//!    route; a gateway on a directly connected subnet needs none;
//! 3. adds the tunnel routes on the TUN: `0.0.0.0/1` and `128.0.0.0/1` (more specific than any
//!    default route, which is left alone) or the configured split-tunnel CIDRs.
//!
//! It returns a [`RouteGuard`] that removes exactly those routes on an explicit stop. The pure
//! part — which routes — is [`tunnel_cidrs`] and [`plan`], unit-tested below.
//!
//! Known limit: the host route pins the gateway to the router seen at install time. Moving to
//! another network removes it with its interface; the gateway is then routed into the tunnel
//! until the client restarts. (Policy routing on a socket mark would follow roaming; it is not
//! what issue 4 asks for.)

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt as _;
use ipnet::Ipv4Net;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteVia,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::dataplane::DEFAULT_TUN_NAME;
use super::dns::{Dns, DnsError, DnsGuard};
use crate::config::client::ClientFile;

const TARGET: &str = "holdfast::routes";

/// The routing protocol number every route of ours carries (`ip route` shows `proto 207`). Not one
/// of iproute2's named protocols, so no other software uses it; it is how leftovers of a killed
/// run are found.
pub const ROUTE_PROTOCOL: u8 = 207;

/// The full tunnel: two halves of the IPv4 space, more specific than the default route, so the
/// default route is never replaced (and comes back untouched on stop).
pub const FULL_TUNNEL: [Ipv4Net; 2] = [
    // Evaluated at compile time: a bad prefix length would fail the build, not panic at run time.
    Ipv4Net::new_assert(Ipv4Addr::new(0, 0, 0, 0), 1),
    Ipv4Net::new_assert(Ipv4Addr::new(128, 0, 0, 0), 1),
];

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
    /// The gateway's address (a /32 or /128) via the original router.
    Host { dst: IpAddr, via: IpAddr, oif: u32 },
    /// A tunnel route on the TUN device.
    Tunnel { net: Ipv4Net, oif: u32 },
}

impl fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteSpec::Host { dst, via, oif } => write!(f, "{dst} via {via} dev #{oif}"),
            RouteSpec::Tunnel { net, oif } => write!(f, "{net} dev #{oif}"),
        }
    }
}

/// The CIDRs to route through the tunnel: `configured` (a split tunnel) or the full tunnel when
/// `None`. `0.0.0.0/0` becomes the two halves (it would collide with the default route); host bits
/// are cleared and duplicates dropped. Each IPv4 DNS server not already covered gets a /32, so the
/// resolver is reached through the tunnel (the kill-switch lets DNS out nowhere else).
pub fn tunnel_cidrs(configured: Option<&[Ipv4Net]>, dns: &[IpAddr]) -> Vec<Ipv4Net> {
    let mut nets: Vec<Ipv4Net> = Vec::new();
    for net in configured.unwrap_or(&FULL_TUNNEL) {
        if net.prefix_len() == 0 {
            nets.extend(FULL_TUNNEL);
        } else {
            nets.push(net.trunc());
        }
    }
    for ip in dns {
        if let IpAddr::V4(v4) = ip
            && !nets.iter().any(|n| n.contains(v4))
        {
            nets.push(Ipv4Net::from(*v4));
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
    cidrs: &[Ipv4Net],
) -> Result<Vec<RouteSpec>, RoutesError> {
    if underlay.oif == tun_index {
        return Err(RoutesError::GatewayViaTunnel(gateway));
    }
    let captured = match gateway {
        IpAddr::V4(v4) => cidrs.iter().any(|n| n.contains(&v4)),
        // The tunnel carries IPv4 only.
        IpAddr::V6(_) => false,
    };
    let mut routes = Vec::with_capacity(cidrs.len() + 1);
    if let (true, Some(via)) = (captured, underlay.via) {
        routes.push(RouteSpec::Host { dst: gateway, via, oif: underlay.oif });
    }
    routes.extend(cidrs.iter().map(|&net| RouteSpec::Tunnel { net, oif: tun_index }));
    Ok(routes)
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
        RouteSpec::Tunnel { net, oif } => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(net.addr(), net.prefix_len())
            .output_interface(oif)
            .scope(RouteScope::Link)
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
    pub async fn install(
        tun_name: &str,
        gateway: IpAddr,
        cidrs: &[Ipv4Net],
    ) -> Result<RouteGuard, RoutesError> {
        let tun_index = ifindex(tun_name)?;
        with_handle(|handle| async move {
            let stale = remove_ours(&handle).await?;
            if stale > 0 {
                tracing::info!(target: TARGET, "removed {stale} route(s) a previous run left");
            }
            let underlay = lookup(&handle, gateway).await?;
            let specs = plan(gateway, underlay, tun_index, cidrs)?;
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
            first_error.get_or_insert(RoutesError::Remove {
                route: spec.to_string(),
                reason: e.to_string(),
            });
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// How the kernel routes `gateway` now.
async fn lookup(handle: &Handle, gateway: IpAddr) -> Result<Underlay, RoutesError> {
    let query = match gateway {
        IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(a, 32).build(),
        IpAddr::V6(a) => RouteMessageBuilder::<Ipv6Addr>::new().destination_prefix(a, 128).build(),
    };
    let no_path = |reason: String| RoutesError::NoPathToGateway { gateway, reason };
    let route = handle
        .route()
        .get(query)
        .execute()
        .try_next()
        .await
        .map_err(|e| no_path(e.to_string()))?
        .ok_or_else(|| no_path("the kernel returned no route".into()))?;
    let mut via = None;
    let mut oif = None;
    for attr in &route.attributes {
        match attr {
            RouteAttribute::Gateway(RouteAddress::Inet(a)) => via = Some(IpAddr::V4(*a)),
            RouteAttribute::Gateway(RouteAddress::Inet6(a)) => via = Some(IpAddr::V6(*a)),
            RouteAttribute::Via(RouteVia::Inet6(a)) => via = Some(IpAddr::V6(*a)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let oif = oif.ok_or_else(|| no_path("the route has no outgoing interface".into()))?;
    Ok(Underlay { via, oif })
}

/// Removes every route carrying [`ROUTE_PROTOCOL`] (IPv4 and IPv6, any table); returns how many.
async fn remove_ours(handle: &Handle) -> Result<usize, RoutesError> {
    let mut ours = Vec::new();
    for dump in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut routes = handle.route().get(dump).execute();
        while let Some(r) = routes.try_next().await.map_err(|e| RoutesError::List(e.to_string()))? {
            if r.header.protocol == RouteProtocol::Other(ROUTE_PROTOCOL) {
                ours.push(r);
            }
        }
    }
    let n = ours.len();
    for r in ours {
        if let Err(e) = handle.route().del(r.clone()).execute().await
            && !already_gone(&e)
        {
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(d) => Some(format!("{d:?}")),
                _ => None,
            });
            let route =
                format!("{}/{}", dst.unwrap_or_default(), r.header.destination_prefix_length);
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
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(RoutesError::Netlink)?;
            rt.block_on(remove_leftovers())
        })
        .join()
        .unwrap_or_else(|_| Err(RoutesError::List("the route cleanup thread panicked".into())))
    })
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
/// routes ([`Routes::install`] with [`tunnel_cidrs`] of `[network] routes` and `dns`) and the
/// resolver ([`Dns::apply`] with `[network] dns`). Brought up once, when the TUN device exists;
/// left alone on re-auth; [`TunnelNetwork::down`] on an explicit stop.
#[must_use = "call down() on stop"]
#[derive(Debug)]
pub struct TunnelNetwork {
    routes: RouteGuard,
    dns: DnsGuard,
}

impl TunnelNetwork {
    /// Installs the routes, then points the resolver at the tunnel. If the resolver cannot be set,
    /// the routes are removed again and the error returned (nothing half-done stays).
    pub async fn up(file: &ClientFile) -> Result<Self, NetworkError> {
        let net = &file.network;
        let tun = net.tun_name.as_deref().unwrap_or(DEFAULT_TUN_NAME);
        let cidrs = tunnel_cidrs(net.routes.as_deref(), &net.dns);
        let routes = Routes::install(tun, file.endpoint.ip(), &cidrs).await?;
        match Dns::apply(tun, &net.dns) {
            Ok(dns) => Ok(Self { routes, dns }),
            Err(e) => {
                if let Err(undo) = routes.restore().await {
                    tracing::warn!(target: TARGET, "{undo}");
                }
                Err(e.into())
            }
        }
    }

    /// The routes that were added.
    pub fn routes(&self) -> &[RouteSpec] {
        self.routes.routes()
    }

    /// Restores the resolver, then removes the routes. Both are attempted; the first error is
    /// returned.
    pub async fn down(self) -> Result<(), NetworkError> {
        let dns = self.dns.restore();
        let routes = self.routes.restore().await;
        dns?;
        routes?;
        Ok(())
    }
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
    use super::*;

    fn nets(list: &[&str]) -> Vec<Ipv4Net> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn full_tunnel_by_default() {
        assert_eq!(tunnel_cidrs(None, &[]), nets(&["0.0.0.0/1", "128.0.0.0/1"]));
        // A default route in the config becomes the two halves.
        assert_eq!(
            tunnel_cidrs(Some(&nets(&["0.0.0.0/0"])), &[]),
            nets(&["0.0.0.0/1", "128.0.0.0/1"])
        );
    }

    #[test]
    fn split_tunnel_normalises_and_adds_uncovered_dns() {
        let configured = nets(&["10.1.2.3/16", "10.1.0.0/16", "172.16.0.0/12"]);
        let dns: Vec<IpAddr> = vec![
            "10.1.9.9".parse().unwrap(),
            "100.64.0.1".parse().unwrap(),
            "2001:2::53".parse().unwrap(),
        ];
        assert_eq!(
            tunnel_cidrs(Some(&configured), &dns),
            nets(&["10.1.0.0/16", "100.64.0.1/32", "172.16.0.0/12"])
        );
        // Full tunnel already covers every IPv4 resolver.
        assert_eq!(tunnel_cidrs(None, &dns).len(), 2);
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
            ]
        );
        // Directly connected gateway: no host route.
        let connected = Underlay { via: None, oif: 2 };
        assert_eq!(plan(gw, connected, 9, &full).unwrap().len(), 2);
        // Split tunnel that does not cover the gateway: no host route either.
        let split = nets(&["10.0.0.0/8"]);
        assert_eq!(
            plan(gw, routed, 9, &split).unwrap(),
            vec![RouteSpec::Tunnel { net: split[0], oif: 9 }]
        );
        // IPv6 gateway: the IPv4 tunnel never captures it.
        let gw6: IpAddr = "2001:2::1".parse().unwrap();
        let routed6 = Underlay { via: Some("fe80::1".parse().unwrap()), oif: 2 };
        assert_eq!(plan(gw6, routed6, 9, &full).unwrap().len(), 2);
    }

    #[test]
    fn refuses_a_gateway_routed_through_the_tunnel() {
        let gw: IpAddr = "203.0.113.7".parse().unwrap();
        let looped = Underlay { via: None, oif: 9 };
        assert!(matches!(plan(gw, looped, 9, &FULL_TUNNEL), Err(RoutesError::GatewayViaTunnel(_))));
    }

    #[test]
    fn messages_carry_our_protocol_and_the_right_shape() {
        let host = RouteSpec::Host {
            dst: "203.0.113.7".parse().unwrap(),
            via: "192.168.1.1".parse().unwrap(),
            oif: 2,
        };
        let m = message(&host);
        assert_eq!(m.header.protocol, RouteProtocol::Other(ROUTE_PROTOCOL));
        assert_eq!(m.header.destination_prefix_length, 32);
        assert!(m.attributes.contains(&RouteAttribute::Gateway(RouteAddress::Inet(
            "192.168.1.1".parse().unwrap()
        ))));
        assert!(m.attributes.contains(&RouteAttribute::Oif(2)));

        let tun = message(&RouteSpec::Tunnel { net: FULL_TUNNEL[1], oif: 9 });
        assert_eq!(tun.header.scope, RouteScope::Link);
        assert_eq!(tun.header.destination_prefix_length, 1);
        assert!(tun.attributes.contains(&RouteAttribute::Destination(RouteAddress::Inet(
            Ipv4Addr::new(128, 0, 0, 0)
        ))));
        assert!(!tun.attributes.iter().any(|a| matches!(a, RouteAttribute::Gateway(_))));

        let host6 = message(&RouteSpec::Host {
            dst: "2001:2::1".parse().unwrap(),
            via: "fe80::1".parse().unwrap(),
            oif: 3,
        });
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
}
