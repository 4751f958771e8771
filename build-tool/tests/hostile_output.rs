//! Issue 14's output rows: outputs that are not regular files (devices, FIFOs, links,
//! stdout), input and output size limits, temporary files removed on SIGTERM/SIGINT,
//! errors naming the user's output path, and relative outputs below a directory whose
//! absolute path is longer than `PATH_MAX`.

mod common;

use std::os::unix::fs::FileTypeExt as _;
use std::os::unix::process::{CommandExt as _, ExitStatusExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::temp_files_left;

const KSITES: &str = env!("CARGO_BIN_EXE_ksites");

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A static image with no ifuncs or probes (so `embed` copies it unchanged) and `fill`
/// bytes of data: `dir/NAME`.
fn image(dir: &Path, name: &str, fill: usize) -> PathBuf {
    let src = dir.join(format!("{name}.s"));
    std::fs::write(
        &src,
        format!(".globl _start\n_start: ret\n.data\n.fill {fill}, 1, 7\n"),
    )
    .unwrap();
    let out = dir.join(name);
    let o = run(Command::new("gcc")
        .args(["-nostdlib", "-static", "-no-pie", "-Wl,--emit-relocs", "-o"])
        .arg(&out)
        .arg(&src));
    assert!(o.status.success(), "gcc: {}", stderr(&o));
    std::fs::remove_file(&src).unwrap();
    out
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Runs `ksites embed INPUT -o OUT` while a thread reads the FIFO `fifo`; returns the
/// command's output and what came through the FIFO.
fn embed_into_fifo(input: &Path, out: &Path, fifo: &Path) -> (Output, Vec<u8>) {
    let fifo = fifo.to_path_buf();
    let reader = std::thread::spawn(move || std::fs::read(fifo).unwrap());
    let o = run(Command::new(KSITES)
        .arg("embed")
        .arg(input)
        .arg("-o")
        .arg(out));
    (o, reader.join().unwrap())
}

#[test]
fn row_01_dev_null_is_written_to_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let input = image(dir.path(), "a", 1000);
    let o = run(Command::new(KSITES)
        .arg("embed")
        .arg(&input)
        .args(["-o", "/dev/null"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let m = std::fs::symlink_metadata("/dev/null").unwrap();
    assert!(m.file_type().is_char_device(), "/dev/null was replaced");
    assert!(temp_files_left(Path::new("/dev")).is_empty());
}

#[test]
fn row_01_a_fifo_and_a_link_to_it_are_written_directly() {
    let dir = tempfile::tempdir().unwrap();
    let input = image(dir.path(), "a", 300_000);
    let want = std::fs::read(&input).unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let (o, got) = embed_into_fifo(&input, &fifo, &fifo);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(got == want, "the FIFO got {} bytes", got.len());
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );

    let link = dir.path().join("link");
    std::os::unix::fs::symlink("fifo", &link).unwrap();
    let (o, got) = embed_into_fifo(&input, &link, &fifo);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(got == want);
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(
        std::fs::symlink_metadata(&fifo)
            .unwrap()
            .file_type()
            .is_fifo()
    );
    assert!(temp_files_left(dir.path()).is_empty());
}

#[test]
fn row_01_dash_writes_the_output_to_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let input = image(dir.path(), "a", 1000);
    let o = run(Command::new(KSITES)
        .arg("embed")
        .arg(&input)
        .args(["-o", "-"])
        .current_dir(dir.path()));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout == std::fs::read(&input).unwrap());
    assert!(
        stderr(&o).contains("copied unchanged -> -"),
        "{}",
        stderr(&o)
    );
    assert!(!dir.path().join("-").exists());
    assert!(temp_files_left(dir.path()).is_empty());
    // `/dev/stdout` (a link to /proc/self/fd/1, a pipe here) is written directly too.
    let o = run(Command::new(KSITES)
        .arg("embed")
        .arg(&input)
        .args(["-o", "/dev/stdout"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout == std::fs::read(&input).unwrap());
    assert!(stderr(&o).contains("-> /dev/stdout"), "{}", stderr(&o));
    assert!(
        std::fs::symlink_metadata("/dev/stdout")
            .unwrap()
            .file_type()
            .is_symlink()
    );
    // Stdout a regular file opened for appending (a shell's `>>`): written through the
    // descriptor, so the output is appended and the file (its inode and mode) kept.
    let log = dir.path().join("log");
    std::fs::write(&log, b"hello\n").unwrap();
    let before = std::fs::metadata(&log).unwrap();
    let append = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
    let o = run(Command::new(KSITES)
        .arg("embed")
        .arg(&input)
        .args(["-o", "/dev/stdout"])
        .stdout(append));
    assert!(o.status.success(), "{}", stderr(&o));
    let mut want = b"hello\n".to_vec();
    want.extend(std::fs::read(&input).unwrap());
    assert!(
        std::fs::read(&log).unwrap() == want,
        "the output is appended"
    );
    let after = std::fs::metadata(&log).unwrap();
    use std::os::unix::fs::MetadataExt as _;
    assert_eq!((after.ino(), after.mode()), (before.ino(), before.mode()));
}

/// A link to a regular file: the file it leads to is replaced (through a temporary file
/// beside it, renamed), the link is kept.
#[test]
fn row_01_a_link_to_a_regular_file_replaces_the_file_and_keeps_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let input = image(dir.path(), "a", 1000);
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let target = dir.path().join("sub/real");
    std::fs::write(&target, b"old").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink("sub/real", &link).unwrap();
    let o = run(Command::new(KSITES)
        .arg("embed")
        .arg(&input)
        .arg("-o")
        .arg(&link));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        std::fs::read(&target).unwrap(),
        std::fs::read(&input).unwrap()
    );
    assert!(temp_files_left(dir.path()).is_empty());
    assert!(temp_files_left(&dir.path().join("sub")).is_empty());
}

#[test]
fn row_01_a_directory_and_a_dangling_link_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let input = image(dir.path(), "a", 1000);
    let o = run(Command::new(KSITES)
        .arg("embed")
        .arg(&input)
        .arg("-o")
        .arg(dir.path()));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("it is a directory"), "{}", stderr(&o));
    let link = dir.path().join("dangling");
    std::os::unix::fs::symlink("nowhere", &link).unwrap();
    let o = run(Command::new(KSITES)
        .arg("embed")
        .arg(&input)
        .arg("-o")
        .arg(&link));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("dangling"), "{}", stderr(&o));
    assert!(!dir.path().join("nowhere").exists());
    assert!(temp_files_left(dir.path()).is_empty());
}

#[test]
fn row_12_a_full_device_names_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = image(dir.path(), "a", 1000);
    let o = run(Command::new(KSITES)
        .arg("embed")
        .arg(&input)
        .args(["-o", "/dev/full"]));
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("cannot write /dev/full: No space left on device"),
        "{e}"
    );
    assert!(!e.contains(".ksites-tmp"), "{e}");
    assert!(
        std::fs::symlink_metadata("/dev/full")
            .unwrap()
            .file_type()
            .is_char_device()
    );
}

/// Runs `cmd` and waits at most `limit` for it, killing it past that.
fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            let _ = child.kill();
            panic!("{cmd:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn row_09_an_endless_input_fails_at_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x");
    let o = run_within(
        Command::new(KSITES)
            .args(["embed", "/dev/zero", "--max-size", "1M", "-o"])
            .arg(&out),
        Duration::from_secs(20),
    );
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(
        e.contains("cannot read /dev/zero: larger than the input limit of 1048576 bytes")
            && e.contains("--max-size"),
        "{e}"
    );
    assert!(!out.exists());
    assert!(temp_files_left(dir.path()).is_empty());

    let o = run_within(
        Command::new(KSITES)
            .args(["scan", "--calls-to", "x", "/dev/zero"])
            .env("KSITES_MAX_SIZE", "64K"),
        Duration::from_secs(20),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/dev/zero: larger than the input limit of 65536 bytes"),
        "{}",
        stderr(&o)
    );
    // The flag wins over the environment.
    let o = run_within(
        Command::new(KSITES)
            .args(["scan", "--calls-to", "x", "--max-size", "32K", "/dev/zero"])
            .env("KSITES_MAX_SIZE", "64K"),
        Duration::from_secs(20),
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("/dev/zero: larger than the input limit of 32768 bytes"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn row_09_a_regular_input_over_the_limit_is_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let input = image(dir.path(), "a", 100_000);
    let out = dir.path().join("out");
    let o = run(Command::new(KSITES)
        .arg("embed")
        .arg(&input)
        .args(["--max-size", "64K", "-o"])
        .arg(&out));
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains(&format!(
            "cannot read {}: larger than the input limit of 65536 bytes",
            input.display()
        )),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
    // The same input within a raised limit.
    let o = run(Command::new(KSITES)
        .arg("embed")
        .arg(&input)
        .args(["--max-size", "1M", "-o"])
        .arg(&out));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(Command::new(KSITES)
        .arg("embed")
        .arg(&input)
        .args(["--max-size", "lots", "-o"])
        .arg(&out));
    assert_eq!(o.status.code(), Some(2), "a bad size is a usage error");
}

/// Sends `sig` to an `embed` writing slowly once its temporary file has data, and
/// checks it dies of that signal leaving neither the temporary file nor an output.
fn killed_mid_write(sig: libc::c_int) {
    let dir = tempfile::tempdir().unwrap();
    let input = image(dir.path(), "big", 3 << 20);
    let out = dir.path().join("out");
    let mut child = Command::new(KSITES)
        .arg("embed")
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .env("KSITES_TEST_WRITE_DELAY_MS", "40")
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        let started = temp_files_left(dir.path())
            .iter()
            .any(|p| std::fs::metadata(p).is_ok_and(|m| m.len() > 0));
        if started {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no temporary file appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child, which has not been waited for yet.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(sig), "{status}");
    assert!(
        temp_files_left(dir.path()).is_empty(),
        "left {:?}",
        temp_files_left(dir.path())
    );
    assert!(!out.exists(), "an output was written");
}

#[test]
fn row_10_sigterm_mid_write_removes_the_temporary_file() {
    killed_mid_write(libc::SIGTERM);
}

#[test]
fn row_10_sigint_mid_write_removes_the_temporary_file() {
    killed_mid_write(libc::SIGINT);
}

/// A stale temporary file from a killed run is neither taken for the output nor
/// touched.
#[test]
fn row_10_a_stale_temporary_file_is_not_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = image(dir.path(), "a", 1000);
    let stale = dir.path().join(".ksites-tmp-stale1");
    std::fs::write(&stale, b"half").unwrap();
    let out = dir.path().join("out");
    let o = run(Command::new(KSITES)
        .arg("embed")
        .arg(&input)
        .arg("-o")
        .arg(&out));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&input).unwrap());
    assert_eq!(std::fs::read(&stale).unwrap(), b"half");
    assert_eq!(temp_files_left(dir.path()), vec![stale]);
}

/// A relative `-o` below a directory whose absolute path is longer than `PATH_MAX`:
/// works as `cp` does (the temporary file is made by the same relative path).
#[test]
fn row_14_a_relative_output_below_path_max() {
    let dir = tempfile::tempdir().unwrap();
    let input = image(dir.path(), "a", 1000);
    let name = std::ffi::CString::new("d".repeat(200)).unwrap();
    let depth = 25; // 25 * 201 bytes > 4096
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"cp "$1" in && "$2" embed in -o out && cmp in out && ls -A; echo "rc=$?""#)
        .args(["sh"])
        .arg(&input)
        .arg(KSITES)
        .current_dir(dir.path());
    // SAFETY: the closure runs in the child between fork and exec and only calls
    // mkdir(2) and chdir(2), which are async-signal-safe, on a CString made before.
    unsafe {
        cmd.pre_exec(move || {
            for _ in 0..depth {
                libc::mkdir(name.as_ptr(), 0o700);
                if libc::chdir(name.as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let o = run(&mut cmd);
    let listing = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success() && listing.ends_with("in\nout\nrc=0\n"),
        "{listing}\n{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("too long"), "{}", stderr(&o));
}

/// `ksites link` killed while the linker runs: its `.ksites-link-*` temporary output is
/// removed too.
#[test]
fn row_10_sigterm_during_link_removes_the_linker_temporary_output() {
    let dir = tempfile::tempdir().unwrap();
    let linker = dir.path().join("slow-ld");
    let pidfile = dir.path().join("ld.pid");
    // Written by another process: a file this one holds open for writing could be
    // inherited by a child another test forks, and exec'ing it would fail (ETXTBSY).
    let script = "#!/bin/sh\nwhile [ $# -gt 0 ]; do [ \"$1\" = -o ] && out=$2; shift; done\n\
                  echo partial > \"$out\"; echo $$ > \"$PIDFILE\"; exec sleep 30\n";
    let o = run(Command::new("sh")
        .args([
            "-c",
            r#"printf '%s' "$SCRIPT" > "$1" && chmod 755 "$1""#,
            "sh",
        ])
        .arg(&linker)
        .env("SCRIPT", script));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = dir.path().join("out");
    let mut child = Command::new(KSITES)
        .arg("link")
        .arg("--linker")
        .arg(&linker)
        .args(["--", "-static", "x.o", "-o"])
        .arg(&out)
        .env("PIDFILE", &pidfile)
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let ld_pid = loop {
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<libc::pid_t>().ok())
        {
            break pid;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the linker did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        temp_files_left(dir.path()).iter().any(|p| p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".ksites-link-")),
        "the linker's temporary output is there while it runs"
    );
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    // SAFETY: kill(2) on our own child, not yet waited for, and on the fake linker,
    // which it started and which sleeps until killed.
    unsafe {
        assert_eq!(libc::kill(pid, libc::SIGTERM), 0);
    }
    let status = child.wait().unwrap();
    // The signal was passed on to the linker, which could otherwise go on and write
    // its output again: it is gone (or a zombie waiting for init) soon after.
    let ended = |pid: libc::pid_t| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |st| {
            st.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
    };
    let t0 = Instant::now();
    while !ended(ld_pid) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let linker_ended = ended(ld_pid);
    if !linker_ended {
        // SAFETY: as above; the fake linker still runs (it sleeps until killed).
        unsafe {
            libc::kill(ld_pid, libc::SIGKILL);
        }
    }
    assert!(
        linker_ended,
        "the linker still runs after ksites was terminated"
    );
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}");
    assert!(
        temp_files_left(dir.path()).is_empty(),
        "left {:?}",
        temp_files_left(dir.path())
    );
    assert!(!out.exists());
}
