//! QEMU: finding the binary, building the command line (pure, unit-tested) and launching the
//! process so that it can never outlive its owner.
//!
//! Command line (DESIGN.md §4): `-M microvm,acpi=on` (the guest kernel finds its virtio-mmio
//! devices only through ACPI), one virtio-serial port named "agent" on a server-mode unix
//! socket, the root image as a read-only virtio-blk disk, QMP on a second socket, guest RAM in
//! a file-backed memory object (so a stopped VM's RAM file can serve as a snapshot template),
//! no network device, no host share, `-sandbox on`, `-no-reboot` (a guest panic or reboot ends
//! the process, which the host sees as "VM died"). The serial console goes to QEMU's stdout
//! (`-serial stdio`) and, like its stderr, into a capped tail in the owner process
//! ([`crate::console`]), never into a file the guest could grow.
//!
//! Lifetime: every QEMU is spawned by one long-lived launcher thread with
//! `PR_SET_PDEATHSIG=SIGKILL`. The death signal fires when the *thread* that forked the child
//! exits, so spawning from a short-lived caller thread (e.g. a Python thread) would kill the VM
//! when that thread ends; the launcher thread lives as long as the process, so QEMU dies exactly
//! when its owner process dies — SIGKILL included. QEMU also gets its own process group, so a
//! Ctrl-C or a Jupyter interrupt aimed at the owner's group does not reach it.

use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

use crate::accel::Accel;
use crate::error::{Error, Result};

/// The environment variable naming the QEMU binary to use.
pub const QEMU_ENV: &str = "SUPERMACHINE_QEMU";
const QEMU_NAME: &str = "qemu-system-x86_64";

/// The TCG guest CPU: QEMU's `max` without ERMS ("enhanced rep movsb"). With ERMS the guest
/// kernel copies user memory, clears pages and moves memory with `rep movsb`, and glibc uses it
/// for large copies; TCG emulates that one byte per loop iteration. Without it they use
/// `rep movsq` or vector loops, 8-32 bytes per iteration (measured in the guest: a page-sized
/// read of /dev/zero 3.9 -> 0.8 ms/MB, a pipe 10 -> 4 ms/MB, process output through the agent
/// 2-2.5x faster). ERMS is a speed hint only: the instruction works either way.
const TCG_CPU: &str = "max,-erms";
const INSTALL_HINT: &str = "install qemu-system-x86 (apt-get install qemu-system-x86)";

/// Locates qemu-system-x86_64: `$SUPERMACHINE_QEMU`, else `$PATH`, else the usual places.
pub fn find_qemu() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(QEMU_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        if is_executable(&p) {
            return Ok(p);
        }
        return Err(Error::QemuNotFound(format!(
            "QEMU not found: {QEMU_ENV}={} is not an executable file; fix or unset it, or {INSTALL_HINT}",
            p.display()
        )));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path)
        .chain(["/usr/bin", "/usr/local/bin", "/bin"].iter().map(PathBuf::from));
    for dir in dirs {
        let candidate = dir.join(QEMU_NAME);
        if is_executable(&candidate) {
            return Ok(candidate);
        }
    }
    Err(Error::QemuNotFound(format!("QEMU not found: {INSTALL_HINT}")))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0).unwrap_or(false)
}

/// The host TSC frequency in kHz, passed to the guest as `tsc_early_khz` (without it, one
/// microvm boot in six hung at "Unable to calibrate against PIT").
pub fn host_tsc_khz() -> Option<u64> {
    if let Ok(s) = std::fs::read_to_string("/sys/devices/system/cpu/cpu0/tsc_freq_khz") {
        if let Ok(v) = s.trim().parse::<u64>() {
            return Some(v);
        }
    }
    tsc_khz_from_cpuinfo(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

/// `cpu MHz` of the first CPU, in kHz. On hosts with constant_tsc this is the TSC rate the
/// kernel detected.
pub fn tsc_khz_from_cpuinfo(cpuinfo: &str) -> Option<u64> {
    let line = cpuinfo.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    if mhz > 0.0 {
        Some((mhz * 1000.0).round() as u64)
    } else {
        None
    }
}

/// How guest RAM is backed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RamFile {
    pub path: PathBuf,
    /// `share=on` (writes go to the file: cold boot, template baking) or `share=off` (a private
    /// copy-on-write mapping of an existing file: restore from a snapshot).
    pub share: bool,
}

/// Where an incoming migration (snapshot restore) comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// `-incoming defer`; the state is fed over QMP (QEMU 7.2 cannot set the x-ignore-shared
    /// capability on the command line, so `-incoming exec:…` is not an option).
    Defer,
}

/// Everything that determines a QEMU command line.
#[derive(Clone, Debug)]
pub struct QemuConfig {
    pub qemu: PathBuf,
    pub accel: Accel,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub kernel: PathBuf,
    /// None when the kernel needs no initramfs.
    pub initrd: Option<PathBuf>,
    pub rootfs: PathBuf,
    /// Extra kernel command-line words after the fixed ones.
    pub append_extra: Vec<String>,
    pub tsc_khz: Option<u64>,
    pub ram: RamFile,
    /// The agent port's unix socket (QEMU listens).
    pub agent_sock: PathBuf,
    /// The QMP unix socket (QEMU listens).
    pub qmp_sock: PathBuf,
    pub incoming: Option<Incoming>,
    /// TCG translation-buffer size in MiB (`-accel tcg,tb-size=N`); None = QEMU's default.
    pub tcg_tb_size_mib: Option<u32>,
}

/// TCG translation-buffer size (MiB): `SUPERMACHINE_TCG_TB_MIB` (0 = QEMU's default of 1 GiB),
/// else [`DEFAULT_TB_SIZE_MIB`]. Measured (TCG, `import numpy` in a clone): tb 4 MiB 41–74 s,
/// 16 MiB 7–11 s, 64 MiB 1.7–3.1 s, QEMU's default 2.5–3.7 s: below the working set it
/// thrashes, 64 MiB costs nothing and caps how much translated code a busy VM keeps.
pub fn default_tb_size_mib() -> Option<u32> {
    match std::env::var("SUPERMACHINE_TCG_TB_MIB").ok().and_then(|v| v.trim().parse::<u32>().ok()) {
        Some(0) => None,
        Some(n) => Some(n),
        None => Some(DEFAULT_TB_SIZE_MIB),
    }
}

/// Default TCG translation buffer (MiB), see [`default_tb_size_mib`].
pub const DEFAULT_TB_SIZE_MIB: u32 = 64;

impl QemuConfig {
    /// The kernel command line.
    pub fn kernel_cmdline(&self) -> String {
        // panic=-1 + reboot=t: a guest panic reboots at once by triple fault, which -no-reboot
        // turns into QEMU exiting (the default reboot methods hang on microvm).
        let mut words = vec!["console=ttyS0".to_string(), "quiet".into(), "panic=-1".into(), "reboot=t".into()];
        if let Some(khz) = self.tsc_khz {
            words.push(format!("tsc_early_khz={khz}"));
        }
        if self.accel == Accel::Tcg {
            // TCG keys translated code by guest virtual address, so with randomized mappings
            // every new process (ld.so, libc, python3) is translated afresh: fork+exec of
            // /bin/true from a shell took 29 ms with them, 7 ms without. The VM is the isolation
            // boundary; inside it, user code already runs with full rights.
            words.push("norandmaps".into());
        }
        words.extend(self.append_extra.iter().cloned());
        words.join(" ")
    }

    /// The full argument list (without the binary).
    pub fn args(&self) -> Vec<String> {
        let p = |p: &Path| p.display().to_string();
        let accel = match (self.accel, self.tcg_tb_size_mib) {
            (Accel::Tcg, Some(mib)) => format!("tcg,tb-size={mib}"),
            (a, _) => a.name().to_string(),
        };
        let cpu = match self.accel {
            Accel::Kvm => "host",
            Accel::Tcg => TCG_CPU,
        };
        let mut a: Vec<String> = Vec::new();
        let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
        push(&["-M", "microvm,acpi=on,x-option-roms=off,pcie=off,memory-backend=mem"]);
        push(&["-accel", &accel, "-cpu", cpu]);
        push(&["-m", &format!("{}M", self.memory_mib), "-smp", &self.vcpus.to_string()]);
        push(&["-nodefaults", "-no-user-config", "-display", "none", "-sandbox", "on", "-no-reboot"]);
        push(&[
            "-object",
            &format!(
                "memory-backend-file,id=mem,size={}M,mem-path={},share={}",
                self.memory_mib,
                qemu_opt_escape(&p(&self.ram.path)),
                if self.ram.share { "on" } else { "off" }
            ),
        ]);
        // A restoring QEMU gets no kernel: guest memory already holds the booted one, and QEMU
        // would keep a private ~17 MiB copy of vmlinuz + initrd (for fw_cfg) in every clone.
        if self.incoming.is_none() {
            push(&["-kernel", &p(&self.kernel)]);
            if let Some(initrd) = &self.initrd {
                push(&["-initrd", &p(initrd)]);
            }
            push(&["-append", &self.kernel_cmdline()]);
        }
        // QEMU's stdout: a pipe the owner reads into a capped tail (console.rs).
        push(&["-serial", SERIAL]);
        push(&["-device", "virtio-serial-device"]);
        push(&[
            "-chardev",
            &format!("socket,id=agent,path={},server=on,wait=off", qemu_opt_escape(&p(&self.agent_sock))),
        ]);
        push(&["-device", "virtserialport,chardev=agent,name=agent"]);
        push(&[
            "-drive",
            &format!("id=root,file={},format=raw,if=none,readonly=on", qemu_opt_escape(&p(&self.rootfs))),
        ]);
        push(&["-device", "virtio-blk-device,drive=root"]);
        push(&["-qmp", &format!("unix:{},server=on,wait=off", p(&self.qmp_sock))]);
        if let Some(Incoming::Defer) = self.incoming {
            push(&["-incoming", "defer"]);
        }
        a
    }

    /// The parts of the command line that must be identical between a snapshot and its
    /// restore (everything except per-VM paths and the incoming/share flags), as one string.
    pub fn fingerprint_material(&self) -> String {
        format!(
            "accel={} mem={} smp={} cmdline={:?} tb={:?}",
            self.accel.name(),
            self.memory_mib,
            self.vcpus,
            self.kernel_cmdline(),
            self.tcg_tb_size_mib
        )
    }
}

/// The serial console's backend on the command line.
pub const SERIAL: &str = "stdio";

/// QEMU option values separate with commas; a literal comma is written twice.
fn qemu_opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

struct LaunchRequest {
    cmd: Command,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// The launcher thread's mailbox. The thread (and the Sender kept here) lives until the
/// process ends, which is what makes PR_SET_PDEATHSIG mean "when the owner process dies".
fn launcher() -> &'static Mutex<mpsc::Sender<LaunchRequest>> {
    static LAUNCHER: OnceLock<Mutex<mpsc::Sender<LaunchRequest>>> = OnceLock::new();
    LAUNCHER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<LaunchRequest>();
        std::thread::Builder::new()
            .name("supermachine-launcher".into())
            .spawn(move || {
                for mut req in rx {
                    let _ = req.reply.send(req.cmd.spawn());
                }
            })
            .expect("spawn the QEMU launcher thread");
        Mutex::new(tx)
    })
}

/// Spawns `cmd` from the launcher thread, in its own process group, with SIGKILL as its
/// parent-death signal.
pub fn spawn_owned(mut cmd: Command) -> io::Result<Child> {
    // SAFETY: getpid is async-signal-safe and has no preconditions.
    let owner = unsafe { libc::getpid() };
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (setpgid, prctl, getppid, _exit); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            libc::setpgid(0, 0);
            // No transparent huge pages for QEMU: THP rounds its sparse anonymous allocations
            // (translated code, arenas) up to 2 MiB, ~3 MiB per idle VM (bench/memory.py).
            // Best effort: old kernels lack the option.
            libc::prctl(41 /* PR_SET_THP_DISABLE */, 1 as libc::c_ulong, 0, 0, 0);
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The owner may have died between fork and prctl: then nobody would kill us.
            if libc::getppid() != owner {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let (tx, rx) = mpsc::channel();
    launcher()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(LaunchRequest { cmd, reply: tx })
        .map_err(|_| io::Error::other("QEMU launcher thread is gone"))?;
    rx.recv().map_err(|_| io::Error::other("QEMU launcher thread is gone"))?
}

/// Names the preload (`core/ro-ram/ro_ram.c`) that lets QEMU open a read-only snapshot memory file.
pub const RO_RAM_SHIM_ENV: &str = "SUPERMACHINE_RO_RAM_SHIM";
/// Tells the preload which file to open read-only.
const RO_RAM_ENV: &str = "SUPERMACHINE_RO_RAM";

/// The preload that has QEMU 7.2 open a restore's memory file read-only (it opens it O_RDWR
/// even for the private mapping a restore uses), so no restore holds a snapshot file open for
/// writing. Required when this user may not write the file (a host-wide snapshot, or any
/// stored snapshot, which is read-only, of a user other than root); used whenever it is
/// installed; without it a writable file is opened read-write (and never written: the mapping
/// is private). None for a shared mapping or a cold boot.
fn read_only_ram_shim(config: &QemuConfig) -> Result<Option<PathBuf>> {
    use std::os::unix::ffi::OsStrExt;
    if config.ram.share || config.incoming.is_none() {
        return Ok(None);
    }
    let Ok(path) = std::ffi::CString::new(config.ram.path.as_os_str().as_bytes()) else {
        return Ok(None);
    };
    // SAFETY: access(2) on a NUL-terminated path we own; it only reads the string.
    let writable = unsafe { libc::access(path.as_ptr(), libc::W_OK) } == 0;
    let shim = std::env::var_os(RO_RAM_SHIM_ENV).filter(|v| !v.is_empty()).map(PathBuf::from);
    match shim.or_else(shim_beside_this_library) {
        Some(shim) if shim.is_file() => Ok(Some(shim)),
        _ if writable => Ok(None),
        shim => Err(Error::Snapshot(format!(
            "the snapshot memory file {} is read-only for this user (a host-wide snapshot), and \
             QEMU needs the ro_ram preload to restore it: {} (set {RO_RAM_SHIM_ENV}; `make setup` \
             builds it into the supermachine_kernel package)",
            config.ram.path.display(),
            match shim {
                Some(p) => format!("{} does not exist", p.display()),
                None => "it is not set".to_string(),
            }
        ))),
    }
}

/// `ro_ram.so` in the directory of the shared library this code is linked into (the Python
/// package's `_core` module), where the package's build puts it.
fn shim_beside_this_library() -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let mut info: libc::Dl_info = unsafe { std::mem::zeroed() };
    // SAFETY: dladdr only reads the address (a function of this library) and fills `info`,
    // whose dli_fname then points to a NUL-terminated string owned by the dynamic loader.
    if unsafe { libc::dladdr(shim_beside_this_library as *const libc::c_void, &mut info) } == 0
        || info.dli_fname.is_null()
    {
        return None;
    }
    // SAFETY: checked non-null above; the loader keeps the string alive while the library is.
    let lib = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) };
    Some(Path::new(std::ffi::OsStr::from_bytes(lib.to_bytes())).parent()?.join("ro_ram.so"))
}

/// Starts QEMU with `config`. Its stdout (the guest's serial console) and stderr are pipes,
/// for the caller to drain (see [`crate::console`]).
pub fn launch(config: &QemuConfig) -> Result<Child> {
    let mut cmd = Command::new(&config.qemu);
    cmd.args(config.args()).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    if let Some(shim) = read_only_ram_shim(config)? {
        cmd.env("LD_PRELOAD", shim).env(RO_RAM_ENV, &config.ram.path);
    }
    spawn_owned(cmd).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Error::QemuNotFound(format!(
            "QEMU not found: {} could not be executed; {INSTALL_HINT}",
            config.qemu.display()
        )),
        _ => Error::io(format!("start {}", config.qemu.display()), e),
    })
}

/// `qemu-system-x86_64 --version`'s first line: asked once per binary and process, and kept on
/// disk between processes (`version_on_disk`), since running it takes ~25 ms on the path of every
/// kernel process's first restore.
pub fn qemu_version(qemu: &Path) -> Result<String> {
    static CACHE: OnceLock<Mutex<Vec<(PathBuf, String)>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(Vec::new()));
    if let Some((_, v)) = cache.lock().unwrap().iter().find(|(p, _)| p == qemu) {
        return Ok(v.clone());
    }
    let v = version_on_disk(qemu, &crate::image::cache_root(None).join("qemu-versions"))?;
    cache.lock().unwrap().push((qemu.to_path_buf(), v.clone()));
    Ok(v)
}

/// The version of `qemu` from `dir`, where it is filed under the binary's identity (device,
/// inode, size, modification and change times: an upgraded or replaced binary has another);
/// asked from the binary and filed when not there. Filing is best effort.
pub fn version_on_disk(qemu: &Path, dir: &Path) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let identity = std::fs::metadata(qemu).ok().map(|m| {
        format!("{:x}-{:x}-{:x}-{:x}.{:x}-{:x}.{:x}", m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec(),
                m.ctime(), m.ctime_nsec())
    });
    let filed = identity.as_ref().map(|id| dir.join(id));
    if let Some(v) = filed.as_ref().and_then(|f| std::fs::read_to_string(f).ok()) {
        let v = v.trim();
        if !v.is_empty() && !v.contains('\n') {
            return Ok(v.to_string());
        }
    }
    let out = Command::new(qemu)
        .arg("--version")
        .output()
        .map_err(|e| Error::io(format!("run {} --version", qemu.display()), e))?;
    let v = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").trim().to_string();
    if let (Some(f), true, true) = (filed, out.status.success(), !v.is_empty()) {
        let tmp = dir.join(format!(".tmp-{}", std::process::id()));
        let _ = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&tmp, &v))
            .and_then(|_| std::fs::rename(&tmp, &f));
        let _ = std::fs::remove_file(&tmp);
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_asked_once_per_binary_and_kept_on_disk() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("smk-qemu-version-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bin = dir.join("fake-qemu");
        let calls = dir.join("calls");
        let script = |version: &str| {
            format!("#!/bin/sh\necho x >> {}\necho '{version}'\necho 'Copyright'\n", calls.display())
        };
        std::fs::write(&bin, script("QEMU emulator version 7.2.0")).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let filed = dir.join("versions");
        let count = || std::fs::read_to_string(&calls).map(|s| s.lines().count()).unwrap_or(0);
        assert_eq!(version_on_disk(&bin, &filed).unwrap(), "QEMU emulator version 7.2.0");
        assert_eq!(version_on_disk(&bin, &filed).unwrap(), "QEMU emulator version 7.2.0");
        assert_eq!(count(), 1, "the second answer comes from disk");
        // An upgrade replaces the binary (another inode): asked again.
        let new = dir.join("fake-qemu.new");
        std::fs::write(&new, script("QEMU emulator version 10.0.2")).unwrap();
        std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&new, &bin).unwrap();
        assert_eq!(version_on_disk(&bin, &filed).unwrap(), "QEMU emulator version 10.0.2");
        assert_eq!(count(), 2);
        // A binary that cannot run is an error, and nothing is filed for it.
        let missing = dir.join("no-such-qemu");
        assert!(version_on_disk(&missing, &filed).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn config() -> QemuConfig {
        QemuConfig {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            accel: Accel::Tcg,
            memory_mib: 256,
            vcpus: 1,
            kernel: "/img/vmlinuz".into(),
            initrd: Some("/img/initrd.img".into()),
            rootfs: "/img/root,1.erofs".into(),
            append_extra: vec![],
            tsc_khz: Some(2445404),
            ram: RamFile { path: "/w/ram".into(), share: true },
            agent_sock: "/w/agent.sock".into(),
            qmp_sock: "/w/qmp.sock".into(),
            incoming: None,
            tcg_tb_size_mib: None,
        }
    }

    fn value_after<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2).filter(|w| w[0] == flag).map(|w| w[1].as_str()).collect()
    }

    #[test]
    fn command_line_shape() {
        let a = config().args();
        assert_eq!(value_after(&a, "-M"), ["microvm,acpi=on,x-option-roms=off,pcie=off,memory-backend=mem"]);
        assert_eq!(value_after(&a, "-accel"), ["tcg"]);
        assert_eq!(value_after(&a, "-cpu"), ["max,-erms"]);
        assert_eq!(value_after(&a, "-m"), ["256M"]);
        assert_eq!(value_after(&a, "-sandbox"), ["on"]);
        assert!(a.contains(&"-nodefaults".to_string()) && a.contains(&"-no-reboot".to_string()));
        assert_eq!(
            value_after(&a, "-object"),
            ["memory-backend-file,id=mem,size=256M,mem-path=/w/ram,share=on"]
        );
        assert_eq!(value_after(&a, "-append"), ["console=ttyS0 quiet panic=-1 reboot=t tsc_early_khz=2445404 norandmaps"]);
        assert_eq!(value_after(&a, "-serial"), ["stdio"]);
        assert_eq!(value_after(&a, "-chardev"), ["socket,id=agent,path=/w/agent.sock,server=on,wait=off"]);
        // commas in paths are doubled so QEMU does not split the option there
        assert_eq!(value_after(&a, "-drive"), ["id=root,file=/img/root,,1.erofs,format=raw,if=none,readonly=on"]);
        assert_eq!(value_after(&a, "-qmp"), ["unix:/w/qmp.sock,server=on,wait=off"]);
        assert!(value_after(&a, "-incoming").is_empty());
        // no network, no host share
        let joined = a.join(" ");
        for banned in ["-netdev", "-nic", "virtio-net", "virtfs", "9p", "vhost-user-fs"] {
            assert!(!joined.contains(banned), "{banned} in {joined}");
        }
    }

    #[test]
    fn kvm_and_restore_variants() {
        let mut c = config();
        c.accel = Accel::Kvm;
        c.ram.share = false;
        c.incoming = Some(Incoming::Defer);
        c.tcg_tb_size_mib = Some(32);
        let a = c.args();
        assert_eq!(value_after(&a, "-accel"), ["kvm"]);
        assert_eq!(value_after(&a, "-cpu"), ["host"]);
        assert!(value_after(&a, "-object")[0].ends_with("share=off"));
        assert_eq!(value_after(&a, "-incoming"), ["defer"]);
        assert!(value_after(&a, "-kernel").is_empty() && value_after(&a, "-initrd").is_empty());
        assert!(!c.kernel_cmdline().contains("norandmaps"), "KVM guests keep ASLR");
        c.accel = Accel::Tcg;
        assert_eq!(value_after(&c.args(), "-accel"), ["tcg,tb-size=32"]);
    }

    #[test]
    fn fingerprint_ignores_paths() {
        let a = config();
        let mut b = config();
        b.ram.path = "/other/ram".into();
        b.agent_sock = "/other/agent.sock".into();
        b.incoming = Some(Incoming::Defer);
        assert_eq!(a.fingerprint_material(), b.fingerprint_material());
        b.vcpus = 2;
        assert_ne!(a.fingerprint_material(), b.fingerprint_material());
    }

    #[test]
    fn tsc_from_cpuinfo() {
        assert_eq!(tsc_khz_from_cpuinfo("processor: 0\ncpu MHz\t\t: 2445.404\n"), Some(2445404));
        assert_eq!(tsc_khz_from_cpuinfo("nothing"), None);
    }

    #[test]
    fn read_only_memory_file_needs_the_preload() {
        // Only this test touches the variable in this test binary.
        let dir = std::env::temp_dir().join(format!("smk-ro-ram-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let writable = dir.join("memory");
        std::fs::write(&writable, b"").unwrap();
        let mut c = config();
        c.incoming = Some(Incoming::Defer);
        c.ram = RamFile { path: writable, share: false };
        assert_eq!(read_only_ram_shim(&c).unwrap(), None);
        // A memory file this process may only read (even as root): the preload, or an error
        // that says what is missing.
        c.ram.path = "/proc/sys/kernel/ostype".into();
        std::env::set_var(RO_RAM_SHIM_ENV, dir.join("missing.so"));
        let e = read_only_ram_shim(&c).unwrap_err().to_string();
        assert!(e.contains("read-only for this user") && e.contains("missing.so"), "{e}");
        let shim = dir.join("ro_ram.so");
        std::fs::write(&shim, b"").unwrap();
        std::env::set_var(RO_RAM_SHIM_ENV, &shim);
        assert_eq!(read_only_ram_shim(&c).unwrap(), Some(shim.clone()));
        // Installed, it is used for a writable file too: QEMU never opens one read-write.
        c.ram.path = dir.join("memory");
        assert_eq!(read_only_ram_shim(&c).unwrap(), Some(shim));
        // A shared mapping (a bake) or a cold boot never needs it.
        c.ram.share = true;
        assert_eq!(read_only_ram_shim(&c).unwrap(), None);
        c.ram.share = false;
        c.incoming = None;
        assert_eq!(read_only_ram_shim(&c).unwrap(), None);
        std::env::remove_var(RO_RAM_SHIM_ENV);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_qemu_env_is_clear() {
        // Only this test touches the variable in this test binary.
        std::env::set_var(QEMU_ENV, "/nonexistent/qemu");
        let e = find_qemu().unwrap_err().to_string();
        std::env::remove_var(QEMU_ENV);
        assert!(e.starts_with("QEMU not found"), "{e}");
        assert!(e.contains("apt-get install qemu-system-x86"), "{e}");
    }

    #[test]
    fn owned_child_runs_in_own_group() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "ps -o pgid= -p $$ | tr -d ' '; echo $$"]).stdout(Stdio::piped());
        let child = spawn_owned(cmd).unwrap();
        let out = child.wait_with_output().unwrap();
        let s = String::from_utf8_lossy(&out.stdout);
        let mut lines = s.lines();
        let (pgid, pid) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
        assert_eq!(pgid, pid, "{s}");
    }
}
