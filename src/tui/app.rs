//! The dashboard's model: what is on screen, as a pure value.
//!
//! [`App::update`] takes the latest status, data-plane sample and the time (all passed in), and
//! keeps the one piece of history the feed does not: throughput per second for the sparklines.
//! [`action_for`] maps a key to what the user asked for. Neither touches the terminal or the
//! client; `super::run_dashboard` is the shell that does.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

use crate::client::status::ClientStatus;
use crate::client::status_socket::DataPlaneSample;
use crate::sansio::supervisor::Now;

/// How many per-second throughput points are kept: two minutes, wider than any sparkline the
/// layout draws on a normal terminal.
pub const HISTORY: usize = 120;

/// Throughput is measured over at least this long, so a 4 Hz redraw does not turn packet bursts
/// into a comb of spikes and zeros.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// What a key asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Stop the client (explicit stop: kill-switch released, exit 0).
    Stop,
    /// Force a re-authentication.
    Reauth,
    /// Show or hide the help overlay.
    ToggleHelp,
    /// Hide the help overlay if shown.
    CloseHelp,
}

/// The key bindings: `q` / Ctrl-C stop, `r` re-authenticates, `?` toggles help, Esc closes it.
/// Key releases and repeats (reported by some terminals) are ignored, so one press acts once.
pub fn action_for(key: &KeyEvent) -> Option<Action> {
    if key.kind != KeyEventKind::Press {
        return None;
    }
    match key.code {
        KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => Some(Action::Stop),
        KeyCode::Char('q') | KeyCode::Char('Q') => Some(Action::Stop),
        KeyCode::Char('r') | KeyCode::Char('R') => Some(Action::Reauth),
        KeyCode::Char('?') | KeyCode::F(1) => Some(Action::ToggleHelp),
        KeyCode::Esc => Some(Action::CloseHelp),
        _ => None,
    }
}

/// An extra key the embedding program adds to the dashboard (the demo's fault injectors): the key,
/// a short label for the footer and the help, and an action that returns a notice to show. The
/// action runs off the async runtime (it may start processes), never inside a render.
#[derive(Clone)]
pub struct ExtraKey {
    pub key: char,
    pub label: String,
    pub action: std::sync::Arc<dyn Fn() -> String + Send + Sync>,
}

impl std::fmt::Debug for ExtraKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ExtraKey({:?}, {:?})", self.key, self.label)
    }
}

/// The index of the extra key a key press selects, if any. Built-in keys win: an extra key that
/// collides with `q`, `r` or `?` is never selected.
pub fn extra_for(key: &KeyEvent, extras: &[ExtraKey]) -> Option<usize> {
    if key.kind != KeyEventKind::Press || action_for(key).is_some() {
        return None;
    }
    match key.code {
        KeyCode::Char(c) if !key.modifiers.contains(KeyModifiers::CONTROL) => extras.iter().position(|e| e.key == c),
        _ => None,
    }
}

/// One throughput point: bytes per second received and sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rate {
    pub rx: u64,
    pub tx: u64,
}

/// The counters at the start of the current rate window.
#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Now,
    rx: u64,
    tx: u64,
}

/// The dashboard's state.
#[derive(Debug, Clone)]
pub struct App {
    pub(super) status: ClientStatus,
    pub(super) sample: Option<DataPlaneSample>,
    pub(super) killswitch: String,
    /// Machine time of the last update.
    pub(super) now: Now,
    /// Wall time of the last update (for the snapshot's age).
    pub(super) wall: SystemTime,
    /// Per-second throughput, oldest first, at most [`HISTORY`] points.
    pub(super) history: VecDeque<Rate>,
    mark: Option<Mark>,
    pub(super) help: bool,
    /// A line about the last key action ("re-authentication requested"), shown in the footer.
    pub(super) notice: Option<(Now, String)>,
    /// Extra keys of the embedding program: (key, label).
    extra_keys: Vec<(char, String)>,
}

/// How long a footer notice stays.
const NOTICE_FOR: Duration = Duration::from_secs(5);

impl App {
    /// A dashboard that has seen nothing yet. `killswitch` is the kill-switch's description.
    pub fn new(killswitch: String) -> Self {
        Self {
            status: ClientStatus::initial(std::time::Instant::now()),
            sample: None,
            killswitch,
            now: Duration::ZERO,
            wall: SystemTime::UNIX_EPOCH,
            history: VecDeque::with_capacity(HISTORY),
            mark: None,
            help: false,
            notice: None,
            extra_keys: Vec::new(),
        }
    }

    /// Takes in the latest status and sample at machine time `now` and wall time `wall`.
    ///
    /// A throughput point is added once at least a second has passed since the last one,
    /// as the byte difference over the real elapsed time. Counters that go backwards (a data
    /// plane that was replaced) start a new window instead of producing a bogus point.
    pub fn update(&mut self, status: ClientStatus, sample: Option<DataPlaneSample>, now: Now, wall: SystemTime) {
        if let Some(s) = &sample {
            match self.mark {
                Some(m) if s.rx_bytes < m.rx || s.tx_bytes < m.tx || now < m.at => {
                    self.mark = Some(Mark { at: now, rx: s.rx_bytes, tx: s.tx_bytes });
                }
                Some(m) if now - m.at >= RATE_WINDOW => {
                    let ms = u64::try_from((now - m.at).as_millis()).unwrap_or(u64::MAX).max(1);
                    let per_sec = |d: u64| d.saturating_mul(1000) / ms;
                    self.push(Rate { rx: per_sec(s.rx_bytes - m.rx), tx: per_sec(s.tx_bytes - m.tx) });
                    self.mark = Some(Mark { at: now, rx: s.rx_bytes, tx: s.tx_bytes });
                }
                Some(_) => {}
                None => self.mark = Some(Mark { at: now, rx: s.rx_bytes, tx: s.tx_bytes }),
            }
        }
        self.status = status;
        self.sample = sample;
        self.now = now;
        self.wall = wall;
        if self.notice.as_ref().is_some_and(|(at, _)| now.saturating_sub(*at) >= NOTICE_FOR) {
            self.notice = None;
        }
    }

    fn push(&mut self, r: Rate) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(r);
    }

    /// Applies the part of an action that concerns the screen (help, the footer notice). The
    /// shell performs the part that concerns the client (stop, re-auth).
    pub fn apply(&mut self, action: Action) {
        match action {
            Action::ToggleHelp => self.help = !self.help,
            Action::CloseHelp => self.help = false,
            Action::Reauth => {
                self.notice = Some((self.now, "re-authentication requested".into()));
            }
            Action::Stop => self.notice = Some((self.now, "stopping...".into())),
        }
    }

    /// Labels of the extra keys, for the footer and the help overlay.
    pub fn set_extra_keys(&mut self, keys: Vec<(char, String)>) {
        self.extra_keys = keys;
    }

    /// The extra keys' labels.
    pub fn extra_keys(&self) -> &[(char, String)] {
        &self.extra_keys
    }

    /// Shows `text` in the footer for a while.
    pub fn notify(&mut self, text: String) {
        self.notice = Some((self.now, text));
    }

    /// Whether the help overlay is shown.
    pub fn help_shown(&self) -> bool {
        self.help
    }

    /// The throughput history, oldest first.
    pub fn history(&self) -> impl ExactSizeIterator<Item = &Rate> {
        self.history.iter()
    }

    /// The status last given to [`App::update`].
    pub fn status(&self) -> &ClientStatus {
        &self.status
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rx: u64, tx: u64) -> Option<DataPlaneSample> {
        Some(DataPlaneSample { rx_bytes: rx, tx_bytes: tx, ..Default::default() })
    }

    fn at(ms: u64) -> Now {
        Duration::from_millis(ms)
    }

    fn tick(app: &mut App, ms: u64, rx: u64, tx: u64) {
        app.update(ClientStatus::initial(std::time::Instant::now()), sample(rx, tx), at(ms), SystemTime::UNIX_EPOCH);
    }

    #[test]
    fn rates_are_per_second_over_the_real_window() {
        let mut app = App::new("test".into());
        tick(&mut app, 0, 0, 0);
        tick(&mut app, 250, 500, 50);
        assert_eq!(app.history().len(), 0, "no point before a full second");
        tick(&mut app, 1500, 3000, 300);
        assert_eq!(app.history().copied().collect::<Vec<_>>(), vec![Rate { rx: 2000, tx: 200 }]);
    }

    #[test]
    fn history_is_bounded_and_counter_resets_do_not_spike() {
        let mut app = App::new("test".into());
        for i in 0..(HISTORY as u64 + 30) {
            tick(&mut app, i * 1000, i * 100, 0);
        }
        assert_eq!(app.history().len(), HISTORY);
        assert!(app.history().all(|r| r.rx == 100));
        let before = app.history().len();
        // The data plane was replaced: counters restart from zero.
        tick(&mut app, 1_000_000, 5, 0);
        assert_eq!(app.history().len(), before);
        tick(&mut app, 1_001_000, 105, 0);
        assert_eq!(app.history().last().copied(), Some(Rate { rx: 100, tx: 0 }));
    }

    #[test]
    fn keys_map_to_actions() {
        let key = |c, m| KeyEvent::new(c, m);
        let table = [
            (KeyCode::Char('q'), KeyModifiers::NONE, Some(Action::Stop)),
            (KeyCode::Char('c'), KeyModifiers::CONTROL, Some(Action::Stop)),
            (KeyCode::Char('c'), KeyModifiers::NONE, None),
            (KeyCode::Char('r'), KeyModifiers::NONE, Some(Action::Reauth)),
            (KeyCode::Char('?'), KeyModifiers::SHIFT, Some(Action::ToggleHelp)),
            (KeyCode::Esc, KeyModifiers::NONE, Some(Action::CloseHelp)),
        ];
        for (code, mods, want) in table {
            assert_eq!(action_for(&key(code, mods)), want, "{code:?} {mods:?}");
        }
        let mut release = key(KeyCode::Char('q'), KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        assert_eq!(action_for(&release), None);

        let mut app = App::new("x".into());
        app.apply(Action::ToggleHelp);
        assert!(app.help_shown());
        app.apply(Action::CloseHelp);
        assert!(!app.help_shown());
    }
}
