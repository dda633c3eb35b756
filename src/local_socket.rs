//! The local status socket both binaries serve: `holdfast status` asks a running client,
//! `holdfast gateway status` a running gateway. One shape for both:
//!
//! - [`bind`] puts a Unix socket at a path, mode 0600 (its folder created 0700 if missing, and
//!   refused if someone else owns it): root-only when the process runs as root. A socket left by a
//!   killed process is replaced; a live one is an error (two processes must not share a socket).
//! - Connecting is the question: the server answers every connection with one JSON document
//!   ([`reply`]) and closes it. There is no request, so nothing for a peer to send us to parse.
//! - [`query_raw`] is the other end, with the errors and exit codes an operator sees (3 when
//!   nothing runs, as `systemctl status` does for a stopped unit).
//!
//! What each side says is its own (`client::status_socket`, `gateway::status`); this module only
//! knows who is speaking ([`Speaker`]), for the messages.

use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

/// Which program serves the socket, for messages ("no holdfast gateway is running").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    Client,
    Gateway,
}

impl std::fmt::Display for Speaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Speaker::Client => "client",
            Speaker::Gateway => "gateway",
        })
    }
}

/// How long a connection may take to read its document before it is dropped. A reader that
/// stalls costs one small task until then, nothing more.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long [`query_raw`] waits for the answer.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// Largest document [`query_raw`] accepts (a report is a few KiB, a gateway's with thousands of
/// sessions a few MiB; this only bounds a broken peer).
const MAX_DOCUMENT: u64 = 64 << 20;

/// Keeps a status socket served. Dropping it stops serving and removes the socket file (if it is
/// still ours: a file another process put there since is left alone).
#[derive(Debug)]
pub struct ServeGuard {
    path: PathBuf,
    /// Device and inode of the socket we bound, to recognise it at removal.
    id: (u64, u64),
    task: Option<JoinHandle<()>>,
}

impl ServeGuard {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands the guard the task that serves the socket, so dropping the guard ends it.
    pub fn with_task(mut self, task: JoinHandle<()>) -> Self {
        self.task = Some(task);
        self
    }
}

impl Drop for ServeGuard {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && (m.dev(), m.ino()) == self.id
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds the status socket at `path` (see the module doc). Must be called inside a tokio runtime.
/// The socket is bound under a temporary name, set to 0600 and then renamed into place, so it is
/// never reachable with looser permissions.
pub fn bind(path: &Path, who: Speaker) -> io::Result<(UnixListener, ServeGuard)> {
    let dir = prepare_dir(path)?;
    clear_stale(path, who)?;
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{} names no file", path.display())))?;
    let mut tmp_name = name.to_owned();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let meta = std::fs::symlink_metadata(path)?;
    let guard = ServeGuard { path: path.to_owned(), id: (meta.dev(), meta.ino()), task: None };
    Ok((listener, guard))
}

/// Creates the socket's folder (0700) if missing and checks who owns it; returns it.
fn prepare_dir(path: &Path) -> io::Result<PathBuf> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    if !dir.exists() {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
    }
    let meta = std::fs::metadata(&dir)?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        // Someone else's folder (e.g. a pre-created /tmp/holdfast-<uid>): they could swap our
        // socket for theirs and answer the status query in our name.
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{} belongs to uid {}, not to us; refusing to serve status there", dir.display(), meta.uid()),
        ));
    }
    Ok(dir)
}

/// Removes a socket nobody listens on; refuses a live one or a non-socket.
fn clear_stale(path: &Path, who: Speaker) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket; refusing to replace it", path.display()),
        ));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("another holdfast {who} is serving its status at {}", path.display()),
        )),
        // Refused: the socket of a process that was killed. Anything else: not ours to judge,
        // but a socket we cannot connect to is useless to everyone, so replace it too.
        Err(_) => std::fs::remove_file(path),
    }
}

/// Writes `doc` to `stream` and closes it, on a task of its own bounded by a timeout, so a
/// stalled reader never holds up the accept loop.
pub fn reply(mut stream: UnixStream, doc: Vec<u8>) {
    tokio::spawn(async move {
        let write = async {
            stream.write_all(&doc).await?;
            stream.shutdown().await
        };
        let _ = tokio::time::timeout(WRITE_TIMEOUT, write).await;
    });
}

/// Accepts the next connection; a failed accept (EMFILE and friends) is transient: it is logged
/// at debug and retried after a short pause, so a persistent error cannot spin the loop.
pub async fn accept(listener: &UnixListener) -> UnixStream {
    loop {
        match listener.accept().await {
            Ok((s, _)) => return s,
            Err(e) => {
                tracing::debug!(target: "holdfast::status", "status socket accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Why a status query could not get a report.
#[derive(Debug, thiserror::Error)]
pub enum StatusQueryError {
    /// Nothing at the socket path.
    #[error("no holdfast {who} is running (no socket at {})", path.display())]
    NotRunning { who: Speaker, path: PathBuf },
    /// A socket file with nobody listening: a process that was killed.
    #[error("no holdfast {who} is running (stale socket at {}, nothing listening)", path.display())]
    Stale { who: Speaker, path: PathBuf },
    /// The socket is root-only (or another user's).
    #[error("permission denied on {} (a {who} running as root answers root only: try sudo)", path.display())]
    PermissionDenied { who: Speaker, path: PathBuf },
    /// No answer in time.
    #[error("the holdfast {who} at {} did not answer within {}s", path.display(), QUERY_TIMEOUT.as_secs())]
    TimedOut { who: Speaker, path: PathBuf },
    /// Any other IO failure.
    #[error("cannot read the status at {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// The answer is not a status report (another program's socket, or another version).
    #[error("the answer at {} is not a holdfast {who} status report: {reason}", path.display())]
    Malformed { who: Speaker, path: PathBuf, reason: String },
}

/// Exit code of a status command when nothing runs (as `systemctl status` for a stopped unit).
pub const NOT_RUNNING: i32 = 3;

impl StatusQueryError {
    /// Exit code for a status command: 3 when nothing runs, 77 for permissions, 70 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            StatusQueryError::NotRunning { .. } | StatusQueryError::Stale { .. } => NOT_RUNNING,
            StatusQueryError::PermissionDenied { .. } => crate::config::exit::NOT_PERMITTED,
            _ => crate::config::exit::FAILURE,
        }
    }
}

/// The raw document served at `path` (blocking, bounded by [`QUERY_TIMEOUT`]).
pub fn query_raw(path: &Path, who: Speaker) -> Result<String, StatusQueryError> {
    let p = || path.to_owned();
    let stream = std::os::unix::net::UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => StatusQueryError::NotRunning { who, path: p() },
        io::ErrorKind::ConnectionRefused => StatusQueryError::Stale { who, path: p() },
        io::ErrorKind::PermissionDenied => StatusQueryError::PermissionDenied { who, path: p() },
        _ => StatusQueryError::Io { path: p(), source: e },
    })?;
    let io_err = |e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => StatusQueryError::TimedOut { who, path: p() },
        _ => StatusQueryError::Io { path: p(), source: e },
    };
    stream.set_read_timeout(Some(QUERY_TIMEOUT)).map_err(io_err)?;
    let mut bytes = Vec::new();
    stream.take(MAX_DOCUMENT).read_to_end(&mut bytes).map_err(io_err)?;
    String::from_utf8(bytes).map_err(|_| StatusQueryError::Malformed { who, path: p(), reason: "not UTF-8".into() })
}

/// [`query_raw`], parsed as `T`.
pub fn query<T: serde::de::DeserializeOwned>(path: &Path, who: Speaker) -> Result<T, StatusQueryError> {
    let text = query_raw(path, who)?;
    serde_json::from_str(&text).map_err(|e| StatusQueryError::Malformed {
        who,
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Prints `text` on stdout and returns 0, or the error on stderr (prefixed with `command`) and
/// its exit code: the tail of every status command.
pub fn print_or_exit(command: &str, result: Result<String, StatusQueryError>) -> i32 {
    use std::io::Write;
    match result {
        Ok(text) => {
            // Not `print!`: that panics on a closed pipe (`holdfast status | head -1`).
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
            crate::config::exit::OK
        }
        Err(e) => {
            eprintln!("{command}: {e}");
            e.exit_code()
        }
    }
}
