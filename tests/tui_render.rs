//! Dashboard render snapshots: the pure `render` drawn on ratatui's `TestBackend` for each state
//! of the supervisor, at a fixed size, compared with the accepted snapshots in
//! `tests/snapshots/` (insta). Plus: the key never appears, the current state is highlighted,
//! and no size makes rendering panic.

use std::time::{Duration, SystemTime};

use holdfast::client::status::{ClientStatus, SnapshotView, TransitionRecord};
use holdfast::sansio::supervisor::{StateName, Status, Timer};
use holdfast::snapshot::VpnAuthResponse;
use holdfast::tui::{Action, App, DataPlaneSample, DropCount, PathMtuInfo, TunInfo, render};
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::style::{Color, Modifier};

const S: Duration = Duration::from_secs(1);
const W: u16 = 100;
const H: u16 = 30;

/// A key with a recognisable pattern: bytes 0xA0, 0xA1, ... so its hex is "a0a1a2...".
fn key_bytes() -> [u8; 32] {
    std::array::from_fn(|i| 0xA0u8.wrapping_add(i as u8))
}

fn key_hex() -> String {
    key_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// The fixed wall clock of every render.
fn wall() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn snapshot_view() -> SnapshotView {
    let auth = VpnAuthResponse {
        received_at: wall() - 65 * S,
        ..VpnAuthResponse::fixture(0x0123_4567_89ab_cdef, key_bytes())
    };
    SnapshotView::of(&auth)
}

fn tr(at_ms: u64, from: StateName, to: StateName, cause: &str) -> TransitionRecord {
    TransitionRecord { at: Duration::from_millis(at_ms), from, to, cause: cause.into() }
}

/// The history of a client that connected, degraded, recovered, was asked to re-authenticate
/// and connected again: the recent-transitions panel of the Connected states.
fn connected_history() -> Vec<TransitionRecord> {
    use StateName::*;
    vec![
        tr(3, Unauthed, Authing, "Started"),
        tr(180, Authing, Healthy, "AuthSucceeded"),
        tr(95_000, Healthy, Degraded, "PingFailed(TimedOut)"),
        tr(101_000, Degraded, Healthy, "PingSucceeded(rtt 4ms)"),
        tr(230_000, Healthy, Authing, "ReauthRequested"),
        tr(230_150, Authing, Healthy, "AuthSucceeded"),
    ]
}

struct Case {
    state: StateName,
    since: Duration,
    cause: &'static str,
    timer: Option<(Timer, Duration)>,
    backoff: Duration,
    failures: u32,
    rtt: Option<Duration>,
    snapshot: bool,
    traffic: bool,
    recent: Vec<TransitionRecord>,
}

/// Machine time of every render: five minutes after start.
const NOW: Duration = Duration::from_secs(300);

fn status_of(c: &Case) -> ClientStatus {
    ClientStatus {
        // Renders take machine time explicitly (NOW); the epoch only matters to live observers.
        epoch: std::time::Instant::now(),
        supervisor: Status {
            state: c.state,
            superstate: c.state.superstate(),
            since: c.since,
            last_cause: c.cause.into(),
            next_timer: c.timer,
            backoff: c.backoff,
            failures: c.failures,
            last_rtt: c.rtt,
        },
        snapshot: c.snapshot.then(snapshot_view),
        recent: c.recent.clone(),
    }
}

fn sample(i: u64, rx: u64, tx: u64) -> DataPlaneSample {
    DataPlaneSample {
        tun: Some(TunInfo { name: "holdfast0".into(), ifindex: 7 }),
        loop_starts: 1,
        rx_packets: rx / 1000 + i,
        rx_bytes: rx,
        tx_packets: tx / 500 + i,
        tx_bytes: tx,
        drops: vec![
            DropCount::new("no session", 0),
            DropCount::new("decrypt failure", 2),
            DropCount::new("replay", 1),
            DropCount::new("socket error", 0),
        ],
        path_mtu: Some(PathMtuInfo { outer: 1420, tun_mtu: 1356, bound: "link".into() }),
        aead: "ring".into(),
    }
}

/// An app fed like the shell feeds it: with traffic, one update per second for the last
/// minute (a deterministic wave, so the sparklines have a shape), then the status at `NOW`.
fn app_for(c: &Case) -> App {
    let mut app = App::new("on (nftables table inet holdfast)".into());
    let status = status_of(c);
    let (mut rx, mut tx) = (0u64, 0u64);
    if c.traffic {
        let wave = [3u64, 5, 8, 12, 9, 6, 4, 7, 11, 14, 10, 6];
        for i in 0..60u64 {
            let at = NOW - Duration::from_secs(60 - i);
            app.update(status.clone(), Some(sample(i, rx, tx)), at, wall());
            let w = wave[(i % 12) as usize];
            rx += w * 10_000;
            tx += w * 1_500;
        }
    }
    let last = c.traffic.then(|| sample(60, rx, tx));
    app.update(status, last, NOW, wall());
    app
}

fn draw(app: &App, w: u16, h: u16) -> Terminal<TestBackend> {
    let mut term = Terminal::new(TestBackend::new(w, h)).expect("test backend");
    term.draw(|f| render(app, f)).expect("draw");
    term
}

fn rows(buf: &Buffer) -> Vec<String> {
    let width = usize::from(buf.area.width.max(1));
    buf.content().chunks(width).map(|row| row.iter().map(|c| c.symbol()).collect()).collect()
}

/// Renders, checks the invariants every state shares, and snapshots the screen.
fn check(name: &str, c: &Case) {
    let app = app_for(c);
    let term = draw(&app, W, H);
    let buf = term.backend().buffer();
    let text = rows(buf);
    let all = text.concat();
    let hex = key_hex();
    // Neither the whole key nor any 16-hex-digit piece of it is on screen.
    for start in (0..hex.len() - 16).step_by(2) {
        assert!(!all.contains(&hex[start..start + 16]), "{name}: key material on screen");
    }
    // The current state is bracketed in the chart, in reverse video in its colour.
    let marker = format!("[{}]", c.state);
    let (y, line) = text
        .iter()
        .enumerate()
        .find(|(_, l)| l.contains(&marker))
        .unwrap_or_else(|| panic!("{name}: {marker} not drawn"));
    let x = line.find(&marker).map(|b| line[..b].chars().count()).expect("found above");
    let cell = &buf[(x as u16 + 1, y as u16)];
    assert_eq!(
        cell.bg,
        match c.state {
            StateName::Healthy => Color::Green,
            StateName::Degraded => Color::Yellow,
            StateName::Backoff => Color::Red,
            StateName::Authing => Color::Cyan,
            StateName::Failover => Color::Magenta,
            StateName::Unauthed => Color::Gray,
            StateName::Stopped => Color::DarkGray,
        }
    );
    assert!(cell.modifier.contains(Modifier::BOLD));
    // Only one state is current.
    let brackets = ["Unauthed", "Authing", "Healthy", "Degraded", "Backoff", "Stopped"]
        .iter()
        .filter(|s| all.contains(&format!("[{s}]")))
        .count();
    assert_eq!(brackets, 1, "{name}: one current state");
    if c.snapshot {
        let fp = snapshot_view().key_fingerprint.to_string();
        assert!(all.contains(&format!("fp:{fp}")), "{name}: fingerprint shown");
    }
    insta::assert_snapshot!(name, term.backend());
}

#[test]
fn unauthed() {
    check(
        "unauthed",
        &Case {
            state: StateName::Unauthed,
            since: Duration::ZERO,
            cause: "",
            timer: None,
            backoff: Duration::ZERO,
            failures: 0,
            rtt: None,
            snapshot: false,
            traffic: false,
            recent: vec![],
        },
    );
}

#[test]
fn authing_first_time() {
    check(
        "authing",
        &Case {
            state: StateName::Authing,
            since: NOW - 2 * S,
            cause: "TimerFired(Retry)",
            timer: None,
            backoff: 4 * S,
            failures: 2,
            rtt: None,
            snapshot: false,
            traffic: false,
            recent: vec![
                tr(3, StateName::Unauthed, StateName::Authing, "Started"),
                tr(5_003, StateName::Authing, StateName::Backoff, "AuthFailed(Unreachable)"),
                tr(6_100, StateName::Backoff, StateName::Authing, "TimerFired(Retry)"),
                tr(11_100, StateName::Authing, StateName::Backoff, "AuthFailed(TimedOut)"),
                tr(298_000, StateName::Backoff, StateName::Authing, "TimerFired(Retry)"),
            ],
        },
    );
}

#[test]
fn healthy_with_a_session_and_traffic() {
    check(
        "healthy",
        &Case {
            since: Duration::from_millis(230_150),
            timer: Some((Timer::Health, NOW + 12 * S)),
            rtt: Some(Duration::from_micros(3_200)),
            ..healthy_case()
        },
    );
}

#[test]
fn degraded_keeps_the_session() {
    let mut recent = connected_history();
    recent.push(tr(290_000, StateName::Healthy, StateName::Degraded, "PingFailed(Unreachable)"));
    check(
        "degraded",
        &Case {
            state: StateName::Degraded,
            since: 290 * S,
            cause: "PingFailed(Unreachable)",
            timer: Some((Timer::Health, NOW + 3 * S)),
            backoff: 4 * S,
            failures: 3,
            rtt: Some(Duration::from_micros(4_100)),
            snapshot: true,
            traffic: true,
            recent,
        },
    );
}

#[test]
fn backoff_counts_down_to_the_retry() {
    check(
        "backoff",
        &Case {
            state: StateName::Backoff,
            since: NOW - 20 * S,
            cause: "AuthFailed(Rejected)",
            timer: Some((Timer::Retry, NOW + 37 * S)),
            backoff: 64 * S,
            failures: 7,
            rtt: Some(Duration::from_micros(3_900)),
            // A session from before the gateway restart stays installed while re-authenticating.
            snapshot: true,
            traffic: true,
            recent: vec![
                tr(3, StateName::Unauthed, StateName::Authing, "Started"),
                tr(150, StateName::Authing, StateName::Healthy, "AuthSucceeded"),
                tr(200_000, StateName::Healthy, StateName::Authing, "SessionExpired"),
                tr(200_200, StateName::Authing, StateName::Backoff, "AuthFailed(Rejected)"),
                tr(279_500, StateName::Backoff, StateName::Authing, "TimerFired(Retry)"),
                tr(280_000, StateName::Authing, StateName::Backoff, "AuthFailed(Rejected)"),
            ],
        },
    );
}

fn healthy_case() -> Case {
    Case {
        state: StateName::Healthy,
        since: 10 * S,
        cause: "AuthSucceeded",
        timer: Some((Timer::Health, NOW + 20 * S)),
        backoff: Duration::ZERO,
        failures: 0,
        rtt: Some(Duration::from_millis(2)),
        snapshot: true,
        traffic: true,
        recent: connected_history(),
    }
}

#[test]
fn help_overlay() {
    let mut app = app_for(&healthy_case());
    app.apply(Action::ToggleHelp);
    let term = draw(&app, W, H);
    let all = rows(term.backend().buffer()).concat();
    assert!(all.contains("re-authenticate now"), "help text drawn");
    insta::assert_snapshot!("help", term.backend());
    app.apply(Action::ToggleHelp);
    let all = rows(draw(&app, W, H).backend().buffer()).concat();
    assert!(!all.contains("re-authenticate now"), "help hidden again");
}

#[test]
fn the_classic_80x24_terminal_gets_the_full_layout() {
    let term = draw(&app_for(&healthy_case()), 80, 24);
    let all = rows(term.backend().buffer()).concat();
    for must in ["Running", "Establishing", "Connected", "[Healthy]", "fp:", "recent transitions", "q "] {
        assert!(all.contains(must), "80x24 shows {must:?}");
    }
    insta::assert_snapshot!("healthy_80x24", term.backend());
}

#[test]
fn small_and_odd_sizes_do_not_panic() {
    let mut app = app_for(&healthy_case());
    for (w, h) in [(0, 0), (1, 1), (2, 50), (200, 1), (20, 6), (40, 12), (79, 23), (80, 22), (71, 40), (300, 100)] {
        draw(&app, w, h);
    }
    app.apply(Action::ToggleHelp);
    for (w, h) in [(0, 0), (1, 1), (10, 3), (30, 8), (80, 24)] {
        draw(&app, w, h);
    }
    // The small layout still says where the machine is.
    app.apply(Action::CloseHelp);
    let term = draw(&app, 40, 12);
    let all = rows(term.backend().buffer()).concat();
    assert!(all.contains("Healthy"), "{all}");
    insta::assert_snapshot!("small_40x12", term.backend());
}

#[test]
fn a_reauth_key_shows_a_notice_that_fades() {
    let c = healthy_case();
    let mut app = app_for(&c);
    app.apply(Action::Reauth);
    let shown = rows(draw(&app, W, H).backend().buffer()).concat();
    assert!(shown.contains("re-authentication requested"));
    app.update(status_of(&c), None, NOW + 6 * S, wall());
    let later = rows(draw(&app, W, H).backend().buffer()).concat();
    assert!(!later.contains("re-authentication requested"));
}
