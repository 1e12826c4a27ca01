//! What a snapshot is compatible with: the [`MachineIdentity`] of a QEMU configuration (memory,
//! vCPUs, accelerator, QEMU version, a fingerprint of the command line, identities of the guest
//! files). Taking a snapshot records it; restoring refuses a snapshot whose identity differs
//! from the restoring VM's ([`super::format::check_identity`]).
//!
//! Invariants: per-VM paths (RAM file, sockets, the QEMU binary's path), the serial console's
//! host-side backend and the TCG translation-buffer size never enter the fingerprint, so two
//! VMs of one shape compare equal; anything that shapes the guest does. Image files are
//! identified by cache directory, name, size and mtime (cheap; changes whenever a file is
//! rebuilt), not by content.
//!
//! Errors: the crate's [`Error`](crate::Error) (only asking QEMU for its version can fail).

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::Result;
use crate::qemu::{self, QemuConfig, RamFile};
use crate::snapshot::format as fmt;
use crate::snapshot::MachineIdentity;

/// Identity of an image file: its cache directory (named by the recipe/content hash), name,
/// size and modification time — cheap, and it changes whenever the file is rebuilt.
pub fn file_identity(p: &Path) -> String {
    let dir = p.parent().and_then(|d| d.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match fs::metadata(p) {
        Ok(m) => format!("{dir}/{name} size={} mtime={}.{:09}", m.len(), m.mtime(), m.mtime_nsec()),
        Err(_) => format!("{dir}/{name} (missing)"),
    }
}

/// The command line with every per-VM path replaced, so two VMs of one shape compare equal.
pub fn normalised_args(config: &QemuConfig) -> Vec<String> {
    let mut c = config.clone();
    c.ram = RamFile { path: "RAM".into(), share: true };
    c.agent_sock = "AGENT".into();
    c.qmp_sock = "QMP".into();
    c.incoming = None;
    c.qemu = "QEMU".into();
    // The translation-buffer size only shapes QEMU's own memory, not the guest.
    c.tcg_tb_size_mib = None;
    let mut args = c.args();
    // Where the serial console goes on the host does not shape the guest (it sees the same
    // UART). Snapshots taken while it went to a per-VM file recorded `file:CONSOLE`; keeping
    // that spelling keeps them restorable.
    if let Some(i) = args.iter().position(|a| a == "-serial") {
        if let Some(v) = args.get_mut(i + 1) {
            *v = "file:CONSOLE".into();
        }
    }
    args
}

/// What a VM of this configuration is, for snapshot compatibility checks.
pub fn machine_identity(config: &QemuConfig) -> Result<MachineIdentity> {
    let args = normalised_args(config);
    Ok(MachineIdentity {
        memory_mib: config.memory_mib,
        vcpus: config.vcpus,
        accel: config.accel.name().into(),
        qemu_version: qemu::qemu_version(&config.qemu)?,
        cmdline_fingerprint: fmt::fingerprint(&args),
        cmdline: args,
        kernel_hash: file_identity(&config.kernel),
        initrd_hash: config.initrd.as_deref().map(file_identity).unwrap_or_else(|| "none".into()),
        rootfs_hash: file_identity(&config.rootfs),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accel::Accel;
    use crate::qemu::Incoming;

    #[test]
    fn normalised_args_ignore_per_vm_paths() {
        let base = |w: &str| QemuConfig {
            qemu: format!("/{w}/qemu").into(),
            accel: Accel::Tcg,
            memory_mib: 256,
            vcpus: 1,
            kernel: "/img/k".into(),
            initrd: Some("/img/i".into()),
            rootfs: "/img/r".into(),
            append_extra: vec![],
            tsc_khz: Some(1),
            ram: RamFile { path: format!("/{w}/ram").into(), share: w == "a" },
            agent_sock: format!("/{w}/s").into(),
            qmp_sock: format!("/{w}/q").into(),
            incoming: if w == "a" { None } else { Some(Incoming::Defer) },
            tcg_tb_size_mib: None,
        };
        assert_eq!(normalised_args(&base("a")), normalised_args(&base("b")));
        // the console backend keeps the spelling snapshots were taken with
        let a = normalised_args(&base("a"));
        assert_eq!(a.windows(2).find(|w| w[0] == "-serial").map(|w| w[1].as_str()), Some("file:CONSOLE"));
        let mut c = base("b");
        c.memory_mib = 512;
        assert_ne!(normalised_args(&base("a")), normalised_args(&c));
    }
}
