//! `holdfast demo` as a person runs it: in a tmux pane, as root. The demo builds its own
//! namespaces; the test watches the dashboard come up Healthy with traffic moving, presses each
//! fault key and watches the client recover, then quits with `q` and checks that everything the
//! demo created is gone.

mod support;

use std::process::Command;
use std::time::Duration;

use support::tmux::Tmux;
use support::*;

const T: Duration = Duration::from_secs(30);

fn demo_namespaces(pid_hint: &str) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("hfdemo") && n.contains(pid_hint))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_demo_recovers_from_every_fault_key_and_cleans_up() {
    if !netns::available() || !support::tmux::available() {
        eprintln!("SKIPPED: needs root, ip and tmux");
        return;
    }
    let session = format!("hf-demo-{}", std::process::id());
    let tmux = Tmux::new(&session, &format!("{BIN} demo --one-gateway"));
    let pid = tmux.program_pid(T);

    tmux.wait_for(&["Healthy", "100.64.0.2", "gateway kill/start"], T);
    // The steady ping moves the counters.
    tmux.wait_for(&["pkt"], T);
    assert_eq!(demo_namespaces(&pid).len(), 2, "a gateway and a client namespace");

    // Kill the gateway: Degraded. Start it again: the new gateway knows no session, the client
    // re-authenticates by itself.
    tmux.keys("k");
    tmux.wait_for(&["Degraded in"], T);
    tmux.keys("k");
    tmux.wait_for(&["Degraded -> Authing", "SessionExpired"], T);
    tmux.wait_for(&["Healthy in"], T);

    // Expire every session on the gateway: SessionExpired from Healthy.
    tmux.keys("e");
    tmux.wait_for(&["Healthy  -> Authing   SessionExpired"], T);
    tmux.wait_for(&["Healthy in"], T);

    // Blackhole the control port: health checks fail, Degraded; lift it: Healthy.
    tmux.keys("c");
    tmux.wait_for(&["Degraded in"], T);
    tmux.keys("c");
    tmux.wait_for(&["Degraded -> Healthy"], T);

    // q: explicit stop, exit 0, and everything the demo made is gone.
    tmux.keys("q");
    assert_eq!(tmux.exit_status(T), 0, "{}", tmux.screen());
    assert!(demo_namespaces(&pid).is_empty(), "namespaces left: {:?}", demo_namespaces(&pid));
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().and_then(|r| r.split_whitespace().next()) != Some("Z"))
}

/// `pid` and every process below it, with their command lines.
fn family(pid: u32) -> Vec<(u32, String)> {
    let mut parent_of = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else { continue };
        // The fields after the command name: state, then the parent's pid.
        let ppid = stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)?.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((p, ppid));
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let cur = out[i];
        out.extend(parent_of.iter().filter(|(_, pp)| *pp == cur).map(|(p, _)| *p));
        i += 1;
    }
    out.into_iter()
        .map(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            (p, String::from_utf8_lossy(&cmd).replace('\0', " "))
        })
        .collect()
}

#[test]
fn closing_the_demos_terminal_cleans_up_everything() {
    if !netns::available() || !support::tmux::available() {
        eprintln!("SKIPPED: needs root, ip and tmux");
        return;
    }
    let session = format!("hf-demo-hup-{}", std::process::id());
    let tmux = Tmux::new(&session, &format!("{BIN} demo --one-gateway"));
    let pid = tmux.program_pid(T);
    tmux.wait_for(&["Healthy", "100.64.0.2"], T);
    assert_eq!(demo_namespaces(&pid).len(), 2);
    let procs = family(pid.parse().unwrap());
    assert!(procs.iter().any(|(_, cmd)| cmd.contains("gateway run")), "no gateway child: {procs:?}");

    // The terminal goes away: its session killed, as when a user closes the window.
    tmux.tmux(&["kill-session", "-t", &session]);
    let clean = wait_until(T, || demo_namespaces(&pid).is_empty() && procs.iter().all(|(p, _)| !alive(*p)));
    let left: Vec<_> = procs.iter().filter(|(p, _)| alive(*p)).collect();
    assert!(clean, "left behind: namespaces {:?}, processes {left:?}", demo_namespaces(&pid));
    // The kill-switch table lived in the client namespace, which is gone; nothing in ours.
    let ours = std::process::Command::new("nft").args(["list", "tables"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&ours.stdout).contains("holdfast"), "a holdfast table in the host namespace");
}

/// Where PostgreSQL's server binaries are installed, the demo runs two gateways on a throw-away
/// database (`holdfast demo` without `--one-gateway`).
fn postgres_installed() -> bool {
    std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().any(|e| e.path().join("bin/initdb").exists()))
        .unwrap_or(false)
}

#[test]
fn with_two_gateways_k_makes_the_client_fail_over_with_its_address() {
    if !netns::available() || !support::tmux::available() || !postgres_installed() {
        eprintln!("SKIPPED: needs root, ip, tmux and PostgreSQL's server binaries");
        return;
    }
    let session = format!("hf-demo-pg-{}", std::process::id());
    let tmux = Tmux::new(&session, &format!("{BIN} demo"));
    let pid = tmux.program_pid(T);
    tmux.wait_for(&["Healthy", "100.64.0.2", "gateway kill/start"], T);
    assert_eq!(demo_namespaces(&pid).len(), 3, "two gateways and a client");
    let procs = family(pid.parse().unwrap());
    assert_eq!(procs.iter().filter(|(_, cmd)| cmd.contains("gateway run")).count(), 2, "{procs:?}");
    // The database daemonises (pg_ctl): found by its data folder in the demo's work folder.
    let db: Vec<(u32, String)> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
        .filter_map(|p| {
            let cmd = String::from_utf8_lossy(&std::fs::read(format!("/proc/{p}/cmdline")).ok()?).replace('\0', " ");
            (cmd.contains("postgres") && cmd.contains(&format!("holdfast-demo-{pid}"))).then_some((p, cmd))
        })
        .collect();
    assert!(!db.is_empty(), "no database under the demo's folder");
    let procs: Vec<(u32, String)> = procs.into_iter().chain(db).collect();

    // k kills the gateway the client is on: it fails over to the other, same address.
    tmux.keys("k");
    tmux.wait_for(&["Failover"], T);
    tmux.wait_for(&["Authing  -> Healthy", "100.64.0.2"], T);

    tmux.keys("q");
    assert_eq!(tmux.exit_status(T), 0, "{}", tmux.screen());
    assert!(demo_namespaces(&pid).is_empty(), "namespaces left: {:?}", demo_namespaces(&pid));
    let clean = wait_until(T, || procs.iter().all(|(p, _)| !alive(*p)));
    let left: Vec<_> = procs.iter().filter(|(p, _)| alive(*p)).collect();
    assert!(clean, "processes left behind (the database included): {left:?}");
}
