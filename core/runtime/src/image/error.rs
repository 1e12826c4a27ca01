//! `ImageError`: every way building or finding a guest image can fail, each with a message that
//! tells the user what to do next.
use std::fmt;
use std::io;
use std::path::PathBuf;

#[derive(Debug)]
pub enum ImageError {
    /// The reference names neither a built-in recipe, a cached image nor a directory.
    UnknownImage { name: String, known: Vec<String> },
    /// A host tool the build needs is not installed.
    MissingTool { tool: String, package: String },
    /// The host cannot provide the Debian guest kernel (not a Debian-family system).
    NotDebian { detail: String },
    /// Building a root filesystem needs root privileges (mmdebstrap, chroot).
    NeedRoot { step: String },
    /// A download failed (Debian mirror or Python package index).
    Network { step: String, detail: String, log: PathBuf },
    /// An external build step exited unsuccessfully.
    StepFailed { step: String, status: String, log: PathBuf, tail: String },
    /// No guest agent binary was found to put into the initramfs.
    AgentNotFound { searched: Vec<PathBuf> },
    /// The guest kernel package lacks a module the guest needs.
    KernelModuleMissing { module: String, kernel: String },
    /// A reference looked like a path but is not a usable root filesystem directory.
    BadRootDir { path: PathBuf, detail: String },
    /// Something in the cache is not what it should be (e.g. an unreadable manifest).
    Corrupt { path: PathBuf, detail: String },
    /// A filesystem operation failed.
    Io { context: String, source: io::Error },
    /// Pulling or unpacking an OCI image failed (see `oci/`).
    Oci(Box<super::oci::OciError>),
    /// The image has no `python3` on its PATH, so no guest REPL and no package layer.
    NoPython { image: String },
    /// pip found no wheel of a package for the guest's Python and platform.
    NoWheel { package: String, guest: String, image: String },
    /// The packages asked for need other versions than the image already has.
    PackageConflict { image: String, detail: String },
    /// The requirements file cannot be read.
    BadRequirements { path: PathBuf, detail: String },
    /// Package layers are only stacked on images built from an OCI source.
    LayersNeedOci { image: String },
    /// Only a built image was asked for (`BuildOptions::cached_only`) and the cache has none
    /// for this request.
    NotBuilt { image: String, detail: String },
}

pub type Result<T> = std::result::Result<T, ImageError>;

impl ImageError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> ImageError {
        let context = context.into();
        move |source| ImageError::Io { context, source }
    }
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageError::UnknownImage { name, known } => write!(
                f,
                "unknown image {name:?}: known images are {}; or pass the path of a root \
                 filesystem directory",
                if known.is_empty() { "(none)".to_string() } else { known.join(", ") }
            ),
            ImageError::MissingTool { tool, package } => write!(
                f,
                "`{tool}` is not installed: install {package} (apt-get install {package})"
            ),
            ImageError::NotDebian { detail } => write!(
                f,
                "cannot fetch the Debian guest kernel: {detail}. Building guest images needs a \
                 Debian-family host with apt (Debian bookworm or later)"
            ),
            ImageError::NeedRoot { step } => write!(
                f,
                "{step} needs root (mmdebstrap --mode=root and chroot): run the build once as \
                 root, e.g. `sudo supermachine-kernel image build`"
            ),
            ImageError::Network { step, detail, log } => write!(
                f,
                "{step} failed to download: {detail}. Check the network connection or the \
                 apt/pip mirror settings and retry (full log: {})",
                log.display()
            ),
            ImageError::StepFailed { step, status, log, tail } => write!(
                f,
                "{step} failed ({status}); full log: {}\n{tail}",
                log.display()
            ),
            ImageError::AgentNotFound { searched } => write!(
                f,
                "the guest agent binary was not found (looked at: {}); build it with `make agent` \
                 or point SUPERMACHINE_AGENT at it",
                searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            ),
            ImageError::KernelModuleMissing { module, kernel } => write!(
                f,
                "kernel {kernel} has no module {module:?} and does not build it in; the guest \
                 cannot boot with this kernel"
            ),
            ImageError::BadRootDir { path, detail } => {
                write!(f, "{} is not a usable root filesystem: {detail}", path.display())
            }
            ImageError::Corrupt { path, detail } => write!(
                f,
                "{} is damaged ({detail}); remove it (`supermachine-kernel image rm NAME`) and \
                 rebuild",
                path.display()
            ),
            ImageError::Io { context, source } => write!(f, "{context}: {source}"),
            ImageError::Oci(e) => e.fmt(f),
            ImageError::NoPython { image } => write!(
                f,
                "image {image} has no python3 on its PATH, and the guest REPL and package layers \
                 need one: use an image with Python, e.g. `python:3.12-slim`, or a Debian one \
                 with python3 installed (`debian:bookworm` + `apt-get install python3`); pass \
                 kernel_layer=False to boot it for vm.exec only"
            ),
            ImageError::NoWheel { package, guest, image } => write!(
                f,
                "package {package} has no wheel for the guest's {guest} (image {image}); the \
                 guest cannot build from source: pick a version that publishes a wheel for it, \
                 or an image with another Python"
            ),
            ImageError::PackageConflict { image, detail } => write!(
                f,
                "the packages asked for need other versions than image {image} already has (its \
                 versions are kept): {detail}. Ask for the image's version, or leave the pin out"
            ),
            ImageError::BadRequirements { path, detail } => {
                write!(f, "cannot read requirements file {}: {detail}", path.display())
            }
            ImageError::LayersNeedOci { image } => write!(
                f,
                "packages= and requirements= are stacked on OCI images only, and {image} is not \
                 one: build from one (e.g. Image.build(ref=\"python:3.12-slim\", packages=...)) \
                 or add the packages to the root directory yourself"
            ),
            ImageError::NotBuilt { image, detail } => write!(
                f,
                "image {image} is not built yet ({detail}); nothing was pulled or built"
            ),
        }
    }
}

impl std::error::Error for ImageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ImageError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
