//! Where outputs go, and the temporary files that get them there: [`Dest`] (a regular
//! file replaced through a temporary file and a rename, a device or FIFO written
//! directly, or stdout), [`TempFile`] (a temporary file beside the output, removed on
//! error, on drop and on SIGINT/SIGTERM/SIGHUP), and the size limits on inputs and
//! outputs ([`max_input_size`], [`check_output_size`]).
//!
//! Paths are used as the user gave them: never made absolute or canonical, so a relative
//! `-o` works wherever the user's path does (also below a directory whose absolute path
//! is longer than `PATH_MAX`).

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use anyhow::{Result, bail};

/// The default limit on the size of an input file (and half the limit on an output).
pub const DEFAULT_MAX_SIZE: u64 = 2 << 30;

/// The environment variable that sets the limit where no `--max-size` is given.
pub const MAX_SIZE_ENV: &str = "KSITES_MAX_SIZE";

/// The limit set by `--max-size`; 0: not set.
static MAX_SIZE: AtomicU64 = AtomicU64::new(0);

/// Sets the input size limit (from `--max-size`) for the rest of the process.
pub fn set_max_size(bytes: u64) {
    MAX_SIZE.store(bytes.max(1), Ordering::Relaxed);
}

/// The largest input file read: `--max-size`, else `$KSITES_MAX_SIZE`, else
/// [`DEFAULT_MAX_SIZE`].
pub fn max_input_size() -> u64 {
    match MAX_SIZE.load(Ordering::Relaxed) {
        0 => std::env::var(MAX_SIZE_ENV)
            .ok()
            .and_then(|v| parse_size(&v).ok())
            .unwrap_or(DEFAULT_MAX_SIZE),
        n => n,
    }
}

/// The largest output written: twice [`max_input_size`].
pub fn max_output_size() -> u64 {
    max_input_size().saturating_mul(2)
}

/// Parses a size: a decimal number of bytes, optionally followed by `K`, `M`, `G` or `T`
/// (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => {
                    return Err(format!(
                        "{s:?}: expected BYTES, or a number with K, M, G or T"
                    ));
                }
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|e| format!("{s:?}: expected a size in bytes: {e}"))?;
    n.checked_mul(1 << shift)
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{s:?}: must be between 1 byte and 2^64-1 bytes"))
}

/// The error for an input larger than [`max_input_size`].
pub fn input_too_large(limit: u64) -> std::io::Error {
    std::io::Error::other(format!(
        "larger than the input limit of {limit} bytes; raise it with --max-size or {MAX_SIZE_ENV}"
    ))
}

/// Fails if `what` (an output, a section of it) of `size` bytes, going to `path`, is
/// larger than [`max_output_size`]: to be called before anything of that size is
/// allocated or written.
pub fn check_output_size(path: &Path, what: &str, size: u64) -> Result<()> {
    let limit = max_output_size();
    if size > limit {
        bail!(
            "{}: {what} would be {size} bytes, more than the output limit of {limit} bytes \
             (twice the input limit); raise it with --max-size or {MAX_SIZE_ENV}",
            path.display()
        );
    }
    Ok(())
}

/// The error for a failed write, sync or rename of the output `path`: it names the
/// user's path, never the temporary file.
pub fn write_error(path: &Path) -> impl FnOnce(std::io::Error) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("cannot write {}: {e}", path.display())
}

/// Where an output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Dest {
    /// `-`: standard output.
    Stdout,
    /// A character device or a FIFO (or a symbolic link to one): opened and written to,
    /// as `cp` does; never replaced.
    Direct(PathBuf),
    /// A regular file, or nothing yet: replaced by writing `target`'s directory's
    /// temporary file and renaming it over `target` (the file itself, or what a chain of
    /// symbolic links leads to: the links are kept).
    Replace {
        /// The regular file replaced.
        target: PathBuf,
    },
}

impl Dest {
    /// Decides where `path` (as the user gave it) is written. Refuses a directory, a
    /// block device, a socket and a dangling symbolic link.
    pub fn resolve(path: &Path) -> Result<Dest> {
        // `-`, and the names of fd 1 (written through the descriptor, as a shell's `>>`
        // or a deleted file expects, never replaced or reopened).
        if ["-", "/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"]
            .iter()
            .any(|n| path.as_os_str() == *n)
        {
            return Ok(Dest::Stdout);
        }
        // What the path leads to, as the kernel follows it (also through /proc's
        // links, as `/dev/stdout` is: they name pipes and sockets by no path).
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
                    bail!(
                        "cannot write {}: it is a symbolic link to a file that does not \
                         exist (not writing through a dangling link)",
                        path.display()
                    );
                }
                return Ok(Dest::Replace {
                    target: path.to_path_buf(),
                });
            }
            Err(e) => return Err(write_error(path)(e)),
        };
        let ft = meta.file_type();
        if ft.is_file() {
            return Ok(Dest::Replace {
                target: link_target(path)?,
            });
        }
        if ft.is_char_device() || ft.is_fifo() {
            return Ok(Dest::Direct(path.to_path_buf()));
        }
        let what = if ft.is_dir() {
            "a directory"
        } else if ft.is_block_device() {
            "a block device (write to a file and copy that)"
        } else {
            "neither a regular file, a character device nor a FIFO"
        };
        bail!("cannot write {}: it is {what}", path.display())
    }

    /// Writes `bytes` to a [`Dest::Stdout`] or [`Dest::Direct`] output (`path`, as the
    /// user gave it, names it in errors). A [`Dest::Replace`] output is written with
    /// [`TempFile`] instead: this returns an error for one.
    pub fn write_direct(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        match self {
            Dest::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(bytes)
                    .and_then(|()| out.flush())
                    .map_err(write_error(path))
            }
            Dest::Direct(p) => {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .map_err(write_error(path))?;
                f.write_all(bytes).map_err(write_error(path))
            }
            Dest::Replace { .. } => bail!("{}: not a direct output", path.display()),
        }
    }
}

/// The regular file a chain of symbolic links starting at `path` ends at (`path` itself
/// if it is no link), by paths relative to where the user's path is, never made
/// absolute.
fn link_target(path: &Path) -> Result<PathBuf> {
    let mut p = path.to_path_buf();
    for _ in 0..40 {
        let meta = std::fs::symlink_metadata(&p).map_err(write_error(path))?;
        if !meta.file_type().is_symlink() {
            if meta.is_file() {
                return Ok(p);
            }
            break;
        }
        let link = std::fs::read_link(&p).map_err(write_error(path))?;
        p = match p.parent() {
            Some(d) if link.is_relative() => d.join(link),
            _ => link,
        };
    }
    bail!(
        "cannot write {}: cannot follow its symbolic links to the file they lead to",
        path.display()
    )
}

/// Whether `path` is where standard output goes: `-`, or the same file (a pipe, a
/// terminal, a file) as file descriptor 1, as `/dev/stdout` is.
pub fn is_stdout(path: &Path) -> bool {
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::MetadataExt as _;
    if path.as_os_str() == "-" {
        return true;
    }
    let Ok(fd) = std::io::stdout().as_fd().try_clone_to_owned() else {
        return false;
    };
    match (File::from(fd).metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// A new temporary file beside an output, named `PREFIX` + random characters in the
/// output's directory (by the same relative or absolute path the user gave). It is
/// removed when dropped (unless [`TempFile::persist`]ed) and when the process gets
/// SIGINT, SIGTERM or SIGHUP. A SIGKILL leaves it: it is never renamed then, so it is
/// never taken for an output, and may be deleted.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    file: File,
    slot: Option<usize>,
    done: bool,
}

impl TempFile {
    /// Creates the temporary file in `output`'s directory (`.` for a bare name).
    pub fn beside(output: &Path, prefix: &str) -> std::io::Result<TempFile> {
        let dir = match output.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        install_handlers();
        let mut last = None;
        for _ in 0..100 {
            let path = dir.join(format!("{prefix}{}", random_name()));
            // Registered before it exists, so that a signal between creating and
            // registering cannot leave it behind.
            let slot = register(path.as_os_str());
            let created = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path);
            match created {
                Ok(file) => {
                    return Ok(TempFile {
                        path,
                        file,
                        slot,
                        done: false,
                    });
                }
                Err(e) => {
                    unregister(slot);
                    if e.kind() != std::io::ErrorKind::AlreadyExists {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no free temporary name")))
    }

    /// The temporary file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open temporary file (read and write).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Renames the temporary file to `to` (in the same directory). On failure the
    /// temporary file is removed when `self` drops.
    pub fn persist(mut self, to: &Path) -> std::io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.done = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
        unregister(self.slot.take());
    }
}

/// Ten random characters for a temporary name.
fn random_name() -> String {
    let mut seed = [0u8; 16];
    // SAFETY: `seed` is a writable buffer of `seed.len()` bytes for the call's duration.
    let got = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), libc::GRND_NONBLOCK) };
    if got != seed.len() as isize {
        // No entropy yet (early boot): the clock, the process and a counter still make
        // a name no other run uses at once; `create_new` catches the rest.
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let mix = t
            ^ (u128::from(std::process::id()) << 64)
            ^ u128::from(COUNT.fetch_add(1, Ordering::Relaxed)) << 96;
        seed = mix.to_le_bytes();
    }
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut x = u128::from_le_bytes(seed);
    (0..10)
        .map(|_| {
            let c = ALPHABET[(x % ALPHABET.len() as u128) as usize];
            x /= ALPHABET.len() as u128;
            c as char
        })
        .collect()
}

// The registry of temporary paths the signal handler removes: fixed-size static slots
// of NUL-terminated bytes, so the handler only reads atomics and calls unlink(2), both
// async-signal-safe. A slot is FREE, WRITING (being filled), READY (the handler may
// remove it) or HANDLING (claimed by the handler, never reused: the process is ending).

const SLOTS: usize = 16;
const PATH_BYTES: usize = 4096;
const FREE: u8 = 0;
const WRITING: u8 = 1;
const READY: u8 = 2;
const HANDLING: u8 = 3;

struct Slot {
    state: AtomicU8,
    bytes: [AtomicU8; PATH_BYTES],
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY_SLOT: Slot = Slot {
    state: AtomicU8::new(FREE),
    bytes: [const { AtomicU8::new(0) }; PATH_BYTES],
};

static REGISTRY: [Slot; SLOTS] = [EMPTY_SLOT; SLOTS];

/// Records `path` for the signal handler; `None` if it cannot be (too long, a NUL in
/// it, every slot taken): then only drop removes it.
fn register(path: &OsStr) -> Option<usize> {
    let bytes = path.as_bytes();
    if bytes.len() >= PATH_BYTES || bytes.contains(&0) {
        return None;
    }
    let i = REGISTRY.iter().position(|s| {
        s.state
            .compare_exchange(FREE, WRITING, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    })?;
    let slot = &REGISTRY[i];
    for (cell, &b) in slot.bytes.iter().zip(bytes.iter().chain([0u8].iter())) {
        cell.store(b, Ordering::Relaxed);
    }
    slot.state.store(READY, Ordering::Release);
    Some(i)
}

/// Forgets a registered path (unless the signal handler is removing it).
fn unregister(slot: Option<usize>) {
    if let Some(i) = slot {
        let _ =
            REGISTRY[i]
                .state
                .compare_exchange(READY, FREE, Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// Removes every registered temporary file. Async-signal-safe: atomics and unlink(2).
/// A slot another thread's handler has claimed (HANDLING) is removed here too: that
/// thread may not have reached its unlink when this one ends the process, and a second
/// unlink of the same path is harmless (its bytes never change once READY).
fn remove_registered() {
    for slot in &REGISTRY {
        let claimed =
            match slot
                .state
                .compare_exchange(READY, HANDLING, Ordering::Acquire, Ordering::Acquire)
            {
                Ok(_) => true,
                Err(state) => state == HANDLING,
            };
        if !claimed {
            continue;
        }
        let mut buf = [0u8; PATH_BYTES];
        for (b, cell) in buf.iter_mut().zip(slot.bytes.iter()) {
            *b = cell.load(Ordering::Relaxed);
            if *b == 0 {
                break;
            }
        }
        // SAFETY: `buf` is NUL-terminated (`register` stored the NUL, and its last byte
        // is never written); unlink(2) only reads it.
        unsafe {
            libc::unlink(buf.as_ptr().cast());
        }
    }
}

/// The handler of SIGINT, SIGTERM and SIGHUP: removes the temporary files, then dies of
/// the same signal (installed with `SA_RESETHAND`, so the signal raised again, pending
/// until the handler returns, takes its default action).
extern "C" fn on_signal(sig: libc::c_int) {
    // The linker `ksites-ld` runs first, so it cannot write its output again after the
    // temporary file is removed.
    let child = CHILD.load(Ordering::Acquire);
    if child > 0 {
        // SAFETY: kill(2) is async-signal-safe; `child` is the pid of a child this
        // process spawned and has not reaped yet (`ChildGuard` clears it before `wait`
        // returns the pid to the system), so it names no other process.
        unsafe {
            libc::kill(child, sig);
        }
    }
    remove_registered();
    // SAFETY: raise(3) is async-signal-safe.
    unsafe {
        libc::raise(sig);
    }
}

/// Installs [`on_signal`] (once) for SIGINT, SIGTERM and SIGHUP, except where the
/// signal is ignored (as `nohup` and background shells leave it).
fn install_handlers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: `old` and `new` are valid sigaction structs for the calls; the
            // handler is an `extern "C" fn(c_int)` that only does async-signal-safe
            // work.
            unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0
                    || old.sa_sigaction == libc::SIG_IGN
                {
                    continue;
                }
                let mut new: libc::sigaction = std::mem::zeroed();
                new.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                new.sa_flags = libc::SA_RESETHAND;
                // Every signal blocked while it runs: a second signal cannot end the
                // process between claiming a slot and removing its file.
                libc::sigfillset(&mut new.sa_mask);
                libc::sigaction(sig, &new, std::ptr::null_mut());
            }
        }
    });
}

/// The pid of the child (the real linker) the signal handler signals first; 0 for none.
static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Makes the SIGINT/SIGTERM/SIGHUP handler pass the signal on to a running child
/// process (the real linker) before it removes the temporary files, so the child
/// cannot write one again; cleared on drop, before the child is reaped.
#[derive(Debug)]
pub struct ChildGuard(());

impl ChildGuard {
    /// Spawns `cmd` and registers the child until the guard drops. SIGINT, SIGTERM and
    /// SIGHUP are blocked from before the spawn until the child is registered, so one
    /// that arrives in between is handled, child included, just after (the child gets
    /// the mask from before).
    pub fn spawn(
        cmd: &mut std::process::Command,
    ) -> std::io::Result<(std::process::Child, ChildGuard)> {
        install_handlers();
        // SAFETY: `set` and `old` are valid sigset_t values for the calls, which only
        // change this thread's signal mask and put it back below.
        let old = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            old
        };
        // The child gets the mask this thread had before (std passes the blocked one on).
        // SAFETY: the closure runs in the forked child before exec and only calls
        // pthread_sigmask, which is async-signal-safe, on a copy of `old`.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            cmd.pre_exec(move || {
                libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
                Ok(())
            });
        }
        let spawned = cmd.spawn();
        if let Ok(child) = &spawned {
            CHILD.store(i32::try_from(child.id()).unwrap_or(0), Ordering::Release);
        }
        // SAFETY: puts back the mask saved above.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        }
        spawned.map(|c| (c, ChildGuard(())))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        CHILD.store(0, Ordering::Release);
    }
}

/// Opens `path` for reading with its size checked against [`max_input_size`] first
/// when it is a regular file; returns the file and its metadata.
pub fn open_input(path: &Path) -> std::io::Result<(File, std::fs::Metadata)> {
    let f = File::open(path)?;
    let meta = f.metadata()?;
    let limit = max_input_size();
    if meta.is_file() && meta.len() > limit {
        return Err(input_too_large(limit));
    }
    Ok((f, meta))
}

/// Reads what is left of `f` (not a regular file: a pipe, a device), failing once more
/// than [`max_input_size`] bytes came, without reading further.
pub fn read_bounded(f: &mut File) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let limit = max_input_size();
    let mut v = Vec::new();
    f.take(limit.saturating_add(1)).read_to_end(&mut v)?;
    if v.len() as u64 > limit {
        return Err(input_too_large(limit));
    }
    Ok(v)
}

/// Writes an output through a temporary file beside `target` ([`TempFile`]): `write`
/// fills it, `check` reads it, then it is synced, given `perms` and renamed over
/// `target`, and the directory is synced. On any failure the temporary file is removed,
/// `target` is untouched, and the error names `shown` (the user's path).
pub fn replace_with(
    shown: &Path,
    target: &Path,
    perms: std::fs::Permissions,
    write: impl FnOnce(&File) -> std::io::Result<()>,
    check: impl FnOnce(&File) -> Result<()>,
) -> Result<()> {
    let tmp = TempFile::beside(target, ".ksites-tmp-").map_err(write_error(shown))?;
    write(tmp.file()).map_err(write_error(shown))?;
    finish(tmp, shown, target, perms, check)
}

/// Finishes a temporary file written for `target`: `check`, sync, `perms`, rename,
/// and the directory synced. Errors name `shown`.
pub fn finish(
    tmp: TempFile,
    shown: &Path,
    target: &Path,
    perms: std::fs::Permissions,
    check: impl FnOnce(&File) -> Result<()>,
) -> Result<()> {
    check(tmp.file())?;
    tmp.file().sync_all().map_err(write_error(shown))?;
    tmp.file()
        .set_permissions(perms)
        .map_err(write_error(shown))?;
    tmp.persist(target).map_err(write_error(shown))?;
    // Make the rename itself durable.
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Whether `a` and `b` name the same file (device and inode; following links).
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("3m"), Ok(3 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert!(parse_size("0").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("5Q").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    /// A write that fails (here ENOSPC, injected) names the user's output path, not
    /// the temporary file, and leaves neither the output nor a temporary file.
    #[test]
    fn row_12_a_failed_write_names_the_output_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.img");
        let perms: std::fs::Permissions = std::os::unix::fs::PermissionsExt::from_mode(0o644);
        let err = replace_with(
            &out,
            &out,
            perms,
            |_| Err(std::io::Error::from_raw_os_error(libc::ENOSPC)),
            |_| Ok(()),
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with(&format!("cannot write {}: No space left", out.display())),
            "{msg}"
        );
        assert!(!msg.contains(".ksites-tmp"), "{msg}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
