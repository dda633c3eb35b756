//! Resilience benchmark (issue 6), printed as one table:
//! - time from the gateway coming back to the first packet through the tunnel, after outages of
//!   1 s, 30 s and 6 min with real processes, and after longer ones on a virtual clock (the real
//!   supervisor, a modelled world; see `sim.rs`), with the default client config: goal < 2 s;
//! - how long `client::start()` takes to return (goal < 1 ms);
//! - `PingSession` round trip against an empty call on the same connection, as a ratio;
//! - UDP datagrams lost across a forced re-authentication under load, both directions.
//!
//! Run as root: `cargo bench --bench resilience` (about 9 minutes, most of it the 6-minute
//! outage). Environment: `HOLDFAST_BENCH_OUTAGES` — real outages, default `1s,30s,6m`;
//! `HOLDFAST_BENCH_SIM_OUTAGES` — simulated ones, default `1s,30s,6m,1h,24h`;
//! `HOLDFAST_BENCH_LOAD_MBPS` — the re-auth load, default 50 (0 skips those rows);
//! `HOLDFAST_BENCH_ONLY_START=1` — only the two `start()` rows (a few seconds).
//! Everything runs in namespaces it creates (198.18.0.0/15 underlay, 100.64.0.0/10 tunnel) and
//! removes again; the machine's own namespace is never touched.

#[path = "../common/mod.rs"]
mod common;
mod real;
mod sim;
#[path = "../../tests/support/mod.rs"]
mod support;

use std::time::Duration;

use common::{quantile, us};
use holdfast::sansio::supervisor::Timings;

/// The goal for every outage.
const RECOVERY_GOAL: Duration = Duration::from_secs(2);
const START_GOAL: Duration = Duration::from_millis(1);
const LOAD_SECS: u32 = 6;

struct Table(Vec<[String; 3]>);

impl Table {
    fn row(&mut self, what: impl Into<String>, value: impl Into<String>, goal: impl Into<String>) {
        self.0.push([what.into(), value.into(), goal.into()]);
    }

    fn print(&self) {
        let w0 = self.0.iter().map(|r| r[0].len()).max().unwrap_or(0);
        let w1 = self.0.iter().map(|r| r[1].len()).max().unwrap_or(0);
        for r in &self.0 {
            println!("| {:<w0$} | {:>w1$} | {} |", r[0], r[1], r[2]);
        }
    }
}

fn durations(var: &str, default: &str) -> Vec<Duration> {
    let text = std::env::var(var).unwrap_or_else(|_| default.to_owned());
    text.split(',')
        .filter(|t| !t.trim().is_empty())
        .map(|t| humantime::parse_duration(t.trim()).unwrap_or_else(|e| panic!("{var}: {t:?}: {e}")))
        .collect()
}

fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}

fn verdict(d: Duration, goal: Duration) -> String {
    format!("< {} {}", humantime::format_duration(goal), if d < goal { "met" } else { "MISSED" })
}

fn main() {
    if !support::netns::available() {
        eprintln!("resilience bench: needs root (network namespaces); nothing measured");
        std::process::exit(2);
    }
    let real_outages = durations("HOLDFAST_BENCH_OUTAGES", "1s,30s,6m");
    let sim_outages = durations("HOLDFAST_BENCH_SIM_OUTAGES", "1s,30s,6m,1h,24h");
    let mbps: u32 = std::env::var("HOLDFAST_BENCH_LOAD_MBPS").ok().and_then(|v| v.parse().ok()).unwrap_or(50);
    let mut table = Table(Vec::new());
    table.row("measure", "value", "goal");
    table.row("---", "---", "---");

    let starts = common::start_times(300);
    let starts_nft = real::start_times_with_killswitch(100);
    let start_rows = |table: &mut Table| {
        let med = quantile(&starts, 0.5);
        table.row(
            "start() returns, no-op kill-switch (median / p99 of 300)",
            format!("{:.1} us / {:.1} us", us(med), us(quantile(&starts, 0.99))),
            format!("< 1 ms {}", if quantile(&starts, 0.99) < START_GOAL { "met" } else { "MISSED" }),
        );
        let med_nft = quantile(&starts_nft, 0.5);
        table.row(
            "start() returns, real nftables kill-switch over netlink (median / p99 of 100)",
            format!("{:.1} us / {:.1} us", us(med_nft), us(quantile(&starts_nft, 0.99))),
            format!("< 1 ms (median) {}", if med_nft < START_GOAL { "met" } else { "MISSED" }),
        );
    };
    if std::env::var_os("HOLDFAST_BENCH_ONLY_START").is_some() {
        start_rows(&mut table);
        table.print();
        return;
    }
    eprintln!("control plane round trips (in-process gateway, loopback)...");
    let control = common::control_rtts(3000);

    eprintln!("bringing up a gateway and a client in namespaces...");
    let mut world = real::World::up();
    let tunnel_rtt = world.tunnel_rtt();

    let mut real_rows = Vec::new();
    for outage in &real_outages {
        eprintln!("outage of {} (real processes)...", humantime::format_duration(*outage));
        let o = world.outage(*outage);
        real_rows.push((*outage, o));
    }

    let mut loss_rows = Vec::new();
    let triggers = if mbps == 0 {
        Vec::new()
    } else {
        vec![
            (real::Trigger::None, "no re-auth (ambient loss of the load)"),
            (real::Trigger::ClientReauth, "client re-auth, SIGHUP (make-before-break)"),
            (real::Trigger::GatewayEndsSessions, "gateway ends the session, SIGUSR2"),
        ]
    };
    for (trigger, name) in triggers {
        for reverse in [false, true] {
            eprintln!(
                "UDP load {mbps} Mbit/s, {name}, {}...",
                if reverse { "gateway->client" } else { "client->gateway" }
            );
            let l = world.reauth_loss(trigger, reverse, mbps, LOAD_SECS);
            loss_rows.push((name, reverse, l));
        }
    }
    world.down();

    // The model's latencies, all from this run.
    let model = sim::Model {
        one_way: tunnel_rtt / 2,
        rpc: quantile(&control.ping, 0.5),
        cold_rpc: control.cold_auth,
        refused: Duration::from_micros(200),
        traffic_every: Duration::from_millis(10),
        nudges: true,
    };

    for (outage, o) in &real_rows {
        table.row(
            format!("gateway back -> first packet, {} outage (real)", humantime::format_duration(*outage)),
            secs(o.to_first_packet),
            format!("{} (gateway start-up {})", verdict(o.to_first_packet, RECOVERY_GOAL), secs(o.gateway_start)),
        );
    }
    for outage in &sim_outages {
        let runs: Vec<Duration> = (0..20)
            .map(|seed| sim::recovery(&model, &Timings::default(), *outage, seed).unwrap_or(Duration::MAX))
            .collect();
        let worst = runs.iter().copied().max().unwrap_or(Duration::MAX);
        table.row(
            format!(
                "gateway back -> first packet, {} outage (virtual clock, worst of 20)",
                humantime::format_duration(*outage)
            ),
            if worst == Duration::MAX { "never".into() } else { secs(worst) },
            verdict(worst, RECOVERY_GOAL),
        );
    }
    start_rows(&mut table);
    let (pm, em) = (quantile(&control.ping, 0.5), quantile(&control.probe, 0.5));
    table.row(
        "PingSession / empty call, same connection (median)",
        format!("{:.2}x", pm.as_secs_f64() / em.as_secs_f64()),
        format!("({:.0} us vs {:.0} us)", us(pm), us(em)),
    );
    for (name, reverse, l) in &loss_rows {
        table.row(
            format!(
                "UDP lost, {mbps} Mbit/s for {LOAD_SECS} s, {name}, {}",
                if *reverse { "gw->client" } else { "client->gw" }
            ),
            format!("{} / {}", l.lost, l.sent),
            format!("{:.3} %", 100.0 * l.lost as f64 / l.sent.max(1) as f64),
        );
    }

    println!();
    println!(
        "Holdfast resilience benchmark (one run; default client timings; tunnel ping {:.3} ms)",
        tunnel_rtt.as_secs_f64() * 1e3
    );
    println!("Virtual-clock rows: the real supervisor in a modelled world, latencies measured above");
    println!(
        "(PingSession {:.0} us, cold connect + TLS + Authenticate {:.1} ms, tunnel one-way {:.3} ms).",
        us(model.rpc),
        model.cold_rpc.as_secs_f64() * 1e3,
        model.one_way.as_secs_f64() * 1e3
    );
    println!();
    table.print();
}
