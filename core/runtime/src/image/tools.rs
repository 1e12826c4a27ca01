//! Running the host tools a build needs (mmdebstrap, pip, mkfs.erofs, apt, dpkg-deb, depmod):
//! locating them, logging their output to the build log, turning failures into `ImageError`s,
//! and the progress lines printed on stderr.
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use super::error::{ImageError, Result};

/// The Debian package that provides each tool we run.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "mmdebstrap" => "mmdebstrap",
        "mkfs.erofs" | "fsck.erofs" | "dump.erofs" => "erofs-utils",
        "apt-get" | "apt-cache" => "apt",
        "dpkg-deb" => "dpkg",
        "depmod" => "kmod",
        "xz" => "xz-utils",
        "zstd" => "zstd",
        "gzip" => "gzip",
        "chroot" => "coreutils",
        "python3" => "python3 python3-pip",
        _ => "the package that provides it",
    }
}

/// Finds `tool` on PATH, also looking in the sbin directories a non-root PATH may lack.
pub fn which(tool: &str) -> Result<PathBuf> {
    if tool.contains('/') {
        let p = PathBuf::from(tool);
        return if p.is_file() { Ok(p) } else { Err(missing(tool)) };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|d| d.join(tool))
        .find(|p| is_executable(p))
        .ok_or_else(|| missing(tool))
}

fn missing(tool: &str) -> ImageError {
    ImageError::MissingTool { tool: tool.to_string(), package: package_of(tool).to_string() }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata().map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// A command built from a tool looked up with [`which`].
pub fn command(tool: &str) -> Result<Command> {
    let mut c = Command::new(which(tool)?);
    c.env("LC_ALL", "C.UTF-8");
    Ok(c)
}

/// Text that marks a download failure in apt's, mmdebstrap's or pip's output.
const NETWORK_MARKERS: &[&str] = &[
    "Temporary failure resolving",
    "Could not resolve",
    "Failed to fetch",
    "Network is unreachable",
    "Connection refused",
    "Connection timed out",
    "NewConnectionError",
    "Max retries exceeded",
    "ReadTimeoutError",
    "No matching distribution found",
    "Could not find a version that satisfies",
    "SSLError",
];

/// Runs `cmd` with stdout and stderr appended to `log`; a non-zero exit becomes an error that
/// quotes the end of the log.
pub fn run_logged(cmd: &mut Command, step: &str, log: &Path) -> Result<()> {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(ImageError::io(format!("opening build log {}", log.display())))?;
    let start = f.seek(SeekFrom::End(0)).unwrap_or(0);
    let _ = writeln!(f, "\n$ {:?}", cmd);
    let out = f.try_clone().map_err(ImageError::io("duplicating log handle"))?;
    let err = f.try_clone().map_err(ImageError::io("duplicating log handle"))?;
    let status = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .map_err(|e| spawn_error(cmd, e))?;
    if status.success() {
        return Ok(());
    }
    let text = read_from(log, start);
    let tail: String = {
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    };
    if let Some(marker) = NETWORK_MARKERS.iter().find(|m| text.contains(*m)) {
        let detail = text
            .lines()
            .rev()
            .find(|l| l.contains(marker))
            .unwrap_or(marker)
            .trim()
            .to_string();
        return Err(ImageError::Network { step: step.to_string(), detail, log: log.into() });
    }
    Err(ImageError::StepFailed {
        step: step.to_string(),
        status: status.to_string(),
        log: log.into(),
        tail,
    })
}

/// Runs `cmd` and returns its stdout; stderr is returned inside the error on failure.
pub fn run_capture(cmd: &mut Command, step: &str) -> std::result::Result<String, String> {
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("{step}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{step}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn spawn_error(cmd: &Command, e: std::io::Error) -> ImageError {
    let prog = cmd.get_program().to_string_lossy().into_owned();
    if e.kind() == std::io::ErrorKind::NotFound {
        let tool = Path::new(&prog).file_name().map(|s| s.to_string_lossy().into_owned());
        return missing(&tool.unwrap_or(prog));
    }
    ImageError::Io { context: format!("starting {prog}"), source: e }
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut s = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.seek(SeekFrom::Start(offset));
        let _ = f.read_to_end(&mut s);
    }
    String::from_utf8_lossy(&s).into_owned()
}

/// One progress event, for a frontend that draws bars (the CLI) instead of printing lines.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A line of information.
    Note { text: String },
    /// A named step starts (its length is unknown: a spinner).
    Start { step: String },
    /// A named step ended after `secs`; `ok` false if it failed.
    End { step: String, secs: f64, ok: bool },
    /// A counted task (`pull`, `unpack`) reached `done` of `total` `unit`s (`bytes`, `layers`).
    Advance { task: String, done: u64, total: u64, unit: &'static str },
}

/// Receives every [`Event`] of a build instead of stderr (called on the building thread).
#[derive(Clone)]
pub struct Sink(pub std::sync::Arc<dyn Fn(&Event) + Send + Sync>);

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sink(..)")
    }
}

/// Progress of a build: lines on stderr (`[image default] mmdebstrap bookworm ... 17.2 s`), or
/// [`Event`]s to a [`Sink`] when one is given.
#[derive(Clone)]
pub struct Progress {
    label: String,
    enabled: bool,
    sink: Option<Sink>,
}

impl Progress {
    pub fn new(label: impl Into<String>, enabled: bool) -> Progress {
        Progress { label: label.into(), enabled, sink: None }
    }

    /// Sends events to `sink` (if given) instead of printing them.
    pub fn with_sink(mut self, sink: Option<Sink>) -> Progress {
        self.sink = sink;
        self
    }

    fn emit(&self, e: Event) {
        if !self.enabled {
            return;
        }
        match &self.sink {
            Some(s) => (s.0)(&e),
            None => match e {
                Event::Note { text } => eprintln!("[{}] {text}", self.label),
                Event::Start { step } => eprintln!("[{}] {step} ...", self.label),
                Event::End { step, secs, ok: true } => eprintln!("[{}] {step} ... {secs:.1} s", self.label),
                Event::End { step, secs, ok: false } => {
                    eprintln!("[{}] {step} ... failed after {secs:.1} s", self.label)
                }
                Event::Advance { .. } => {}
            },
        }
    }

    pub fn note(&self, what: &str) {
        self.emit(Event::Note { text: what.to_string() });
    }

    /// Reports that counted task `task` reached `done` of `total` `unit`s.
    pub fn advance(&self, task: &str, done: u64, total: u64, unit: &'static str) {
        self.emit(Event::Advance { task: task.to_string(), done, total, unit });
    }

    /// Runs `f` as one named step, reporting its start and its duration; returns the result and
    /// the elapsed seconds.
    pub fn step<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
        self.emit(Event::Start { step: what.to_string() });
        let t = Instant::now();
        let r = f();
        let secs = t.elapsed().as_secs_f64();
        self.emit(Event::End { step: what.to_string(), secs, ok: r.is_ok() });
        r.map(|v| (v, secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tool_names_the_package() {
        let e = which("mkfs.erofs-definitely-not-here").unwrap_err();
        assert!(matches!(e, ImageError::MissingTool { .. }));
        let e = missing("mkfs.erofs");
        assert!(e.to_string().contains("apt-get install erofs-utils"), "{e}");
    }

    #[test]
    fn failed_step_quotes_the_log() {
        let dir = std::env::temp_dir().join(format!("smk-tools-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        let mut c = Command::new("sh");
        c.args(["-c", "echo boom >&2; exit 3"]);
        let e = run_logged(&mut c, "test step", &log).unwrap_err();
        assert!(e.to_string().contains("boom"), "{e}");
        let mut c = Command::new("sh");
        c.args(["-c", "echo 'E: Failed to fetch http://x' >&2; exit 100"]);
        let e = run_logged(&mut c, "apt", &log).unwrap_err();
        assert!(matches!(e, ImageError::Network { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_sink_gets_every_event_in_order() {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        let p = Progress::new("t", true).with_sink(Some(Sink(std::sync::Arc::new(move |e: &Event| {
            s.lock().unwrap().push(e.clone())
        }))));
        p.note("hello");
        p.advance("pull", 1, 2, "bytes");
        let _ = p.step("mkfs", || Ok(()));
        let _ = p.step("pip", || -> Result<()> { Err(missing("pip")) });
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0], Event::Note { text: "hello".into() });
        assert_eq!(seen[1], Event::Advance { task: "pull".into(), done: 1, total: 2, unit: "bytes" });
        assert_eq!(seen[2], Event::Start { step: "mkfs".into() });
        assert!(matches!(&seen[3], Event::End { step, ok: true, .. } if step == "mkfs"));
        assert!(matches!(&seen[5], Event::End { step, ok: false, .. } if step == "pip"));
        assert_eq!(seen.len(), 6);
        let quiet = Progress::new("t", false).with_sink(Some(Sink(std::sync::Arc::new(|_: &Event| panic!()))));
        quiet.note("not sent");
    }
}
