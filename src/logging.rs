//! Logging for both binaries: a rolling daily file (bounded number kept) through a non-blocking
//! writer that does not drop lines, plus stderr when nothing else owns the terminal.
//!
//! The levels follow the house rule: `info` one line per state transition and per session change,
//! `warn` the first occurrence of a degradation, `debug` control RPCs, `trace` per packet.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_appender::rolling::{RollingFileAppender, Rotation};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

/// Where and what to log.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Folder of the rolling files (created if missing); `None` for stderr only.
    pub dir: Option<PathBuf>,
    /// File name prefix, e.g. `holdfast-client` (files are `<prefix>.<date>.log`).
    pub prefix: &'static str,
    /// A tracing filter (e.g. `info` or `info,holdfast=debug`); `RUST_LOG` overrides it.
    pub filter: String,
    /// How many daily files to keep.
    pub keep_files: usize,
    /// Also write to stderr (off while a dashboard draws on the terminal).
    pub stderr: bool,
}

/// Lines the file writer queues before a logging thread waits for it. tracing-appender's
/// default, 128 000, is a channel it allocates and writes in full up front: 4 MiB, most of the
/// client's private memory (measured under iperf3 load: RssAnon 5.3 MiB with it, 1.5 MiB
/// without). The routine log is one line per transition; 4096 lines is a burst of debug output
/// with room to spare.
const BUFFERED_LINES: usize = 4096;

/// Keeps the file writer's worker alive; dropping it flushes what is buffered.
pub struct LogGuard {
    _file: Option<WorkerGuard>,
    /// The file problem, if the file could not be opened and only stderr is used.
    pub file_error: Option<String>,
}

/// Installs the global subscriber. A log folder that cannot be created is not fatal: the process
/// logs to stderr and reports why (the caller decides whether to say so).
pub fn init(s: &LogSettings) -> LogGuard {
    let from_env = EnvFilter::try_from_default_env().ok();
    let from_env_set = from_env.is_some();
    let filter = from_env.or_else(|| EnvFilter::try_new(&s.filter).ok()).unwrap_or_else(|| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let opened = s.dir.as_deref().map(|dir| open_file(dir, s.prefix, s.keep_files));
    let (file_layer, guard, file_error) = match opened {
        None => (None, None, None),
        Some(Ok(appender)) => {
            // Lossy off: a full buffer makes the logging thread wait rather than drop a line.
            let (writer, guard) =
                NonBlockingBuilder::default().lossy(false).buffered_lines_limit(BUFFERED_LINES).finish(appender);
            let layer = tracing_subscriber::fmt::layer().with_ansi(false).with_writer(writer);
            (Some(layer), Some(guard), None)
        }
        Some(Err(e)) => (None, None, Some(e)),
    };
    let stderr_layer = (s.stderr || file_error.is_some()).then(|| {
        // Colours only for a person at a terminal, never into journald or a pipe.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr)
    });
    // A second init (tests) keeps the first subscriber; that is fine.
    let installed = tracing_subscriber::registry().with(filter).with(file_layer).with(stderr_layer).try_init();
    if installed.is_ok() {
        let _ = FILTER.set(FilterHandle { handle, from_env: from_env_set });
    }
    if let (Some(e), Some(dir)) = (&file_error, &s.dir) {
        tracing::warn!("cannot write log files in {}: {e}; logging to stderr only", dir.display());
    }
    LogGuard { _file: guard, file_error }
}

fn open_file(dir: &Path, prefix: &str, keep: usize) -> Result<RollingFileAppender, String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    RollingFileAppender::builder()
        .rotation(Rotation::DAILY)
        .filename_prefix(prefix)
        .filename_suffix("log")
        .max_log_files(keep.max(1))
        .build(dir)
        .map_err(|e| e.to_string())
}

/// The installed subscriber's filter, replaceable while the process runs (the gateway's `[log]
/// level` on SIGHUP).
struct FilterHandle {
    handle: reload::Handle<EnvFilter, Registry>,
    /// `RUST_LOG` was set: it wins over any configured level, at start and on reload.
    from_env: bool,
}

static FILTER: OnceLock<FilterHandle> = OnceLock::new();

/// What [`set_filter`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterChange {
    Applied,
    /// `RUST_LOG` is set and wins; the configured level is not applied.
    OverriddenByEnv,
}

/// Checks a tracing filter (`info`, `info,holdfast=debug`) without applying it.
pub fn check_filter(filter: &str) -> Result<(), String> {
    EnvFilter::try_new(filter).map(|_| ()).map_err(|e| e.to_string())
}

/// Replaces the filter of the subscriber [`init`] installed (unless `RUST_LOG` is set, which
/// wins). An error if the filter does not parse or no subscriber of ours is installed.
pub fn set_filter(filter: &str) -> Result<FilterChange, String> {
    let new = EnvFilter::try_new(filter).map_err(|e| e.to_string())?;
    let installed = FILTER.get().ok_or("no log subscriber of ours is installed")?;
    if installed.from_env {
        return Ok(FilterChange::OverriddenByEnv);
    }
    installed.handle.reload(new).map_err(|e| e.to_string())?;
    Ok(FilterChange::Applied)
}

/// Logs `what`'s counters (one info line, "`what` stats: ...") on every SIGUSR1, for operators
/// and tests: the data planes and the resolver never log per packet or per query, so this is how
/// their counts are read from outside. The handler is registered at the call ([`on_signal`]).
pub fn stats_on_sigusr1<S: std::fmt::Display>(
    what: &'static str,
    stats: impl Fn() -> S + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    on_signal(tokio::signal::unix::SignalKind::user_defined1(), "counters are not dumped on demand", move || {
        tracing::info!(target: "holdfast::stats", "{what} stats: {}", stats());
    })
}

/// Runs `each` on every signal of `kind`, until the process ends. The handler is registered at
/// the call, not when the returned future is first polled: a signal that arrives before the
/// spawned task runs must not meet the default action (which, for SIGUSR1 and SIGUSR2, ends the
/// process). Without a handler (the runtime refused one) it logs `without` at debug and does
/// nothing.
pub fn on_signal(
    kind: tokio::signal::unix::SignalKind,
    without: &'static str,
    mut each: impl FnMut() + Send + 'static,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let handler = tokio::signal::unix::signal(kind);
    async move {
        let Ok(mut handler) = handler else {
            tracing::debug!("no handler for signal {}: {without}", kind.as_raw_value());
            return;
        };
        while handler.recv().await.is_some() {
            each();
        }
    }
}
