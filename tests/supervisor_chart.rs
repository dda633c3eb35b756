//! The chart in `statecharts/supervisor.mmd` against the machine, both ways.
//!
//! The chart is parsed (a small parser for the subset of Mermaid `stateDiagram-v2` the chart
//! uses; anything else is an error, so the chart cannot drift into syntax this test ignores).
//! The machine is explored with seeded random walks that deliver every event kind in every
//! state, with current and stale attempt numbers and time steps. The edges it takes are read
//! from the machine's own record ([`Supervisor::last_transition`], written by the same
//! `after_transition` hook that writes the log line) and cross-checked against the log line.
//! Then: every taken edge is in the chart, and every chart edge was taken.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use holdfast::sansio::supervisor::{AuthFailure, Effect, Event, PingFailure, StateName, Supervisor, Timer, Timings};
use holdfast::snapshot::VpnAuthResponse;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHART: &str = include_str!("../statecharts/supervisor.mmd");

const ALL_STATES: [StateName; 7] = [
    StateName::Unauthed,
    StateName::Authing,
    StateName::Healthy,
    StateName::Degraded,
    StateName::Backoff,
    StateName::Failover,
    StateName::Stopped,
];

const EVENT_NAMES: [&str; 13] = [
    "Started",
    "AuthSucceeded",
    "AuthFailed",
    "PingSucceeded",
    "SessionExpired",
    "PingFailed",
    "TimerFired",
    "ReauthRequested",
    "Nudged",
    "UnderlayChanged",
    "GatewaysChanged",
    "GatewaySwitched",
    "Stop",
];

/// A leaf-level edge: (from, to, event name).
type Edge = (String, String, String);

/// What the parser keeps of the chart.
#[derive(Debug, Default)]
struct Chart {
    /// Each state (leaf or composite) and the composite it is declared in, if any.
    parent: BTreeMap<String, Option<String>>,
    composites: BTreeSet<String>,
    /// Edges as written: (from, to, label). `[*]` is the pseudo-state.
    edges: Vec<(String, String, Option<String>)>,
}

impl Chart {
    fn parse(text: &str) -> Chart {
        let mut chart = Chart::default();
        let mut stack: Vec<String> = Vec::new();
        let mut in_note = false;
        let mut saw_header = false;
        for (no, raw) in text.lines().enumerate() {
            let line = raw.split("%%").next().unwrap_or("").trim();
            let at = format!("supervisor.mmd:{}: {raw:?}", no + 1);
            if line.is_empty() {
                continue;
            }
            if in_note {
                in_note = line != "end note";
                continue;
            }
            if !saw_header {
                assert_eq!(line, "stateDiagram-v2", "{at}: the chart must start with the header");
                saw_header = true;
                continue;
            }
            if line.starts_with("note ") {
                // `note right of X : text` is one line; without a colon it runs to `end note`.
                in_note = !line.contains(':');
                continue;
            }
            if line.starts_with("direction ") {
                continue;
            }
            if line == "}" {
                assert!(stack.pop().is_some(), "{at}: unbalanced }}");
                continue;
            }
            if let Some(rest) = line.strip_prefix("state ") {
                let name = rest.strip_suffix('{').unwrap_or_else(|| panic!("{at}: expected `state Name {{`")).trim();
                chart.declare(name, stack.last(), &at);
                chart.composites.insert(name.to_owned());
                stack.push(name.to_owned());
                continue;
            }
            if let Some((from, rest)) = line.split_once("-->") {
                let (to, label) = match rest.split_once(':') {
                    Some((to, label)) => (to.trim(), Some(label.trim().to_owned())),
                    None => (rest.trim(), None),
                };
                let from = from.trim();
                for s in [from, to] {
                    assert!(is_ident(s) || s == "[*]", "{at}: bad state name {s:?}");
                }
                chart.edges.push((from.to_owned(), to.to_owned(), label));
                continue;
            }
            // `Name` or `Name : description` declares a state in the enclosing block.
            let name = line.split(':').next().unwrap_or("").trim();
            assert!(is_ident(name), "{at}: unsupported line");
            chart.declare(name, stack.last(), &at);
        }
        assert!(stack.is_empty(), "unclosed state block(s): {stack:?}");
        assert!(!in_note, "unclosed note");
        chart
    }

    fn declare(&mut self, name: &str, parent: Option<&String>, at: &str) {
        let prev = self.parent.insert(name.to_owned(), parent.cloned());
        assert!(prev.is_none(), "{at}: {name} declared twice");
    }

    fn leaves(&self) -> BTreeSet<String> {
        let mut all: BTreeSet<String> = self.parent.keys().cloned().collect();
        for (from, to, _) in &self.edges {
            all.extend([from.clone(), to.clone()]);
        }
        all.remove("[*]");
        all.retain(|s| !self.composites.contains(s));
        all
    }

    /// The chain of composites enclosing `state`, innermost first.
    fn ancestors(&self, state: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = self.parent.get(state).cloned().flatten();
        while let Some(p) = cur {
            cur = self.parent.get(&p).cloned().flatten();
            out.push(p);
        }
        out
    }

    /// `state` itself if it is a leaf, else every leaf inside it.
    fn expand(&self, state: &str) -> Vec<String> {
        if !self.composites.contains(state) {
            return vec![state.to_owned()];
        }
        let inside: Vec<String> =
            self.leaves().into_iter().filter(|leaf| self.ancestors(leaf).iter().any(|a| a == state)).collect();
        assert!(!inside.is_empty(), "composite {state} has no states");
        inside
    }

    /// Every labelled edge between states, expanded to leaves.
    fn leaf_edges(&self) -> BTreeSet<Edge> {
        let mut out = BTreeSet::new();
        for (from, to, label) in &self.edges {
            if from == "[*]" || to == "[*]" {
                continue;
            }
            let label = label.as_deref().unwrap_or_else(|| panic!("{from} --> {to} has no event"));
            assert!(EVENT_NAMES.contains(&label), "{from} --> {to}: {label:?} is not an event name");
            assert!(!self.composites.contains(to), "{from} --> {to}: targets must be leaf states");
            for leaf in self.expand(from) {
                out.insert((leaf, to.clone(), label.to_owned()));
            }
        }
        out
    }
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn snap(id: u64) -> Arc<VpnAuthResponse> {
    Arc::new(VpnAuthResponse::fixture(id, [7; 32]))
}

/// A random event of kind `kind` (an index into `EVENT_NAMES`). Results carry the attempt of the
/// last RPC the machine asked for most of the time, else a stale or unknown one.
fn event(kind: usize, attempt: u64, pick: &mut StdRng) -> Event {
    let attempt = if pick.random_bool(0.8) { attempt } else { pick.random_range(0..attempt + 3) };
    let auth_failures = [
        AuthFailure::Rejected,
        AuthFailure::CertificateRefused,
        AuthFailure::Unreachable,
        AuthFailure::TimedOut,
        AuthFailure::GatewayError,
    ];
    let ping_failures = [PingFailure::Unreachable, PingFailure::TimedOut, PingFailure::GatewayError];
    match kind {
        0 => Event::Started,
        1 => Event::AuthSucceeded { attempt, auth: snap(pick.random()) },
        2 => Event::AuthFailed { attempt, failure: auth_failures[pick.random_range(0..5)] },
        3 => Event::PingSucceeded { attempt, rtt: Duration::from_millis(pick.random_range(1..500)) },
        4 => Event::SessionExpired { attempt },
        5 => Event::PingFailed { attempt, failure: ping_failures[pick.random_range(0..3)] },
        6 => Event::TimerFired(if pick.random() { Timer::Health } else { Timer::Retry }),
        7 => Event::ReauthRequested,
        8 => Event::Nudged,
        9 => Event::UnderlayChanged,
        10 => Event::GatewaysChanged { count: pick.random_range(1..4) },
        11 => Event::GatewaySwitched,
        _ => Event::Stop,
    }
}

/// What the exploration saw.
#[derive(Default)]
struct Explored {
    taken: BTreeSet<Edge>,
    /// Every (state, event name) that was delivered at least once.
    delivered: BTreeSet<(String, String)>,
}

/// Seeded random walks. Stop is rare so walks spend their time in the running states.
fn explore(walks: u64, steps: usize) -> Explored {
    let mut seen = Explored::default();
    let timings = Timings {
        health_min: Duration::from_secs(1),
        health_max: Duration::from_secs(2),
        backoff_initial: Duration::from_secs(1),
        backoff_max: Duration::from_secs(8),
        nudge_min_interval: Duration::from_secs(1),
        ..Timings::default()
    };
    for seed in 0..walks {
        let mut pick = StdRng::seed_from_u64(seed);
        let mut jitter = StdRng::seed_from_u64(seed ^ 0x5eed);
        let mut sup = Supervisor::new(timings.clone());
        let mut now = Duration::ZERO;
        let mut attempt = 0;
        for _ in 0..steps {
            now += Duration::from_millis(pick.random_range(0..1500));
            // Stop (the last kind) is rare, so walks get somewhere before they end.
            let stop = EVENT_NAMES.len() - 1;
            let kind = if pick.random_ratio(1, 60) { stop } else { pick.random_range(0..stop) };
            let ev = event(kind, attempt, &mut pick);
            let before = sup.state();
            let seq_before = sup.last_transition().map_or(0, |t| t.seq);
            seen.delivered.insert((format!("{before:?}"), ev.name().to_owned()));
            let name = ev.name();
            let fx = sup.handle(ev, now, &mut jitter);
            for e in &fx {
                if let Effect::CallAuthenticate { attempt: a, .. } | Effect::CallPing { attempt: a, .. } = e {
                    attempt = *a;
                }
            }
            let logs: Vec<&str> = fx
                .iter()
                .filter_map(|e| if let Effect::Log(l) = e { Some(l.message.as_str()) } else { None })
                .collect();
            let seq_after = sup.last_transition().map_or(0, |t| t.seq);
            match seq_after - seq_before {
                0 => {
                    assert_eq!(sup.state(), before, "state changed without a recorded transition");
                    assert!(logs.is_empty(), "log without a transition: {logs:?}");
                }
                1 => {
                    let t = sup.last_transition().expect("recorded");
                    assert_eq!((t.from, t.to, t.event, t.at), (before, sup.state(), name, now));
                    let head = format!("{:?} -> {:?} ({name}", t.from, t.to);
                    assert!(
                        logs.len() == 1 && logs[0].starts_with(&head),
                        "one log line per transition, naming it ({head}): {logs:?}"
                    );
                    seen.taken.insert((format!("{:?}", t.from), format!("{:?}", t.to), name.to_owned()));
                }
                n => panic!("{n} transitions for one event"),
            }
        }
    }
    seen
}

#[test]
fn chart_and_machine_have_the_same_edges() {
    let chart = Chart::parse(CHART);

    // States: exactly the machine's leaves, in the superstates the machine reports.
    let names: BTreeSet<String> = ALL_STATES.iter().map(|s| format!("{s:?}")).collect();
    assert_eq!(chart.leaves(), names, "chart states vs StateName");
    for s in ALL_STATES {
        let innermost = chart.ancestors(&format!("{s:?}")).into_iter().next();
        assert_eq!(innermost.as_deref(), s.superstate(), "superstate of {s:?}");
    }

    // Initial state.
    let initial: Vec<&String> = chart.edges.iter().filter(|(f, _, _)| f == "[*]").map(|(_, t, _)| t).collect();
    let machine_initial = format!("{:?}", Supervisor::new(Timings::default()).state());
    assert_eq!(initial, [&machine_initial], "[*] --> initial");

    let seen = explore(400, 80);

    // The exploration is only evidence if it tried every event in every state.
    for s in ALL_STATES {
        for e in EVENT_NAMES {
            assert!(seen.delivered.contains(&(format!("{s:?}"), e.to_owned())), "never delivered {e} in {s:?}");
        }
    }

    let drawn = chart.leaf_edges();
    let undrawn: Vec<&Edge> = seen.taken.difference(&drawn).collect();
    let untaken: Vec<&Edge> = drawn.difference(&seen.taken).collect();
    assert!(undrawn.is_empty(), "the machine took edges the chart lacks: {undrawn:?}");
    assert!(untaken.is_empty(), "the chart has edges the machine never took: {untaken:?}");

    // Final states: drawn `X --> [*]` only for states the machine never leaves.
    for (from, _, _) in chart.edges.iter().filter(|(_, t, _)| t == "[*]") {
        for leaf in chart.expand(from) {
            assert!(!seen.taken.iter().any(|(f, _, _)| *f == leaf), "{leaf} is drawn final but was left");
        }
    }
}

#[test]
fn parser_rejects_what_it_does_not_understand() {
    let bad = [
        "stateDiagram-v2\n    A -> B : Started\n",
        "stateDiagram-v2\n    state A {\n    B\n",
        "flowchart LR\n    A --> B\n",
        "stateDiagram-v2\n    A\n    A\n",
    ];
    for text in bad {
        assert!(std::panic::catch_unwind(|| Chart::parse(text)).is_err(), "accepted {text:?}");
    }
    // And the expansion of a superstate edge reaches every leaf inside, nested ones too.
    let chart = Chart::parse(
        "stateDiagram-v2\n state R {\n  A\n  state C {\n   B\n  }\n }\n R --> S : Stop\n B --> A : Nudged\n",
    );
    let edges = chart.leaf_edges();
    for from in ["A", "B"] {
        assert!(edges.contains(&(from.into(), "S".into(), "Stop".into())), "{edges:?}");
    }
    assert_eq!(edges.len(), 3);
}
