//! A throw-away PostgreSQL cluster per test: Debian's server binaries, `initdb` into a temp dir
//! owned by the postgres user, `pg_ctl` serving on a unix socket only (no TCP, reachable from
//! every network namespace through the shared filesystem). Stopped and removed on drop, also
//! when the test panics.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// The server binaries, if installed (`/usr/lib/postgresql/<v>/bin`).
pub fn bin_dir() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())
        .collect();
    found.sort();
    found.pop()
}

/// Whether a cluster can be started here (server binaries present, running as root so we can
/// become the postgres user).
pub fn available() -> bool {
    bin_dir().is_some() && unsafe { libc::geteuid() } == 0 && which_runuser()
}

fn which_runuser() -> bool {
    Command::new("runuser").arg("--help").output().is_ok()
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A running cluster with one database, `holdfast`.
pub struct Cluster {
    bin: PathBuf,
    root: PathBuf,
    data: PathBuf,
    sock: PathBuf,
}

fn as_postgres(program: &Path, args: &[&str]) -> Output {
    Command::new("runuser").args(["-u", "postgres", "--"]).arg(program).args(args).output().expect("run as postgres")
}

fn ok(out: Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cluster {
    /// initdb + start + createdb. Panics (failing the test) when any step fails.
    pub fn start() -> Cluster {
        let bin = bin_dir().expect("PostgreSQL server binaries");
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        // Short path: a unix socket path must fit in 107 bytes.
        let root = PathBuf::from(format!("/tmp/hfpg-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let data = root.join("data");
        let sock = root.join("s");
        std::fs::create_dir_all(&sock).unwrap();
        ok(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&root).output().unwrap(), "chown");
        let c = Cluster { bin, root, data, sock };
        ok(
            as_postgres(
                &c.bin.join("initdb"),
                &["-A", "trust", "-U", "postgres", "--no-sync", "-D", c.data.to_str().unwrap()],
            ),
            "initdb",
        );
        c.pg_start();
        ok(
            as_postgres(&c.bin.join("createdb"), &["-h", c.sock.to_str().unwrap(), "-U", "postgres", "holdfast"]),
            "createdb",
        );
        c
    }

    fn pg_start(&self) {
        let opts = format!("-k {} -c listen_addresses='' -c max_connections=300 -c fsync=off", self.sock.display());
        ok(
            as_postgres(
                &self.bin.join("pg_ctl"),
                &[
                    "-D",
                    self.data.to_str().unwrap(),
                    "-o",
                    &opts,
                    "-l",
                    self.root.join("log").to_str().unwrap(),
                    "-w",
                    "start",
                ],
            ),
            "pg_ctl start",
        );
    }

    /// Stops the server (fast shutdown: connections are closed), as in an outage.
    pub fn stop(&self) {
        ok(
            as_postgres(&self.bin.join("pg_ctl"), &["-D", self.data.to_str().unwrap(), "-m", "fast", "-w", "stop"]),
            "pg_ctl stop",
        );
    }

    /// Starts it again after [`Cluster::stop`].
    pub fn restart(&self) {
        self.pg_start();
    }

    /// The directory of the server's unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.sock
    }

    /// The cluster's scratch directory (removed on drop).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The URL of the `holdfast` database over the unix socket.
    pub fn url(&self) -> String {
        self.url_for("postgres", "holdfast")
    }

    pub fn url_for(&self, user: &str, db: &str) -> String {
        format!("postgres://{user}@localhost/{db}?host={}", self.sock.display())
    }

    /// Runs SQL that must fail; returns psql's error output.
    pub fn psql_err(&self, sql: &str) -> String {
        let out = self.psql_output(sql);
        assert!(!out.status.success(), "psql {sql} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    fn psql_output(&self, sql: &str) -> Output {
        as_postgres(
            &self.bin.join("psql"),
            &[
                "-h",
                self.sock.to_str().unwrap(),
                "-U",
                "postgres",
                "-d",
                "holdfast",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ],
        )
    }

    /// Runs SQL with psql as the superuser; returns stdout.
    pub fn psql(&self, sql: &str) -> String {
        let out = self.psql_output(sql);
        ok(out.clone(), &format!("psql {sql}"));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = as_postgres(
            &self.bin.join("pg_ctl"),
            &["-D", self.data.to_str().unwrap(), "-m", "immediate", "-w", "stop"],
        );
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
