//! Drawing the dashboard: a pure function of the [`App`] onto a ratatui [`Frame`].
//!
//! ```text
//!  header:  state, superstates, time in state, uptime
//!  header:  next timer countdown, backoff, last RTT, last cause
//!  ┌ statechart (current state highlighted) ──────┐┌ drops by reason ┐
//!  ┌ session (no key) ───────┐┌ tunnel + kill-switch ───────┐
//!  ┌ rx sparkline + totals ┐┌ tx sparkline + totals ┐
//!  ┌ recent transitions, newest first ────────────────────────────┐
//!  footer: keys (and the last key's notice)
//! ```
//!
//! Everything is laid out with ratatui constraints, so any terminal size renders (a very small
//! one gets a one-screen summary instead of squeezed panels) and nothing here can panic on size.

use std::time::Duration;

use ratatui::Frame;
use ratatui::layout::{Alignment, Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Clear, Paragraph, RenderDirection, Sparkline, Wrap};

use super::app::App;
use crate::client::status_socket::{human, superstates, timer_purpose};
use crate::sansio::supervisor::StateName;

/// Below this size the full layout cannot show its panels; a summary is drawn instead. The full
/// layout fits the classic 80x24 terminal.
pub const MIN_WIDTH: u16 = RUNNING_WIDTH + 21;
pub const MIN_HEIGHT: u16 = 24;

/// Draws the whole dashboard.
pub fn render(app: &App, frame: &mut Frame) {
    let area = frame.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        render_small(app, frame, area);
    } else {
        let [header, top, middle, traffic, recent, footer] = Layout::vertical([
            Constraint::Length(2),
            Constraint::Length(6),
            // Six lines: the session panel shows both tunnel addresses.
            Constraint::Length(8),
            Constraint::Length(4),
            Constraint::Min(3),
            Constraint::Length(1),
        ])
        .areas(area);
        frame.render_widget(Paragraph::new(header_lines(app)), header);

        let [chart, drops] = Layout::horizontal([Constraint::Length(RUNNING_WIDTH), Constraint::Min(0)]).areas(top);
        render_chart(frame, chart, app);
        render_drops(frame, drops, app);

        let [session, tunnel] =
            Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(middle);
        frame.render_widget(session_panel(app), session);
        frame.render_widget(tunnel_panel(app), tunnel);

        let [rx, tx] = Layout::horizontal([Constraint::Ratio(1, 2); 2]).areas(traffic);
        render_traffic(frame, rx, app, Direction::Rx);
        render_traffic(frame, tx, app, Direction::Tx);

        frame.render_widget(recent_panel(app, recent.height.saturating_sub(2)), recent);
        frame.render_widget(Paragraph::new(footer_line(app)), footer);
    }
    if app.help {
        render_help(frame, area, app.extra_keys());
    }
}

/// The colour that stands for a state, everywhere it appears.
fn state_color(s: StateName) -> Color {
    match s {
        StateName::Unauthed => Color::Gray,
        StateName::Authing => Color::Cyan,
        StateName::Healthy => Color::Green,
        StateName::Degraded => Color::Yellow,
        StateName::Backoff => Color::Red,
        StateName::Failover => Color::Magenta,
        StateName::Stopped => Color::DarkGray,
    }
}

fn bold() -> Style {
    Style::new().add_modifier(Modifier::BOLD)
}

fn dim() -> Style {
    Style::new().fg(Color::DarkGray)
}

fn state_span(s: StateName) -> Span<'static> {
    Span::styled(s.to_string(), bold().fg(state_color(s)))
}

fn panel(title: &str) -> Block<'_> {
    Block::bordered().title(Span::styled(format!(" {title} "), bold()))
}

/// A `label  value` line with the label dimmed and padded, so a panel's values line up.
fn field<'a>(label: &'a str, value: impl Into<Span<'a>>) -> Line<'a> {
    Line::from(vec![Span::styled(format!("{label:<9}"), dim()), value.into()])
}

/// What the machine waits for: the armed timer's countdown, or what it is doing without one.
fn next_step(app: &App) -> String {
    let s = &app.status.supervisor;
    match s.next_timer {
        Some((timer, at)) => {
            format!("{} in {}", timer_purpose(s.state, timer), human::duration(at.saturating_sub(app.now)))
        }
        None => match s.state {
            StateName::Unauthed => "waiting to start".into(),
            StateName::Authing => "authenticating...".into(),
            StateName::Stopped => "stopped".into(),
            _ => "-".into(),
        },
    }
}

/// Two lines: where the machine is (state, superstates, time in it) and what it waits for next
/// (timer countdown, backoff, last RTT, last cause). The most watched facts, so they come first.
fn header_lines(app: &App) -> Vec<Line<'static>> {
    let s = &app.status.supervisor;
    let mut first = vec![Span::styled(" HOLDFAST ", bold().fg(Color::Black).bg(Color::Cyan)), Span::raw("  ")];
    first.push(state_span(s.state));
    let path = superstates(s.state);
    if !path.is_empty() {
        first.push(Span::styled(format!(" in {}", path.join(" > ")), dim()));
    }
    first.push(Span::raw(format!("  for {}", human::duration(app.now.saturating_sub(s.since)))));
    first.push(Span::styled(format!("   up {}", human::duration(app.now)), dim()));

    let next = next_step(app);
    let backoff = if s.failures == 0 {
        "none".to_string()
    } else {
        format!("{} after {} failures", human::duration(s.backoff), s.failures)
    };
    let rtt = s.last_rtt.map(|d| human::rtt(micros(d))).unwrap_or_else(|| "-".into());
    let label = |l: &'static str| Span::styled(l, dim());
    let mut second = vec![
        Span::raw(" "),
        label("next "),
        Span::styled(next, bold()),
        label("   backoff "),
        Span::raw(backoff),
        label("   rtt "),
        Span::raw(rtt),
    ];
    if !s.last_cause.is_empty() {
        second.push(label("   cause "));
        second.push(Span::raw(s.last_cause.clone()));
    }
    vec![Line::from(first), Line::from(second)]
}

fn footer_line(app: &App) -> Line<'static> {
    let key = |k: &'static str| Span::styled(k, bold().fg(Color::Black).bg(Color::Gray));
    let mut spans = vec![
        Span::raw(" "),
        key(" q "),
        Span::raw(" stop  "),
        key(" r "),
        Span::raw(" re-authenticate  "),
        key(" ? "),
        Span::raw(" help"),
    ];
    for (k, label) in app.extra_keys() {
        spans.push(Span::raw("  "));
        spans.push(Span::styled(format!(" {k} "), bold().fg(Color::Black).bg(Color::Yellow)));
        spans.push(Span::raw(format!(" {label}")));
    }
    if let Some((_, notice)) = &app.notice {
        spans.push(Span::styled(format!("   {notice}"), bold().fg(Color::Yellow)));
    }
    Line::from(spans)
}

// ---- the statechart ----------------------------------------------------------------------------

/// A state's name as a `const` (the chart's widths are computed from them at compile time).
const fn name(s: StateName) -> &'static str {
    match s {
        StateName::Unauthed => "Unauthed",
        StateName::Authing => "Authing",
        StateName::Healthy => "Healthy",
        StateName::Degraded => "Degraded",
        StateName::Backoff => "Backoff",
        StateName::Failover => "Failover",
        StateName::Stopped => "Stopped",
    }
}

/// Width of a state's cell: its name plus the two marker columns.
const fn cell_width(s: StateName) -> u16 {
    // State names are short ASCII words; the cast cannot truncate.
    name(s).len() as u16 + 2
}

/// Width of a superstate box holding `a` and `b` side by side.
const fn pair_width(a: StateName, b: StateName) -> u16 {
    cell_width(a) + 1 + cell_width(b) + 2
}

/// Width of the chart: the Running box around Unauthed, Establishing and Connected.
const RUNNING_WIDTH: u16 = 2
    + cell_width(StateName::Unauthed)
    + 1
    + pair_width(StateName::Authing, StateName::Backoff)
    + 1
    + pair_width(StateName::Healthy, StateName::Degraded);

/// The chart of `statecharts/supervisor.mmd` as nested boxes:
/// `Running{Unauthed, Establishing{Authing, Backoff}, Connected{Healthy, Degraded}}`, with the
/// `Stop -> Stopped` edge on Running's bottom border. The current state is bracketed (readable
/// without colour) and drawn in reverse video.
fn render_chart(frame: &mut Frame, area: Rect, app: &App) {
    let current = app.status.supervisor.state;
    let stopped = cell(StateName::Stopped, current);
    let running_box = Block::bordered()
        .title(Span::styled(" Running ", bold()))
        .title_bottom(Line::from(vec![Span::styled(" Stop ->", dim()), stopped, Span::raw(" ")]).right_aligned());
    let inner = running_box.inner(area);
    frame.render_widget(running_box, area);
    let [row, meaning] = Layout::vertical([Constraint::Length(3), Constraint::Length(1)]).areas(inner);
    let [unauthed, _, establishing, _, connected] = Layout::horizontal([
        Constraint::Length(cell_width(StateName::Unauthed)),
        Constraint::Length(1),
        Constraint::Length(pair_width(StateName::Authing, StateName::Backoff)),
        Constraint::Length(1),
        Constraint::Length(pair_width(StateName::Healthy, StateName::Degraded)),
    ])
    .areas(row);
    // Unauthed sits on the line of the states inside the superstate boxes.
    let unauthed = Rect { y: unauthed.y + unauthed.height.min(3) / 2, height: unauthed.height.min(1), ..unauthed };
    frame.render_widget(Paragraph::new(cell(StateName::Unauthed, current)), unauthed);
    render_super(frame, establishing, "Establishing", [StateName::Authing, StateName::Backoff], current);
    render_super(frame, connected, "Connected", [StateName::Healthy, StateName::Degraded], current);
    let line =
        Line::from(vec![Span::raw(" "), Span::styled(meaning_of(current, app.status.snapshot.is_some()), dim())]);
    frame.render_widget(Paragraph::new(line), meaning);
}

/// What the current state means, in a few words, under the chart.
fn meaning_of(s: StateName, has_session: bool) -> &'static str {
    match (s, has_session) {
        (StateName::Unauthed, _) => "not started yet",
        (StateName::Authing, false) => "authenticating with the gateway",
        (StateName::Authing, true) => "re-authenticating; the old session keeps the tunnel up",
        (StateName::Backoff, false) => "waiting to retry authentication",
        (StateName::Backoff, true) => "waiting to retry; the old session keeps the tunnel up",
        (StateName::Healthy, _) => "session up, health checks pass",
        (StateName::Degraded, _) => "health checks failing; session and tunnel kept",
        // Transient (the driver switches at once); not drawn as a cell of its own.
        (StateName::Failover, _) => "gateway not answering; moving to the next one",
        (StateName::Stopped, _) => "stopped",
    }
}

fn render_super(frame: &mut Frame, area: Rect, title: &str, states: [StateName; 2], current: StateName) {
    let b = Block::bordered().title(format!(" {title} ")).border_style(dim());
    let inner = b.inner(area);
    frame.render_widget(b, area);
    let line = Line::from(vec![cell(states[0], current), Span::raw(" "), cell(states[1], current)]);
    frame.render_widget(Paragraph::new(line), inner);
}

fn cell(s: StateName, current: StateName) -> Span<'static> {
    if s == current {
        Span::styled(format!("[{}]", name(s)), bold().fg(Color::Black).bg(state_color(s)))
    } else {
        Span::styled(format!(" {} ", name(s)), Style::new().fg(state_color(s)))
    }
}

// ---- panels ------------------------------------------------------------------------------------

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn session_panel(app: &App) -> Paragraph<'static> {
    let Some(v) = &app.status.snapshot else {
        return Paragraph::new(Line::styled("no session yet", dim())).block(panel("session"));
    };
    let age = app.wall.duration_since(v.received_at).unwrap_or_default();
    let (address6, gateway) = match (v.assigned_ip6, v.gateway_ip6) {
        (Some(ip6), Some(gw6)) => (format!("{ip6}/{}", v.prefix_len6), format!("{} / {gw6}", v.gateway_ip)),
        _ => ("none (IPv4-only session)".to_string(), v.gateway_ip.to_string()),
    };
    let lines = vec![
        field("address", format!("{}/{}", v.assigned_ip, v.prefix_len)),
        field("address6", address6),
        field("gateway", gateway),
        field("session", v.session_id.to_string()),
        field("key", format!("fp:{}", v.key_fingerprint)),
        field("age", format!("{} (idle {})", human::duration(age), human::duration(v.idle_timeout))),
    ];
    // Re-authentication keeps the old snapshot installed; say so, or it looks current.
    let title = match app.status.supervisor.state {
        StateName::Authing | StateName::Backoff => "session (kept until a new one swaps in)",
        _ => "session",
    };
    Paragraph::new(lines).block(panel(title))
}

fn tunnel_panel(app: &App) -> Paragraph<'static> {
    let mut lines = Vec::new();
    match &app.sample {
        Some(s) => {
            let dev = match &s.tun {
                Some(t) => format!("{} (ifindex {})", t.name, t.ifindex),
                None => "TUN not up".into(),
            };
            lines.push(Line::raw(dev));
            lines.push(Line::raw(format!("loops started {}x", s.loop_starts)));
            if let Some(p) = &s.path_mtu {
                lines.push(Line::from(vec![Span::styled("path MTU ", dim()), Span::raw(p.describe())]));
            }
        }
        None => lines.push(Line::styled("data plane not up", dim())),
    }
    lines.push(Line::from(vec![Span::styled("kill-switch ", dim()), Span::raw(app.killswitch.clone())]));
    // Last: a panel too short for every line loses this one before the kill-switch's.
    if let Some(s) = app.sample.as_ref().filter(|s| !s.aead.is_empty()) {
        lines.push(Line::from(vec![Span::styled("cipher ", dim()), Span::raw(crate::sansio::aead::describe(&s.aead))]));
    }
    Paragraph::new(lines).wrap(Wrap { trim: true }).block(panel("tunnel"))
}

/// Reasons on the left, counts right-aligned at the panel's edge, so a narrow panel loses the
/// end of a reason before it loses a digit.
fn render_drops(frame: &mut Frame, area: Rect, app: &App) {
    let block = panel("drops");
    let inner = block.inner(area);
    frame.render_widget(block, area);
    let drops = app.sample.as_ref().map(|s| s.drops.as_slice()).unwrap_or_default();
    if drops.is_empty() {
        frame.render_widget(Paragraph::new(Line::styled("none counted", dim())), inner);
        return;
    }
    let reasons: Vec<Line> = drops.iter().map(|d| Line::styled(d.reason.clone(), dim())).collect();
    let counts: Vec<Line> = drops
        .iter()
        .map(|d| {
            let style = if d.count > 0 { bold().fg(Color::Yellow) } else { Style::new() };
            Line::styled(format!(" {}", d.count), style)
        })
        .collect();
    frame.render_widget(Paragraph::new(reasons), inner);
    frame.render_widget(Paragraph::new(counts).alignment(Alignment::Right), inner);
}

#[derive(Clone, Copy)]
enum Direction {
    Rx,
    Tx,
}

fn render_traffic(frame: &mut Frame, area: Rect, app: &App, dir: Direction) {
    let (name, color) = match dir {
        Direction::Rx => ("rx", Color::Green),
        Direction::Tx => ("tx", Color::Blue),
    };
    let pick = |r: &super::app::Rate| match dir {
        Direction::Rx => r.rx,
        Direction::Tx => r.tx,
    };
    let rate = app.history.back().map(pick).unwrap_or(0);
    let totals = match (&app.sample, dir) {
        (Some(s), Direction::Rx) => format!("{}, {} pkt", human::bytes(s.rx_bytes), s.rx_packets),
        (Some(s), Direction::Tx) => format!("{}, {} pkt", human::bytes(s.tx_bytes), s.tx_packets),
        (None, _) => "no data plane".into(),
    };
    let block = Block::bordered().title(Line::from(vec![
        Span::styled(format!(" {name} "), bold().fg(color)),
        Span::styled(format!("{}/s ", human::bytes(rate)), bold()),
        Span::styled(format!("· {totals} "), dim()),
    ]));
    let inner = block.inner(area);
    frame.render_widget(block, area);
    // Newest first, drawn from the right edge: the graph scrolls left as time passes, and a
    // short history sits at the right, where "now" is.
    let data: Vec<u64> = app.history.iter().rev().take(usize::from(inner.width)).map(pick).collect();
    frame.render_widget(
        Sparkline::default().data(data).direction(RenderDirection::RightToLeft).style(Style::new().fg(color)),
        inner,
    );
}

fn recent_panel(app: &App, rows: u16) -> Paragraph<'static> {
    let recent = &app.status.recent;
    let lines: Vec<Line> = if recent.is_empty() {
        vec![Line::styled("no transitions yet", dim())]
    } else {
        recent
            .iter()
            .rev()
            .take(usize::from(rows))
            .map(|t| {
                Line::from(vec![
                    Span::styled(
                        format!(
                            "{:>8} ago  T+{:<7} ",
                            human::duration(app.now.saturating_sub(t.at)),
                            human::duration(t.at)
                        ),
                        dim(),
                    ),
                    Span::styled(format!("{:<8}", t.from.to_string()), Style::new().fg(state_color(t.from))),
                    Span::raw(" -> "),
                    Span::styled(format!("{:<8}", t.to.to_string()), bold().fg(state_color(t.to))),
                    Span::raw(format!("  {}", t.cause)),
                ])
            })
            .collect()
    };
    Paragraph::new(lines).block(panel("recent transitions"))
}

// ---- small terminals and help ------------------------------------------------------------------

fn render_small(app: &App, frame: &mut Frame, area: Rect) {
    let s = &app.status.supervisor;
    let mut lines = vec![
        Line::from(vec![Span::styled("HOLDFAST ", bold()), state_span(s.state)]),
        Line::raw(format!("for {}", human::duration(app.now.saturating_sub(s.since)))),
    ];
    lines.push(Line::raw(next_step(app)));
    if let Some(v) = &app.status.snapshot {
        lines.push(Line::raw(format!("{}/{}", v.assigned_ip, v.prefix_len)));
    }
    lines.push(Line::styled(format!("enlarge to {MIN_WIDTH}x{MIN_HEIGHT}"), dim()));
    lines.push(Line::raw("q stop  r re-auth  ? help"));
    frame.render_widget(Paragraph::new(lines).wrap(Wrap { trim: true }), area);
}

const HELP: &[(&str, &str)] = &[
    ("q, Ctrl-C", "stop the client: release the kill-switch, exit 0"),
    ("r", "re-authenticate now (the tunnel keeps running)"),
    ("?, F1", "show or hide this help; Esc closes it"),
];

fn render_help(frame: &mut Frame, area: Rect, extras: &[(char, String)]) {
    let row = |k: String, what: String| Line::from(vec![Span::styled(format!(" {k:<11}"), bold()), Span::raw(what)]);
    let mut lines: Vec<Line> = HELP
        .iter()
        .map(|(k, what)| row((*k).to_owned(), (*what).to_owned()))
        .chain(extras.iter().map(|(k, what)| row(k.to_string(), what.clone())))
        .collect();
    lines.extend([
        Line::raw(""),
        Line::raw(" The dashboard only observes: the supervisor and the tunnel"),
        Line::raw(" run the same without it. Logs go to the log file."),
        Line::raw(" Unauthed -> Authing -> Healthy <-> Degraded; failed"),
        Line::raw(" attempts wait in Backoff; an expired session or r"),
        Line::raw(" re-authenticates, keeping the old session meanwhile."),
    ]);
    // Lines are short ASCII; the casts cannot truncate.
    let height = (lines.len() as u16 + 2).min(area.height);
    let width = 66u16.min(area.width);
    let popup = area.centered(Constraint::Length(width), Constraint::Length(height));
    frame.render_widget(Clear, popup);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: false })
            .block(panel("help").border_style(Style::new().fg(Color::Cyan))),
        popup,
    );
}
