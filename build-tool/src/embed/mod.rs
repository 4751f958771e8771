//! `ksites embed`: discover sites, write the `.ksites` table, and write the output
//! atomically.
//!
//! * [`exec`]: linked images (ET_EXEC, ET_DYN): the table in a `.ksites` section the
//!   linker script reserved, or else in a new `PT_LOAD`; the table cell filled, C probe
//!   sites disabled.
//! * [`rel`]: relocatable objects (ET_REL modules): `.ksites` and `.rela.ksites`, laid
//!   out by the module layout contract ([`kernel_loader::module::layout`]).
//! * `report`: [`EmbedReport`] and [`AlreadyEmbedded`].
//!
//! A linked image's output is described, not built: the input's bytes with a few ranges
//! replaced, then the new parts ([`Output`]). [`embed_file`] writes it straight from the
//! (memory-mapped) input into the temporary file, so the image is never copied in
//! memory, and checks the result by mapping the file it wrote.

use std::borrow::Cow;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use kernel_loader::format::SECTION_NAME;

use crate::elf::{ElfKind, Image, read_file};
use crate::output::{
    Dest, TempFile, check_output_size, finish, replace_with, same_file, write_error,
};

pub mod exec;
pub mod rel;
mod report;

pub use exec::{append_segment, stapsdt_notes};
pub use report::{AlreadyEmbedded, EmbedReport};

/// An output file: `base` with some ranges replaced (in the order given: a later
/// replacement wins where two overlap), then `tail` appended.
#[derive(Debug, Default)]
pub struct Output<'a> {
    base: Cow<'a, [u8]>,
    patches: Vec<(usize, Vec<u8>)>,
    tail: Vec<Vec<u8>>,
}

impl<'a> Output<'a> {
    /// `base`, unchanged so far.
    pub fn new(base: impl Into<Cow<'a, [u8]>>) -> Self {
        Output {
            base: base.into(),
            patches: Vec::new(),
            tail: Vec::new(),
        }
    }

    /// The length of `base`: where the tail starts.
    pub fn base_len(&self) -> usize {
        self.base.len()
    }

    /// The whole output's length.
    pub fn len(&self) -> usize {
        self.base.len() + self.tail.iter().map(Vec::len).sum::<usize>()
    }

    /// Whether the output is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces `bytes.len()` bytes of the base at `at`; `None` (nothing changed) if
    /// they are not all inside the base.
    pub fn patch(&mut self, at: usize, bytes: &[u8]) -> Option<()> {
        if at.checked_add(bytes.len())? > self.base.len() {
            return None;
        }
        if !bytes.is_empty() {
            self.patches.push((at, bytes.to_vec()));
        }
        Some(())
    }

    /// Appends `bytes` after everything so far.
    pub fn append(&mut self, bytes: Vec<u8>) {
        if !bytes.is_empty() {
            self.tail.push(bytes);
        }
    }

    /// The patched ranges of the base, merged where they overlap or touch, each with its
    /// final bytes (the patches applied in order).
    fn regions(&self) -> Vec<(usize, Vec<u8>)> {
        let mut spans: Vec<(usize, usize)> = self
            .patches
            .iter()
            .map(|(at, b)| (*at, at + b.len()))
            .collect();
        spans.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::new();
        for (s, e) in spans {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        let mut regions: Vec<(usize, Vec<u8>)> = merged
            .iter()
            .map(|&(s, e)| (s, self.base[s..e].to_vec()))
            .collect();
        for (at, b) in &self.patches {
            let r = merged.partition_point(|&(s, _)| s <= *at) - 1;
            let (s, bytes) = &mut regions[r];
            bytes[at - *s..at - *s + b.len()].copy_from_slice(b);
        }
        regions
    }

    /// Writes the output to `w`: the base's unchanged ranges straight from `base`.
    pub fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
        let mut pos = 0;
        for (s, bytes) in self.regions() {
            w.write_all(&self.base[pos..s])?;
            w.write_all(&bytes)?;
            pos = s + bytes.len();
        }
        w.write_all(&self.base[pos..])?;
        for t in &self.tail {
            w.write_all(t)?;
        }
        Ok(())
    }

    /// Whether the base is `data` itself (not a copy): then the output starts with
    /// `data`, changed only by the patches.
    pub fn base_is(&self, data: &[u8]) -> bool {
        matches!(&self.base, Cow::Borrowed(b) if std::ptr::eq(*b, data))
    }

    /// Writes into `file`, which already holds the base at offset 0, what differs
    /// from it: the patched ranges, then the tail.
    fn write_changes_at(&self, file: &std::fs::File, pace: Option<Pace>) -> std::io::Result<()> {
        for (s, bytes) in self.regions() {
            write_at(file, &bytes, s as u64, pace)?;
        }
        let mut at = self.base.len() as u64;
        for t in &self.tail {
            write_at(file, t, at, pace)?;
            at += t.len() as u64;
        }
        Ok(())
    }

    /// The output as one vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        self.write_to(&mut v)
            .expect("writing to a vector cannot fail");
        v
    }
}

/// An embedded output and the check its bytes must pass once written.
struct Embedded<'a> {
    out: Output<'a>,
    report: EmbedReport,
    /// For linked images: re-read the output ([`exec::verify_output`]).
    check: Option<exec::OutputCheck>,
}

fn embed_image<'a>(path: &str, data: &'a [u8]) -> Result<Embedded<'a>> {
    let img = Image::parse(path, data)?;
    let reserved = match img.section_by_name(SECTION_NAME) {
        None => None,
        Some(_) if img.kind == ElfKind::Rel => {
            return Err(AlreadyEmbedded(path.to_string()).into());
        }
        // A linked image: a table already, or a slot its linker script reserved.
        Some(sec) => match exec::reserved_slot(path, &sec)? {
            None => return Err(AlreadyEmbedded(path.to_string()).into()),
            slot => slot,
        },
    };
    if img.kind == ElfKind::Rel {
        // A module: `.ksites` + `.rela.ksites`, always (even an empty table).
        let (bytes, report) = rel::embed_rel(path, data)?;
        return Ok(Embedded {
            out: Output::new(bytes),
            report,
            check: None,
        });
    }
    exec::embed_exec(path, data, &img, reserved)
}

/// Embeds into an in-memory image; returns the new file contents.
pub fn embed_bytes(path: &str, data: &[u8]) -> Result<(Vec<u8>, EmbedReport)> {
    let e = embed_image(path, data)?;
    let out = e.out.to_vec();
    if let Some(c) = &e.check {
        exec::verify_output(path, &out, c)?;
    }
    Ok((out, e.report))
}

/// Embeds `input` into `output`, writing a temporary file beside `output` and renaming
/// it, so `output` is either untouched or complete. `input` is never modified.
///
/// Where the output goes is decided by [`Dest::resolve`]: a regular file (or a new
/// one) is replaced through the temporary file; a symbolic link to a regular file is
/// followed, and the file it leads to is replaced (the link stays); a character device
/// or a FIFO (or a link to one) is opened and written to directly; `-` is stdout;
/// anything else is refused. Errors name `output` as given, never the temporary file.
///
/// A linked image's output starts with the input unchanged but for a few patched
/// ranges: while the sites are found, a second thread copies the input into the
/// temporary file and syncs it, so that writing and syncing the output's bulk overlaps
/// the work; the patches and the new parts are written over and after it once known.
/// Errors come in the same order as without the copy (its temporary file is only
/// opportunistic: a failure to create it leaves the ordinary path to report it).
pub fn embed_file(input: &Path, output: &Path) -> Result<EmbedReport> {
    let dest = Dest::resolve(output)?;
    if let Dest::Replace { target } | Dest::Direct(target) = &dest
        && same_file(input, target)
    {
        bail!(
            "{}: refusing to overwrite the input; write to a different -o path",
            input.display()
        );
    }
    let data = read_file(input).with_context(|| format!("cannot read {}", input.display()))?;
    let path = input.display().to_string();
    let pace = Pace::from_env();
    let Dest::Replace { target } = &dest else {
        // A device, a FIFO or stdout: written directly, once the output is complete
        // and checked.
        let e = embed_image(&path, &data)?;
        check_output_size(output, "the output", e.out.len() as u64)?;
        let out = e.out.to_vec();
        if let Some(c) = &e.check {
            exec::verify_output(&path, &out, c)?;
        }
        dest.write_direct(output, &out)?;
        return Ok(e.report);
    };
    // Linked images (the path that keeps the input as the output's base).
    let early = matches!(
        crate::elf::e_type(&data),
        Some(t) if t == object::elf::ET_EXEC.0 || t == object::elf::ET_DYN.0
    );
    let pre = early
        .then(|| TempFile::beside(target, TEMP_PREFIX).ok())
        .flatten();
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let (embedded, prefix) = std::thread::scope(|sc| {
        let copier = pre
            .as_ref()
            .map(|tmp| sc.spawn(|| copy_prefix(tmp.file(), &data, pace, &cancel)));
        let embedded = embed_image(&path, &data);
        if embedded.is_err() {
            cancel.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let prefix = copier.map(|h| h.join().expect("the copying thread does not panic"));
        (embedded, prefix)
    });
    let e = embedded?;
    check_output_size(output, "the output", e.out.len() as u64)?;
    let perms = std::fs::metadata(input)
        .with_context(|| format!("cannot read {}", input.display()))?
        .permissions();
    let check = |file: &std::fs::File| -> Result<()> {
        let Some(c) = &e.check else { return Ok(()) };
        // SAFETY: the temporary file was just written by this process and is not
        // renamed into place until this check returns; its random name in the output
        // directory is known to nobody else, so nothing changes it under the map.
        let map = unsafe { memmap2::Mmap::map(file) }
            .with_context(|| format!("{path}: cannot map the output to check it"))?;
        exec::verify_output(&path, &map, c)
    };
    match (pre, prefix) {
        (Some(tmp), Some(copied)) if e.out.base_is(&data) => {
            copied
                .and_then(|()| e.out.write_changes_at(tmp.file(), pace))
                .map_err(write_error(output))?;
            finish(tmp, output, target, perms, check)?;
        }
        _ => replace_with(
            output,
            target,
            perms,
            |f| {
                e.out.write_to(&mut PacedWriter {
                    file: f,
                    at: 0,
                    pace,
                })
            },
            check,
        )?,
    }
    Ok(e.report)
}

/// The prefix of the temporary files `embed` writes beside its output.
pub const TEMP_PREFIX: &str = ".ksites-tmp-";

/// Copies `data` to the start of `file` and syncs it, unless `cancel` is set first
/// (then what is in the file does not matter: it is removed).
fn copy_prefix(
    file: &std::fs::File,
    data: &[u8],
    pace: Option<Pace>,
    cancel: &std::sync::atomic::AtomicBool,
) -> std::io::Result<()> {
    let chunk = if pace.is_some() { Pace::CHUNK } else { 4 << 20 };
    let mut at = 0u64;
    for c in data.chunks(chunk) {
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(());
        }
        write_at(file, c, at, pace)?;
        at += c.len() as u64;
    }
    file.sync_data()
}

/// Writes `bytes` to `path` as `embed` writes its output ([`Dest`]): a regular file
/// through a temporary file in its directory, synced and renamed over it.
pub fn write_atomically(path: &Path, bytes: &[u8], perms: std::fs::Permissions) -> Result<()> {
    let dest = Dest::resolve(path)?;
    let Dest::Replace { target } = &dest else {
        return dest.write_direct(path, bytes);
    };
    let pace = Pace::from_env();
    replace_with(
        path,
        target,
        perms,
        |f| {
            PacedWriter {
                file: f,
                at: 0,
                pace,
            }
            .write_all(bytes)
        },
        |_| Ok(()),
    )
}

/// The test hook of the writes (fault injection for the "killed mid-write" test):
/// `KSITES_TEST_WRITE_DELAY_MS` makes every write go in 64 KiB chunks, each synced and
/// followed by that pause, so a kill can land inside the write.
#[derive(Clone, Copy, Debug)]
struct Pace(std::time::Duration);

impl Pace {
    const CHUNK: usize = 64 * 1024;

    fn from_env() -> Option<Pace> {
        std::env::var("KSITES_TEST_WRITE_DELAY_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(|ms| Pace(std::time::Duration::from_millis(ms)))
    }
}

/// Writes `bytes` at `at` in `file` (paced by the test hook, if set).
fn write_at(
    file: &std::fs::File,
    bytes: &[u8],
    at: u64,
    pace: Option<Pace>,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt as _;
    let Some(Pace(pause)) = pace else {
        return file.write_all_at(bytes, at);
    };
    let mut at = at;
    for c in bytes.chunks(Pace::CHUNK) {
        file.write_all_at(c, at)?;
        file.sync_data()?;
        std::thread::sleep(pause);
        at += c.len() as u64;
    }
    Ok(())
}

/// Sequential writes to a file, through [`write_at`].
struct PacedWriter<'f> {
    file: &'f std::fs::File,
    at: u64,
    pace: Option<Pace>,
}

impl Write for PacedWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        write_at(self.file, buf, self.at, self.pace)?;
        self.at += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Output;

    #[test]
    fn patches_apply_in_order_over_the_base_and_the_tail_follows() {
        let base: Vec<u8> = (0..64).collect();
        let mut out = Output::new(&base[..]);
        let mut want = base.clone();
        let patches: [(usize, &[u8]); 7] = [
            (10, &[0xa0, 0xa1, 0xa2, 0xa3]),
            (12, &[0xb0, 0xb1, 0xb2, 0xb3]), // overlaps the first: it wins where they meet
            (16, &[0xc0]),                   // touches the second
            (0, &[0xd0]),
            (63, &[0xe0]),
            (40, &[]),
            (11, &[0xf0]), // inside an earlier one, applied after it
        ];
        for (at, b) in patches {
            assert_eq!(out.patch(at, b), Some(()));
            want[at..at + b.len()].copy_from_slice(b);
        }
        assert_eq!(out.patch(63, &[1, 2]), None, "past the base");
        assert_eq!(out.patch(usize::MAX, &[1]), None);
        out.append(vec![1, 2, 3]);
        out.append(Vec::new());
        out.append(vec![4]);
        want.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(out.len(), want.len());
        assert_eq!(out.to_vec(), want);
        assert_eq!(
            &base[..],
            &(0..64).collect::<Vec<u8>>()[..],
            "the base is untouched"
        );
    }
}
