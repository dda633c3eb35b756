//! The resolver while connected: `[network] dns` servers, reached through the tunnel.
//!
//! Two ways, chosen by looking at `/etc/resolv.conf`:
//! - it is a symlink into `/run/systemd/resolve/` (the system resolves through systemd-resolved):
//!   set the servers on the TUN link with `resolvectl` and make that link the route for every
//!   domain (`~.`); `resolvectl revert` on stop. The link disappears with the TUN anyway.
//! - otherwise: rewrite the file. The original is *kept inside the rewritten file* (as `#|` comment
//!   lines, or the symlink target, or "absent"), not in a backup file elsewhere: a client killed
//!   with SIGKILL leaves one self-describing file that [`restore_leftover`] (and so
//!   `holdfast client unblock`) can always undo, there is no second file to lose or to collide on,
//!   and it works where `/etc/resolv.conf` is a bind mount (containers, `ip netns exec`), which
//!   cannot be renamed over — there the file is rewritten in place.
//!
//! The kill-switch is what makes other DNS paths impossible (port 53 only through the tunnel);
//! this module only points the system at resolvers that are reachable that way.
//!
//! [`render_resolv_conf`] and [`parse_ours`] are pure and golden-tested; the rest is thin IO.

use std::fs;
use std::io::{self, Write as _};
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const TARGET: &str = "holdfast::dns";

/// The system's resolver file.
pub const SYSTEM_RESOLV_CONF: &str = "/etc/resolv.conf";

/// Where systemd-resolved keeps the files `/etc/resolv.conf` links to when it is in charge.
const RESOLVED_DIR: &str = "/run/systemd/resolve";

/// First line of every file we write; how a leftover is recognised.
const HEADER: &str = "# Written by holdfast while the VPN is up: resolvers reached through the tunnel.";
const ORIGINAL: &str = "# holdfast-original: ";
const ORIGINAL_LINE: &str = "#|";
const ORIGINAL_END: &str = "# holdfast-original-end";

/// Why the resolver could not be set or restored.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The resolver file could not be read.
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    /// The resolver file could not be written.
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    /// `resolvectl` failed.
    #[error("resolvectl {args} failed: {reason}")]
    Resolved { args: String, reason: String },
    /// The settings or the existing file cannot be handled (for example a symlink target with a
    /// line break).
    #[error("invalid DNS settings: {0}")]
    Invalid(String),
}

/// What the resolver path held before holdfast rewrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Original {
    /// A regular file with these exact contents.
    File(String),
    /// A symlink to this target (not followed: the target is not ours to change).
    Symlink(PathBuf),
    /// Nothing.
    Absent,
}

/// The file holdfast writes: the header, one `nameserver` line per server, a `search` line when
/// there are search domains, then the original. Search domains must be plain names (checked
/// where they come from: the client file or the gateway's answer); one that is not is refused
/// here too, so nothing but these lines can ever be written.
pub fn render_resolv_conf(servers: &[IpAddr], search: &[String], original: &Original) -> Result<String, DnsError> {
    for d in search {
        crate::config::check_search_domain(d).map_err(DnsError::Invalid)?;
    }
    let mut s = String::new();
    s.push_str(HEADER);
    s.push('\n');
    s.push_str("# The original follows; it is restored on stop, or run `holdfast client unblock`.\n");
    if servers.len() > 3 {
        // glibc reads at most three (MAXNS); say so instead of failing.
        s.push_str("# Note: the C library uses only the first three nameserver lines.\n");
    }
    for ip in servers {
        s.push_str(&format!("nameserver {ip}\n"));
    }
    if !search.is_empty() {
        s.push_str(&format!("search {}\n", search.join(" ")));
    }
    match original {
        Original::File(text) => {
            s.push_str(ORIGINAL);
            s.push_str("file\n");
            // Split on '\n' (not `lines()`) so the text comes back byte for byte, final newline
            // or not.
            for line in text.split('\n') {
                s.push_str(ORIGINAL_LINE);
                s.push_str(line);
                s.push('\n');
            }
        }
        Original::Symlink(target) => {
            let t = target
                .to_str()
                .filter(|t| !t.contains('\n'))
                .ok_or_else(|| DnsError::Invalid(format!("cannot record the symlink target {}", target.display())))?;
            s.push_str(&format!("{ORIGINAL}symlink {t}\n"));
        }
        Original::Absent => s.push_str(&format!("{ORIGINAL}absent\n")),
    }
    s.push_str(ORIGINAL_END);
    s.push('\n');
    Ok(s)
}

/// The original recorded in a file holdfast wrote; `None` if `text` is not such a file (or is
/// damaged: then it is left alone rather than guessed at).
pub fn parse_ours(text: &str) -> Option<Original> {
    let mut lines = text.split('\n');
    if lines.next()? != HEADER {
        return None;
    }
    let kind = lines.by_ref().find_map(|l| l.strip_prefix(ORIGINAL))?;
    let original = match kind {
        "file" => {
            let mut body = Vec::new();
            loop {
                let l = lines.next()?;
                if l == ORIGINAL_END {
                    break;
                }
                body.push(l.strip_prefix(ORIGINAL_LINE)?);
            }
            return Some(Original::File(body.join("\n")));
        }
        "absent" => Original::Absent,
        other => Original::Symlink(PathBuf::from(other.strip_prefix("symlink ")?)),
    };
    (lines.next()? == ORIGINAL_END).then_some(original)
}

/// What the gateway pushed in the current snapshot (`AuthenticateResponse` fields 11 and 12,
/// checked by the client): the input `[network] dns = "gateway"` follows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushedDns {
    pub servers: Vec<IpAddr>,
    pub search_domains: Vec<String>,
}

impl PushedDns {
    pub fn of(snapshot: &crate::snapshot::VpnAuthResponse) -> Self {
        Self { servers: snapshot.dns_servers.clone(), search_domains: snapshot.search_domains.clone() }
    }
}

/// How the servers get to the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    /// Rewrite this resolver file.
    ResolvConf(PathBuf),
    /// Configure systemd-resolved for the TUN link.
    Resolved { link: String },
}

/// Picks the backend for `path`: systemd-resolved when `path` links into its directory and that
/// directory exists (resolved is running), else the file.
pub fn detect(path: &Path, tun_name: &str) -> Backend {
    let into_resolved = fs::read_link(path).map(|t| t.to_string_lossy().contains("systemd/resolve/")).unwrap_or(false);
    if into_resolved && Path::new(RESOLVED_DIR).is_dir() {
        Backend::Resolved { link: tun_name.to_owned() }
    } else {
        Backend::ResolvConf(path.to_owned())
    }
}

/// The `resolvectl` invocations that make `link` the resolver for everything (and the search
/// domains, if any, search domains of that link).
pub fn resolvectl_apply_args(link: &str, servers: &[IpAddr], search: &[String]) -> Vec<Vec<String>> {
    let mut dns = vec!["dns".to_owned(), link.to_owned()];
    dns.extend(servers.iter().map(ToString::to_string));
    // `~.`: a routing-only domain matching every name, so queries prefer this link.
    let mut domain = vec!["domain".to_owned(), link.to_owned(), "~.".to_owned()];
    domain.extend(search.iter().cloned());
    vec![dns, domain, vec!["default-route".into(), link.into(), "yes".into()]]
}

/// Setting the resolver: see the module doc.
pub struct Dns;

impl Dns {
    /// Points the system resolver at `servers` (the backend chosen by [`detect`] on
    /// `/etc/resolv.conf`). Call once the TUN `tun_name` is up. With no servers nothing changes.
    pub fn apply(tun_name: &str, servers: &[IpAddr], search: &[String]) -> Result<DnsGuard, DnsError> {
        Self::apply_with(detect(Path::new(SYSTEM_RESOLV_CONF), tun_name), servers, search)
    }

    /// [`Dns::apply`] with an explicit resolver file (tests, containers).
    pub fn apply_resolv_conf(path: &Path, servers: &[IpAddr], search: &[String]) -> Result<DnsGuard, DnsError> {
        Self::apply_with(Backend::ResolvConf(path.to_owned()), servers, search)
    }

    /// [`Dns::apply`] with an explicit backend.
    pub fn apply_with(backend: Backend, servers: &[IpAddr], search: &[String]) -> Result<DnsGuard, DnsError> {
        if servers.is_empty() {
            tracing::info!(
                target: TARGET,
                "no resolvers to set (none pushed by the gateway, or [network] dns = \"system\"): \
                 the system resolver is left as it is (with the kill-switch on, it works only if \
                 it is reached through the tunnel)"
            );
            return Ok(DnsGuard { backend: None });
        }
        match &backend {
            Backend::ResolvConf(path) => write_ours(path, servers, search)?,
            Backend::Resolved { link } => {
                for args in resolvectl_apply_args(link, servers, search) {
                    resolvectl(&args)?;
                }
            }
        }
        let list: Vec<String> = servers.iter().map(ToString::to_string).collect();
        tracing::info!(target: TARGET, "resolver set to {} ({})", list.join(" "), describe(&backend));
        Ok(DnsGuard { backend: Some(backend) })
    }
}

fn describe(backend: &Backend) -> String {
    match backend {
        Backend::ResolvConf(p) => format!("rewrote {}", p.display()),
        Backend::Resolved { link } => format!("systemd-resolved, link {link}"),
    }
}

/// What [`Dns::apply`] changed; [`DnsGuard::restore`] undoes it (on an explicit stop). Dropping it
/// without `restore` leaves the change (like a SIGKILL would); [`restore_leftover`] undoes that.
#[must_use = "call restore() on stop"]
#[derive(Debug)]
pub struct DnsGuard {
    backend: Option<Backend>,
}

impl DnsGuard {
    /// A guard of nothing (no resolver set).
    pub fn unset() -> Self {
        Self { backend: None }
    }

    /// Puts the settings back after the TUN device was re-created: per-link settings
    /// (systemd-resolved) went away with the old device; a rewritten resolver file did not.
    pub fn reattach(&self, servers: &[IpAddr], search_domains: &[String]) -> Result<(), DnsError> {
        if let Some(Backend::Resolved { link }) = &self.backend {
            for args in resolvectl_apply_args(link, servers, search_domains) {
                resolvectl(&args)?;
            }
        }
        Ok(())
    }

    /// Puts the original resolver back. If someone else replaced our file meanwhile, theirs is
    /// left alone.
    pub fn restore(self) -> Result<(), DnsError> {
        match &self.backend {
            None => Ok(()),
            Some(Backend::ResolvConf(path)) => {
                if !restore_leftover(path)? {
                    tracing::warn!(
                        target: TARGET,
                        "{} was replaced by someone else while connected; left as it is",
                        path.display()
                    );
                }
                Ok(())
            }
            Some(Backend::Resolved { link }) => {
                // The link is gone with the TUN when the data plane stopped first; nothing to do.
                if let Err(e) = resolvectl(&["revert".into(), link.clone()]) {
                    tracing::debug!(target: TARGET, "{e}");
                }
                tracing::info!(target: TARGET, "resolver restored (systemd-resolved, link {link})");
                Ok(())
            }
        }
    }
}

/// Undoes a rewrite of `path` by holdfast, if `path` holds one (for example after a SIGKILL).
/// Returns whether there was one.
pub fn restore_leftover(path: &Path) -> Result<bool, DnsError> {
    let text = match read_regular(path)? {
        Some(t) => t,
        None => return Ok(false),
    };
    let Some(original) = parse_ours(&text) else {
        return Ok(false);
    };
    let werr = |source| DnsError::Write { path: path.to_owned(), source };
    match &original {
        Original::File(contents) => write_atomically(path, contents).map_err(werr)?,
        Original::Symlink(target) => replace_with_symlink(path, target).map_err(werr)?,
        Original::Absent => fs::remove_file(path).map_err(werr)?,
    }
    tracing::info!(target: TARGET, "restored the original {}", path.display());
    Ok(true)
}

/// Writes our file over `path`, recording what is there now (or what a previous, killed run
/// recorded, so the real original is never lost).
fn write_ours(path: &Path, servers: &[IpAddr], search: &[String]) -> Result<(), DnsError> {
    let original = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Original::Absent,
        Err(source) => return Err(DnsError::Read { path: path.to_owned(), source }),
        Ok(m) if m.file_type().is_symlink() => {
            Original::Symlink(fs::read_link(path).map_err(|source| DnsError::Read { path: path.to_owned(), source })?)
        }
        Ok(_) => {
            let text = read_regular(path)?.unwrap_or_default();
            parse_ours(&text).unwrap_or(Original::File(text))
        }
    };
    let text = render_resolv_conf(servers, search, &original)?;
    write_atomically(path, &text).map_err(|source| DnsError::Write { path: path.to_owned(), source })
}

/// The contents of `path` if it is a regular file (`None` if absent or a symlink).
fn read_regular(path: &Path) -> Result<Option<String>, DnsError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(DnsError::Read { path: path.to_owned(), source }),
        Ok(m) if !m.file_type().is_file() => Ok(None),
        Ok(_) => fs::read_to_string(path).map(Some).map_err(|source| DnsError::Read { path: path.to_owned(), source }),
    }
}

/// Replaces `path` with `contents`: a temporary file renamed over it (readers see the old or the
/// new file, never half of one), keeping the permissions of a regular file that was there. A
/// mount point (bind-mounted file) cannot be renamed over, so it is rewritten in place.
fn write_atomically(path: &Path, contents: &str) -> io::Result<()> {
    if is_mount_point(path) {
        let mut f = fs::OpenOptions::new().write(true).truncate(true).open(path)?;
        f.write_all(contents.as_bytes())?;
        return f.sync_all();
    }
    let mode = fs::symlink_metadata(path)
        .ok()
        .filter(|m| m.file_type().is_file())
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    let tmp = temp_beside(path)?;
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Replaces `path` (a file of ours) with a symlink to `target`, atomically.
fn replace_with_symlink(path: &Path, target: &Path) -> io::Result<()> {
    let tmp = temp_beside(path)?;
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, path).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

/// A temporary name in the same directory (so a rename is atomic), unique per process.
fn temp_beside(path: &Path) -> io::Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp = name.to_os_string();
    tmp.push(format!(".holdfast-{}.tmp", std::process::id()));
    Ok(path.with_file_name(tmp))
}

/// Whether `path` is itself a mount point (per `/proc/self/mountinfo`).
fn is_mount_point(path: &Path) -> bool {
    let Some(full) = path.parent().and_then(|p| fs::canonicalize(p).ok()).zip(path.file_name()) else {
        return false;
    };
    let full = full.0.join(full.1);
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    info.lines().filter_map(|l| l.split(' ').nth(4)).any(|mp| Path::new(&unescape_mountinfo(mp)) == full)
}

/// Mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b.get(i + 1..i + 4).filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn resolvectl(args: &[String]) -> Result<(), DnsError> {
    let fail = |reason: String| DnsError::Resolved { args: args.join(" "), reason };
    let out = Command::new("resolvectl").args(args).stdin(Stdio::null()).output().map_err(|e| fail(e.to_string()))?;
    if out.status.success() { Ok(()) } else { Err(fail(String::from_utf8_lossy(&out.stderr).trim().to_owned())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary directory with `resolv.conf` holding `text`.
    fn resolv_with(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn servers() -> Vec<IpAddr> {
        vec!["100.64.0.1".parse().unwrap(), "2001:2::53".parse().unwrap()]
    }

    #[test]
    fn search_domains_become_one_line_and_nothing_else_gets_in() {
        let search = vec!["corp.example".to_owned(), "lan".to_owned()];
        let text = render_resolv_conf(&servers(), &search, &Original::Absent).unwrap();
        assert!(text.contains("\nnameserver 2001:2::53\nsearch corp.example lan\n"), "{text}");
        let hostile = vec!["lan\nnameserver 198.18.9.9".to_owned()];
        assert!(matches!(render_resolv_conf(&servers(), &hostile, &Original::Absent), Err(DnsError::Invalid(_))));
    }

    #[test]
    fn golden_rewrite_of_a_file() {
        let original = Original::File("nameserver 192.168.1.1\nsearch lan\n".into());
        let text = render_resolv_conf(&servers(), &[], &original).unwrap();
        assert_eq!(
            text,
            "# Written by holdfast while the VPN is up: resolvers reached through the tunnel.\n\
             # The original follows; it is restored on stop, or run `holdfast client unblock`.\n\
             nameserver 100.64.0.1\n\
             nameserver 2001:2::53\n\
             # holdfast-original: file\n\
             #|nameserver 192.168.1.1\n\
             #|search lan\n\
             #|\n\
             # holdfast-original-end\n"
        );
        assert_eq!(parse_ours(&text), Some(original));
    }

    #[test]
    fn originals_round_trip_exactly() {
        let cases = [
            Original::File(String::new()),
            Original::File("no final newline".into()),
            Original::File("a\r\n\n#| looks like ours\n# holdfast-original-end\n\n".into()),
            Original::Symlink("../run/NetworkManager/resolv.conf".into()),
            Original::Absent,
        ];
        for original in cases {
            let text = render_resolv_conf(&servers(), &[], &original).unwrap();
            assert_eq!(parse_ours(&text), Some(original.clone()), "{text}");
        }
        let odd = Original::Symlink("a\nb".into());
        assert!(matches!(render_resolv_conf(&servers(), &[], &odd), Err(DnsError::Invalid(_))));
    }

    #[test]
    fn more_than_three_servers_are_written_with_a_note() {
        let many: Vec<IpAddr> = (1..=4).map(|i| IpAddr::from([10, 0, 0, i])).collect();
        let text = render_resolv_conf(&many, &[], &Original::Absent).unwrap();
        assert!(text.contains("only the first three"));
        assert_eq!(text.matches("\nnameserver ").count(), 4);
    }

    #[test]
    fn foreign_or_damaged_files_are_not_ours() {
        assert_eq!(parse_ours("nameserver 1.1.1.1\n"), None);
        assert_eq!(parse_ours(""), None);
        let ours = render_resolv_conf(&servers(), &[], &Original::File("x\n".into())).unwrap();
        // Truncated before the end marker, or a body line without its prefix: left alone.
        let cut = &ours[..ours.find(ORIGINAL_END).unwrap()];
        assert_eq!(parse_ours(cut), None);
        assert_eq!(parse_ours(&ours.replace("#|x", "x")), None);
        // The header must be the first line, not anywhere.
        assert_eq!(parse_ours(&format!("# mine\n{ours}")), None);
    }

    #[test]
    fn resolvectl_commands() {
        assert_eq!(
            resolvectl_apply_args("holdfast0", &servers(), &["lan".to_owned()]),
            vec![
                vec!["dns", "holdfast0", "100.64.0.1", "2001:2::53"],
                vec!["domain", "holdfast0", "~.", "lan"],
                vec!["default-route", "holdfast0", "yes"],
            ]
        );
    }

    #[test]
    fn detect_uses_resolved_only_for_a_link_into_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("resolv.conf");
        fs::write(&file, "nameserver 1.1.1.1\n").unwrap();
        assert_eq!(detect(&file, "t"), Backend::ResolvConf(file.clone()));
        let link = dir.path().join("link.conf");
        std::os::unix::fs::symlink("/run/NetworkManager/resolv.conf", &link).unwrap();
        assert_eq!(detect(&link, "t"), Backend::ResolvConf(link.clone()));
        let stub = dir.path().join("stub.conf");
        std::os::unix::fs::symlink("../run/systemd/resolve/stub-resolv.conf", &stub).unwrap();
        let expected = if Path::new(RESOLVED_DIR).is_dir() {
            Backend::Resolved { link: "t".into() }
        } else {
            Backend::ResolvConf(stub.clone())
        };
        assert_eq!(detect(&stub, "t"), expected);
    }

    #[test]
    fn apply_and_restore_a_regular_file_keeps_contents_and_mode() {
        let before = "# from DHCP\nnameserver 192.168.1.1\n";
        let (dir, path) = resolv_with(before);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();

        let guard = Dns::apply_resolv_conf(&path, &servers(), &[]).unwrap();
        let during = fs::read_to_string(&path).unwrap();
        assert!(during.contains("nameserver 100.64.0.1\n"));
        assert!(!during.contains("\nnameserver 192.168.1.1"), "{during}");
        guard.restore().unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), before);
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o640);
        // No temporary left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_killed_run_is_undone_by_the_next_run_or_by_unblock() {
        let before = "nameserver 192.168.1.1\n";
        let (_dir, path) = resolv_with(before);

        // First run "killed": its guard is never restored.
        std::mem::forget(Dns::apply_resolv_conf(&path, &servers(), &[]).unwrap());
        // The next run records the real original, not the first run's file.
        let guard = Dns::apply_resolv_conf(&path, &["100.64.0.9".parse().unwrap()], &[]).unwrap();
        let during = fs::read_to_string(&path).unwrap();
        assert_eq!(during.matches(HEADER).count(), 1, "{during}");
        std::mem::forget(guard);
        // `unblock` restores it.
        assert!(restore_leftover(&path).unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), before);
        // Nothing left to do the second time; a foreign file is left alone.
        assert!(!restore_leftover(&path).unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), before);
    }

    #[test]
    fn symlink_and_absent_originals_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::os::unix::fs::symlink("/run/NetworkManager/resolv.conf", &path).unwrap();
        let guard = Dns::apply_resolv_conf(&path, &servers(), &[]).unwrap();
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_file());
        guard.restore().unwrap();
        assert_eq!(fs::read_link(&path).unwrap(), Path::new("/run/NetworkManager/resolv.conf"));

        let absent = dir.path().join("none.conf");
        let guard = Dns::apply_resolv_conf(&absent, &servers(), &[]).unwrap();
        assert!(absent.exists());
        guard.restore().unwrap();
        assert!(!absent.exists());
    }

    #[test]
    fn a_file_replaced_while_connected_is_left_alone() {
        let (_dir, path) = resolv_with("nameserver 192.168.1.1\n");
        let guard = Dns::apply_resolv_conf(&path, &servers(), &[]).unwrap();
        fs::write(&path, "nameserver 9.9.9.9\n").unwrap();
        guard.restore().unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "nameserver 9.9.9.9\n");
    }

    #[test]
    fn no_servers_changes_nothing() {
        let (_dir, path) = resolv_with("nameserver 192.168.1.1\n");
        Dns::apply_resolv_conf(&path, &[], &[]).unwrap().restore().unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "nameserver 192.168.1.1\n");
    }

    #[test]
    fn mountinfo_unescaping() {
        assert_eq!(unescape_mountinfo(r"/etc/a\040b\134c"), "/etc/a b\\c");
        assert_eq!(unescape_mountinfo(r"/x\04"), r"/x\04");
        assert!(!is_mount_point(Path::new("/nonexistent-dir/file")));
    }
}
