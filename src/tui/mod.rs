//! The dashboard: a ratatui view of the client's status feed.
//!
//! It observes and never drives: it reads the `watch` feed the supervisor publishes (and a sample
//! of the data-plane counters), and the only ways it touches the client are the two keys that
//! ask for something, `q` (explicit stop, performed by the caller) and `r` (re-authentication,
//! through [`ClientHandle::reauth`]). The supervisor and the UDP loops run the same without it.
//!
//! - [`app`]: the pure model ([`App`]) and the key bindings ([`action_for`]).
//! - [`render()`]: the pure drawing function, tested with ratatui's `TestBackend`.
//! - [`run_dashboard`]: the shell: terminal set-up and restore, the event loop.
//!
//! The terminal is restored on every exit path: a guard restores it when [`run_dashboard`]
//! returns or its future is dropped (a `select!` on a signal, say), and a panic hook restores it
//! before the panic message prints (then chains to the hook that was there before). Nothing else
//! may write to the terminal meanwhile: logs must go to the file only (`LogSettings::stderr`
//! false) while the dashboard runs.

pub mod app;
pub mod render;

use std::io::{self, IsTerminal};
use std::sync::Once;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crossterm::event::{Event, EventStream};
use crossterm::{cursor, execute, terminal};
use futures_util::StreamExt;
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;

pub use app::{Action, App, ExtraKey, action_for, extra_for};
pub use render::render;

use crate::client::ClientHandle;
use crate::client::status_socket::StatusClock;
pub use crate::client::status_socket::{DataPlaneSample, DropCount, PathMtuInfo, Sampler, TunInfo};

/// How often the dashboard redraws without a status change: countdowns and sparklines move at
/// this rate. 4 Hz reads as live and costs nothing measurable.
const REDRAW: Duration = Duration::from_millis(250);

/// Why [`run_dashboard`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DashboardExit {
    /// The user pressed `q` or Ctrl-C: the caller runs `handle.stop()` and exits 0.
    Stop,
    /// The supervisor ended on its own (it only ends on a stop from elsewhere).
    ClientEnded,
    /// The terminal went away (input closed, or a panic elsewhere restored it). The client is
    /// untouched: the caller keeps it running headless until a signal stops it.
    TerminalLost,
}

/// Whether to run the dashboard: not asked off, and both stdin and stdout are terminals.
pub fn should_use_dashboard(no_tui: bool) -> bool {
    !no_tui && io::stdout().is_terminal() && io::stdin().is_terminal()
}

/// Runs the dashboard on the process's terminal until the user stops the client, the client
/// ends, or the terminal is lost. Errors are terminal errors (set-up, drawing); the client is
/// never affected by them, so the caller should fall back to running headless.
///
/// Only one dashboard may run at a time in a process (the terminal is process-wide).
pub async fn run_dashboard(
    handle: &ClientHandle,
    sampler: Option<Sampler>,
    killswitch: String,
    extras: Vec<ExtraKey>,
) -> io::Result<DashboardExit> {
    let mut status = handle.status();
    let mut clock = StatusClock::new(status.borrow().epoch);
    let mut app = App::new(killswitch);
    app.set_extra_keys(extras.iter().map(|e| (e.key, e.label.clone())).collect());

    let _session = TerminalSession::enter()?;
    let mut term = Terminal::new(CrosstermBackend::new(io::stdout()))?;
    term.clear()?;
    let mut events = EventStream::new();
    let mut tick = tokio::time::interval(REDRAW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);

    loop {
        if !TERMINAL_ACTIVE.load(Ordering::SeqCst) {
            // A panic elsewhere in the process restored the terminal for its message; drawing
            // on would scribble over it.
            return Ok(DashboardExit::TerminalLost);
        }
        let at = Instant::now();
        let current = status.borrow_and_update().clone();
        clock.observe(&current, at);
        let sample = sampler.as_ref().and_then(|s| s());
        app.update(current, sample, clock.now(at), SystemTime::now());
        // `draw` also resizes the viewport to the terminal, so a resize needs no more than this.
        term.draw(|f| render(&app, f))?;
        if handle.is_finished() {
            return Ok(DashboardExit::ClientEnded);
        }

        tokio::select! {
            _ = tick.tick() => {}
            changed = status.changed() => {
                if changed.is_err() {
                    // The driver dropped the feed: it has returned.
                    return Ok(DashboardExit::ClientEnded);
                }
            }
            event = events.next() => match event {
                Some(Ok(Event::Key(key))) if extra_for(&key, &extras).is_some() => {
                    if let Some(extra) = extra_for(&key, &extras).and_then(|i| extras.get(i)) {
                        let action = extra.action.clone();
                        let notice = tokio::task::spawn_blocking(move || action())
                            .await
                            .unwrap_or_else(|e| format!("{}: failed ({e})", extra.label));
                        app.notify(notice);
                    }
                }
                Some(Ok(Event::Key(key))) => match action_for(&key) {
                    Some(Action::Stop) => {
                        app.apply(Action::Stop);
                        term.draw(|f| render(&app, f))?;
                        return Ok(DashboardExit::Stop);
                    }
                    Some(Action::Reauth) => {
                        handle.reauth().await;
                        app.apply(Action::Reauth);
                    }
                    Some(other) => app.apply(other),
                    None => {}
                },
                // Resize, focus, mouse, paste: the next draw picks up the new size.
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(DashboardExit::TerminalLost),
            }
        }
    }
}

/// Whether the terminal is in the dashboard's mode (raw, alternate screen). Shared with the
/// panic hook, which cannot reach the guard.
static TERMINAL_ACTIVE: AtomicBool = AtomicBool::new(false);
static PANIC_HOOK: Once = Once::new();

/// Raw mode + alternate screen + hidden cursor for as long as it lives.
struct TerminalSession;

impl TerminalSession {
    fn enter() -> io::Result<Self> {
        install_panic_hook();
        terminal::enable_raw_mode()?;
        // From here on the guard exists, so a failure below still restores raw mode.
        TERMINAL_ACTIVE.store(true, Ordering::SeqCst);
        let session = TerminalSession;
        execute!(io::stdout(), terminal::EnterAlternateScreen, cursor::Hide)?;
        Ok(session)
    }
}

impl Drop for TerminalSession {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// Leaves the dashboard's terminal mode, once (a second call does nothing). Errors are ignored:
/// this runs on the way out, where there is nobody left to tell.
fn restore_terminal() {
    if TERMINAL_ACTIVE.swap(false, Ordering::SeqCst) {
        let _ = terminal::disable_raw_mode();
        let _ = execute!(io::stdout(), terminal::LeaveAlternateScreen, cursor::Show);
    }
}

/// Installs (once per process) a panic hook that restores the terminal, then runs the hook that
/// was installed before, so the panic message lands on a usable terminal. Outside a dashboard
/// session the restore does nothing.
fn install_panic_hook() {
    PANIC_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            previous(info);
        }));
    });
}
