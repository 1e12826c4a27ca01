//! Accelerator choice: KVM only when the CPU advertises hardware virtualisation (vmx/svm) AND
//! `/dev/kvm` opens read-write; TCG otherwise. `SUPERMACHINE_ACCEL=kvm|tcg` overrides.
//!
//! Why not just "does /dev/kvm open": some hosts expose a paravirtual /dev/kvm (PVM) on which a
//! stock guest kernel dies with "KVM internal error … emulation failure" (DESIGN.md §4).

use std::fs::OpenOptions;

use crate::error::{Error, Result};

/// The environment variable that forces an accelerator.
pub const ACCEL_ENV: &str = "SUPERMACHINE_ACCEL";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// What the host offers, gathered once so the decision itself is pure and testable.
#[derive(Clone, Debug)]
pub struct HostCaps {
    /// The CPU flags include vmx or svm.
    pub hw_virt: bool,
    /// `/dev/kvm` opened read-write; `Err` holds why not.
    pub kvm_dev: std::result::Result<(), String>,
}

impl HostCaps {
    pub fn probe() -> HostCaps {
        let hw_virt = std::fs::read_to_string("/proc/cpuinfo")
            .map(|s| cpu_has_hw_virt(&s))
            .unwrap_or(false);
        let kvm_dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map(|_| ())
            .map_err(|e| e.to_string());
        HostCaps { hw_virt, kvm_dev }
    }
}

/// True when some `flags` line of /proc/cpuinfo lists vmx (Intel VT-x) or svm (AMD-V).
pub fn cpu_has_hw_virt(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|w| w == "vmx" || w == "svm"))
}

/// Decides the accelerator from the override (the env var's value, if set) and host caps.
pub fn choose(override_: Option<&str>, caps: &HostCaps) -> Result<Accel> {
    match override_.map(|s| s.trim().to_ascii_lowercase()).as_deref() {
        None | Some("") | Some("auto") => Ok(if caps.hw_virt && caps.kvm_dev.is_ok() { Accel::Kvm } else { Accel::Tcg }),
        Some("tcg") => Ok(Accel::Tcg),
        Some("kvm") => {
            if !caps.hw_virt {
                return Err(Error::Accelerator(format!(
                    "{ACCEL_ENV}=kvm, but this CPU has no hardware virtualisation (no vmx/svm in /proc/cpuinfo); \
                     unset {ACCEL_ENV} or set it to tcg"
                )));
            }
            if let Err(e) = &caps.kvm_dev {
                return Err(Error::Accelerator(format!(
                    "{ACCEL_ENV}=kvm, but /dev/kvm cannot be opened read-write ({e}); \
                     add your user to the kvm group, or set {ACCEL_ENV}=tcg"
                )));
            }
            Ok(Accel::Kvm)
        }
        Some(other) => Err(Error::Accelerator(format!(
            "{ACCEL_ENV}={other:?} is not understood: use kvm, tcg or auto"
        ))),
    }
}

/// The accelerator for this host, honouring the environment override.
pub fn detect() -> Result<Accel> {
    let env = std::env::var(ACCEL_ENV).ok();
    choose(env.as_deref(), &HostCaps::probe())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(hw: bool, dev: bool) -> HostCaps {
        HostCaps { hw_virt: hw, kvm_dev: if dev { Ok(()) } else { Err("Permission denied".into()) } }
    }

    #[test]
    fn auto_needs_both() {
        assert_eq!(choose(None, &caps(true, true)).unwrap(), Accel::Kvm);
        assert_eq!(choose(None, &caps(false, true)).unwrap(), Accel::Tcg);
        assert_eq!(choose(None, &caps(true, false)).unwrap(), Accel::Tcg);
        assert_eq!(choose(Some("auto"), &caps(false, false)).unwrap(), Accel::Tcg);
    }

    #[test]
    fn overrides() {
        assert_eq!(choose(Some("TCG"), &caps(true, true)).unwrap(), Accel::Tcg);
        assert_eq!(choose(Some("kvm"), &caps(true, true)).unwrap(), Accel::Kvm);
        let e = choose(Some("kvm"), &caps(false, true)).unwrap_err().to_string();
        assert!(e.contains("vmx/svm"), "{e}");
        let e = choose(Some("kvm"), &caps(true, false)).unwrap_err().to_string();
        assert!(e.contains("/dev/kvm"), "{e}");
        assert!(choose(Some("hvf"), &caps(true, true)).is_err());
    }

    #[test]
    fn cpuinfo_flags() {
        assert!(cpu_has_hw_virt("processor: 0\nflags\t\t: fpu vme vmx sse\n"));
        assert!(cpu_has_hw_virt("flags : svm\n"));
        assert!(!cpu_has_hw_virt("flags : fpu vmxx hypervisor\nmodel name: vmx\n"));
    }
}
