//! The client process from start-up to explicit stop, shared by `holdfast client run` and the
//! demo: start the supervisor, attach the data plane, serve the status socket, run the dashboard
//! or wait for a signal, then stop everything in order.

use std::sync::Arc;
use std::time::Duration;

use super::dataplane::{ClientDataPlane, ClientDataPlaneConfig};
use super::dns::PushedDns;
use super::driver::OnSwap;
use super::killswitch::KillSwitch;
use super::routes::TunnelNetwork;
use super::status_socket::{self, DataPlaneSample, DropCount, PathMtuInfo, Sampler, TunInfo};
use super::{ClientHandle, ClientSettings};
use crate::config::exit;
use crate::tui::{self, DashboardExit};
use crate::tunnel::Backoff;

const TARGET: &str = "holdfast::client";

/// How the process is run.
#[derive(Default)]
pub struct RunOptions {
    /// Draw the dashboard on this terminal (else headless: logs to stderr).
    pub dashboard: bool,
    /// Extra dashboard keys (the demo's fault injectors).
    pub extra_keys: Vec<tui::ExtraKey>,
    /// A hangup (SIGHUP, or the dashboard's terminal gone) is an explicit stop: the demo, which
    /// must clean up its namespaces when its terminal closes. Otherwise SIGHUP re-authenticates.
    pub hangup_stops: bool,
}

/// Runs the client until an explicit stop (SIGINT, SIGTERM, or `q` on the dashboard) and returns
/// the process exit code. Must run inside a tokio runtime. The only failure here is the
/// kill-switch refusing to come up: the client never runs unprotected.
pub async fn run(settings: ClientSettings, killswitch: Arc<dyn KillSwitch>, opts: RunOptions) -> i32 {
    tracing::info!(
        target: TARGET,
        "holdfast client {} starting: {} -> gateway {}",
        env!("CARGO_PKG_VERSION"),
        settings.file.name,
        settings.file.endpoint
    );
    let socket = status_socket::socket_path(&settings.file);
    let file = settings.file.clone();
    let dp_config = ClientDataPlaneConfig::from_file(&settings.file);
    let tun_name = dp_config.tun_name.clone().unwrap_or_default();
    // The data plane comes up on the first snapshot, through the driver's swap hook.
    let dataplane = ClientDataPlane::new(dp_config);
    let ks = killswitch.clone();
    // The resolvers the gateway pushes follow the snapshot: each swap publishes its DNS fields
    // (an effect of the swap, like the data plane's wake-up); the network task applies changes.
    let (pushed_tx, pushed_rx) = tokio::sync::watch::channel(PushedDns::default());
    // Likewise the deployment's gateways each answer lists: the kill-switch and the routes let
    // the client reach them, so it can fail over to one that joined after its file was written.
    let (gateways_tx, gateways_rx) = tokio::sync::watch::channel(Vec::<std::net::SocketAddr>::new());
    // The gateway in use, the one the data plane sends to: its path is the one the routes pin
    // and whose MTU the data plane follows. Chosen here, once per swap, for the network task.
    let configured = settings.file.endpoint.ip();
    let (using_tx, using_rx) = tokio::sync::watch::channel(configured);
    let mut dataplane_hook = dataplane.on_swap_hook();
    let on_swap: OnSwap = Box::new(move |snapshot| {
        using_tx.send_if_modified(|current| {
            let using = snapshot.gateway_ip_or(configured);
            let changed = *current != using;
            *current = using;
            changed
        });
        // The gateway that answered stays reachable even when its list no longer names it (it
        // is leaving the deployment): the driver keeps using it until it fails over.
        let mut reach = snapshot.endpoints.clone();
        if let Some(using) = snapshot.gateway_addr
            && !reach.contains(&using)
        {
            reach.insert(0, using);
        }
        gateways_tx.send_if_modified(|current| {
            let changed = *current != reach;
            if changed {
                *current = reach;
            }
            changed
        });
        // Published before the data plane's hook runs: the first swap starts the bring-up, and
        // the resolvers must be there when the TUN is up and the network task reads them.
        let next = PushedDns::of(snapshot);
        pushed_tx.send_if_modified(|current| {
            let changed = *current != next;
            if changed {
                *current = next;
            }
            changed
        });
        dataplane_hook(snapshot);
    });
    let handle = match super::start(settings, killswitch, Some(on_swap)) {
        Ok(h) => h,
        Err(e) => {
            tracing::error!(target: TARGET, "{e}");
            eprintln!("holdfast client: {e}");
            return exit::NOT_PERMITTED;
        }
    };
    // Described after enabling: the description names the mode the kill-switch found in force.
    let ks_desc = ks.describe();
    dataplane.bind(handle.getter(), handle.commands());
    tokio::spawn(crate::tunnel::log_stats_on_sigusr1("client data plane", dataplane.counters()));
    if !opts.hangup_stops {
        tokio::spawn(reauth_on_sighup(handle.commands()));
    }
    // Routes and DNS go up once, when the TUN device exists, and stay through every re-auth; the
    // resolvers follow what later snapshots push, and everything is put back on a TUN device
    // re-created after another program deleted it.
    let (network_stop, network_stop_rx) = tokio::sync::watch::channel(false);
    let network = tokio::spawn(network_task(
        dataplane.clone(),
        file,
        handle.commands(),
        Published { dns: pushed_rx, gateways: gateways_rx, using: using_rx },
        network_stop_rx,
        ks.clone(),
    ));

    let sampler = sampler(dataplane.clone(), tun_name);
    let _status = match status_socket::serve(&socket, handle.status(), Some(sampler.clone()), ks_desc.clone()) {
        Ok(guard) => Some(guard),
        Err(e) => {
            // Not a critical start-up failure: the client runs on without it.
            tracing::warn!(
                target: TARGET,
                "status socket {}: {e}; `holdfast status` cannot reach this client",
                socket.display()
            );
            None
        }
    };

    let hangup = opts.hangup_stops;
    if opts.dashboard {
        run_dashboard(&handle, sampler, ks_desc, opts.extra_keys, hangup).await;
    } else {
        stop_signal(hangup).await;
    }
    tracing::info!(target: TARGET, "stop requested; shutting down");
    stop(handle, dataplane, network, network_stop).await
}

/// Installs the tunnel's routes and resolver once the TUN device is up. A failure is retried
/// with backoff, never fatal: meanwhile the kill-switch keeps everything blocked, so the cost is
/// no traffic, not a leak. Returns what was installed, for the stop; `None` on a stop first.
///
/// The routes follow the underlay towards the gateway in use from then on; each change of the
/// path to it (roaming, a link back up) tells the supervisor, which reconnects its control
/// channel and checks at once.
async fn network_up(
    dataplane: &ClientDataPlane,
    file: &crate::config::client::ClientFile,
    on_underlay_change: &super::routes::UnderlayHook,
    published: &mut Published,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<TunnelNetwork> {
    tokio::select! {
        up = dataplane.tun_up() => if !up { return None },
        _ = stop.wait_for(|s| *s) => return None,
    }
    let mut retry = Retry::new("set up routes/DNS");
    loop {
        let current = published.dns.borrow_and_update().clone();
        let gateway = *published.using.borrow_and_update();
        match TunnelNetwork::up(file, gateway, &current, on_underlay_change.clone(), dataplane.path_mtu()).await {
            Ok(net) => {
                tracing::info!(target: TARGET, "routes up: {} via the tunnel", net.routes().len());
                return Some(net);
            }
            Err(e) => retry.after(e, stop).await?,
        }
    }
}

/// The retries of one network step (routes/DNS up, back on a new TUN, onto the gateway in use):
/// each failure is logged (the first at warn, the next ones at debug) and followed by a pause of
/// 500 ms doubling up to 30 s, so every step backs off and logs alike.
struct Retry {
    /// Completes "cannot ... yet".
    what: &'static str,
    attempt: u32,
    backoff: Backoff,
}

impl Retry {
    fn new(what: &'static str) -> Self {
        Self { what, attempt: 0, backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(30)) }
    }

    /// After a failed attempt: logs it and waits before the next. `None`: a stop came first.
    async fn after(&mut self, e: impl std::fmt::Display, stop: &mut tokio::sync::watch::Receiver<bool>) -> Option<()> {
        self.attempt += 1;
        let (what, attempt) = (self.what, self.attempt);
        if attempt == 1 {
            tracing::warn!(target: TARGET, "cannot {what} yet ({e}); retrying");
        } else {
            tracing::debug!(target: TARGET, "{what}, attempt {attempt}: {e}");
        }
        self.backoff.pause_unless_stopped(stop).await.then_some(())
    }
}

/// [`network_up`], then puts the routes and per-link DNS back each time the data plane re-creates
/// the TUN device, follows the gateway in use and the deployment's gateways, until `stop`.
/// Returns what is installed, for the stop to remove.
async fn network_task(
    dataplane: ClientDataPlane,
    file: crate::config::client::ClientFile,
    commands: tokio::sync::mpsc::Sender<super::driver::Command>,
    mut published: Published,
    mut stop: tokio::sync::watch::Receiver<bool>,
    killswitch: std::sync::Arc<dyn super::killswitch::KillSwitch>,
) -> Option<TunnelNetwork> {
    let on_underlay_change: super::routes::UnderlayHook = std::sync::Arc::new(move || {
        // Dropped when the queue is full: the failed call that follows reconnects too.
        let _ = commands.try_send(super::driver::Command::UnderlayChanged);
    });
    let mut changes = dataplane.tun_changes();
    // The device's IPv6 came back (the path grew past 1280 again): its routes go back as after
    // a re-creation.
    let mut readdressed = dataplane.tun_readdressed();
    let mut net = network_up(&dataplane, &file, &on_underlay_change, &mut published, &mut stop).await?;
    let Published { dns: mut pushed, mut gateways, mut using } = published;
    // The device the routes were installed on is the one current now.
    changes.mark_unchanged();
    readdressed.mark_unchanged();
    restrict_dns(&*killswitch, &net);
    let current = gateways.borrow_and_update().clone();
    reach_gateways(&*killswitch, &mut net, &current).await;
    // Once the supervisor is gone (stopping) nothing more is pushed; the TUN may still change.
    let mut pushing = true;
    loop {
        // What woke us; the work that awaits is done after the select (its branches hold
        // borrows of the channels that must not live across an await).
        let wake = tokio::select! {
            r = changes.changed() => if r.is_err() { return Some(net) } else { Wake::Tun },
            r = readdressed.changed() => if r.is_err() { return Some(net) } else { Wake::Tun },
            r = gateways.changed(), if pushing => match r {
                Ok(()) => Wake::Gateways,
                Err(_) => {
                    pushing = false;
                    continue;
                }
            },
            r = using.changed(), if pushing => match r {
                Ok(()) => Wake::Failover,
                Err(_) => {
                    pushing = false;
                    continue;
                }
            },
            r = pushed.changed(), if pushing => {
                match r {
                    Ok(()) => {
                        follow_pushed_dns(&mut net, &file, &pushed.borrow_and_update().clone());
                        restrict_dns(&*killswitch, &net);
                    }
                    Err(_) => pushing = false,
                }
                continue;
            }
            _ = stop.wait_for(|s| *s) => return Some(net),
        };
        match wake {
            Wake::Gateways => {
                let list = gateways.borrow_and_update().clone();
                reach_gateways(&*killswitch, &mut net, &list).await;
            }
            Wake::Failover => {
                let mut retry = Retry::new("follow the path to the gateway in use");
                loop {
                    let gateway = *using.borrow_and_update();
                    match net.follow_gateway(&file, gateway, on_underlay_change.clone()).await {
                        Ok(()) => break,
                        Err(e) => {
                            if retry.after(e, &mut stop).await.is_none() {
                                return Some(net);
                            }
                        }
                    }
                }
            }
            Wake::Tun => {
                let mut retry = Retry::new("put the routes/DNS back on the new TUN device");
                loop {
                    match net.reattach(&file, on_underlay_change.clone()).await {
                        Ok(()) => break,
                        Err(e) => {
                            if retry.after(e, &mut stop).await.is_none() {
                                return Some(net);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What the swap hook publishes for the network task (each changes only with a snapshot).
struct Published {
    /// The resolvers the gateway pushes.
    dns: tokio::sync::watch::Receiver<PushedDns>,
    /// The deployment's gateways, for the kill-switch and the routes.
    gateways: tokio::sync::watch::Receiver<Vec<std::net::SocketAddr>>,
    /// The gateway in use, whose path is pinned and followed.
    using: tokio::sync::watch::Receiver<std::net::IpAddr>,
}

/// What woke the network task.
enum Wake {
    /// The TUN device was re-created or got its IPv6 back.
    Tun,
    /// The deployment's gateways changed.
    Gateways,
    /// The client moved to another gateway.
    Failover,
}

/// Lets the client reach every gateway the latest answer lists (kill-switch and host routes),
/// beside the ones its file names. Failures are logged, not fatal: failing over to a gateway
/// that cannot be reached fails like any unreachable gateway, and nothing leaks either way.
async fn reach_gateways(
    killswitch: &dyn super::killswitch::KillSwitch,
    net: &mut TunnelNetwork,
    gateways: &[std::net::SocketAddr],
) {
    if gateways.is_empty() {
        return;
    }
    if let Err(e) = killswitch.allow_gateways(gateways) {
        tracing::warn!(target: TARGET, "cannot let the kill-switch reach the deployment's gateways: {e}");
    }
    let ips: Vec<std::net::IpAddr> = gateways.iter().map(std::net::SocketAddr::ip).collect();
    if let Err(e) = net.pin_gateways(&ips).await {
        tracing::warn!(target: TARGET, "cannot route to the deployment's gateways: {e}");
    }
}

/// DNS through the tunnel only to the resolvers in force (the kill-switch's half of "DNS to
/// anything but the tunnel resolvers stays blocked"). A failure leaves the previous rules, which
/// still block DNS outside the tunnel: logged, not fatal.
fn restrict_dns(killswitch: &dyn super::killswitch::KillSwitch, net: &TunnelNetwork) {
    if let Err(e) = killswitch.restrict_tunnel_dns(net.resolvers()) {
        tracing::warn!(target: TARGET, "cannot restrict DNS in the tunnel to its resolvers: {e}");
    }
}

/// Applies a new snapshot's resolvers (when `[network] dns` makes them differ from those set).
fn follow_pushed_dns(net: &mut TunnelNetwork, file: &crate::config::client::ClientFile, next: &PushedDns) {
    match net.update_dns(file, next) {
        Ok(true) => tracing::info!(
            target: TARGET,
            "resolvers follow the new session: {:?} search {:?}",
            next.servers,
            next.search_domains
        ),
        Ok(false) => {}
        Err(e) => tracing::warn!(target: TARGET, "cannot update the resolvers: {e}"),
    }
}

async fn run_dashboard(
    handle: &ClientHandle,
    sampler: Sampler,
    ks_desc: String,
    extras: Vec<tui::ExtraKey>,
    hangup_stops: bool,
) {
    let outcome = tokio::select! {
        r = tui::run_dashboard(handle, Some(sampler), ks_desc, extras) => r,
        () = stop_signal(hangup_stops) => Ok(DashboardExit::Stop),
    };
    match outcome {
        Ok(DashboardExit::Stop | DashboardExit::ClientEnded) => {}
        // The terminal closed: a hangup, whether or not its SIGHUP reached us.
        Ok(DashboardExit::TerminalLost) if hangup_stops => {}
        Ok(DashboardExit::TerminalLost) => stop_signal(false).await,
        Err(e) => {
            tracing::warn!(target: TARGET, "dashboard failed ({e}); running headless");
            stop_signal(hangup_stops).await;
        }
    }
}

/// Explicit stop: routes and resolver first (restored exactly), then the data plane (its TUN goes
/// away), then the supervisor and the kill-switch, last, so nothing leaks while the rest comes
/// down.
async fn stop(
    handle: ClientHandle,
    dataplane: ClientDataPlane,
    network: tokio::task::JoinHandle<Option<TunnelNetwork>>,
    network_stop: tokio::sync::watch::Sender<bool>,
) -> i32 {
    // Still waiting for the TUN or retrying: nothing (more) to undo; else it hands over what
    // it installed.
    network_stop.send_replace(true);
    if let Ok(Some(net)) = network.await
        && let Err(e) = net.down().await
    {
        tracing::warn!(target: TARGET, "restoring routes/DNS: {e}");
    }
    dataplane.stop().await;
    match handle.stop().await {
        Ok(()) => exit::OK,
        Err(e) => {
            tracing::error!(target: TARGET, "{e}");
            exit::FAILURE
        }
    }
}

/// Maps the data plane's counters into what the dashboard and `holdfast status` show. Called a
/// few times a second: relaxed atomic loads and one small vector.
fn sampler(dataplane: ClientDataPlane, tun_name: String) -> Sampler {
    let counters = dataplane.counters();
    Arc::new(move || {
        let s = counters.stats();
        let path_mtu = dataplane.path_mtu().zip(dataplane.tun_mtu()).map(|(p, tun_mtu)| PathMtuInfo {
            outer: p.outer(),
            tun_mtu,
            bound: p.bound().as_str().into(),
        });
        let drops = DropCount::nonzero(&s);
        Some(DataPlaneSample {
            tun: (s.tun_ifindex != 0).then(|| TunInfo { name: tun_name.clone(), ifindex: s.tun_ifindex }),
            loop_starts: u32::try_from(s.tx_loop_starts.max(s.rx_loop_starts)).unwrap_or(u32::MAX),
            rx_packets: s.rx_packets,
            rx_bytes: s.rx_bytes,
            tx_packets: s.tx_packets,
            tx_bytes: s.tx_bytes,
            drops,
            path_mtu,
            aead: crate::sansio::aead::Backend::for_this_cpu().name().into(),
        })
    })
}

/// On SIGHUP, re-authenticates now (make-before-break: the gateway keeps the old session for a
/// grace period, so traffic flows on through the swap): the operator's way to move to a fresh
/// session key without a restart. Installing the handler also
/// means a hang-up of the dashboard's terminal no longer kills the client: SIGHUP's default action
/// is to terminate, and this client only ends on an explicit stop.
async fn reauth_on_sighup(commands: tokio::sync::mpsc::Sender<super::driver::Command>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::debug!(target: TARGET, "no SIGHUP handler: re-authentication on demand unavailable");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!(target: TARGET, "SIGHUP: re-authenticating");
        if commands.send(super::driver::Command::Reauth).await.is_err() {
            return; // the supervisor has stopped
        }
    }
}

/// Waits for SIGINT or SIGTERM (the explicit stop of a daemon).
pub async fn wait_for_stop_signal() {
    stop_signal(false).await
}

/// Waits for SIGINT or SIGTERM, and SIGHUP too when `hangup` (the demo).
async fn stop_signal(hangup: bool) {
    use tokio::signal::unix::{SignalKind, signal};
    let hup = async {
        match signal(SignalKind::hangup()) {
            Ok(mut h) if hangup => {
                h.recv().await;
            }
            _ => std::future::pending::<()>().await,
        }
    };
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
                () = hup => tracing::info!(target: TARGET, "SIGHUP: the terminal closed; stopping"),
            }
        }
        _ => {
            // Without signal handlers we cannot be stopped cleanly; ctrl_c is the last resort.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
