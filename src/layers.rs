//! Layer resolution: turns the directories named on the command line into held directory
//! handles, checked the way the kernel overlay checks them at mount time.
//!
//! Owns: the layer stack (upper first, then lowers top-down), the workdir handle, and the
//! mount-time validation messages (which directory, why). Must never: resolve anything below
//! a layer root by path — every later access starts from the handles held here.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::handles::{FdCache, ObjRef};
use crate::options::{MountConfig, RedirectDir, XattrNamespace};
use crate::sys;

/// Whether a layer may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerRole {
    Upper,
    Lower,
}

/// One layer root, held open as an `O_PATH` directory handle.
#[derive(Debug)]
pub struct Layer {
    pub role: LayerRole,
    pub path: PathBuf,
    pub root: OwnedFd,
    /// `st_dev` of the root: the filesystem the layer lives on.
    pub dev: u64,
}

/// The layers of one mount, in lookup order: upper (if any) first, then the lowers top-down.
#[derive(Debug)]
pub struct LayerStack {
    pub layers: Vec<Layer>,
    /// `workdir/work`: where copy-up and whiteout creation stage objects before an atomic
    /// rename into the upper layer.
    pub work: Option<OwnedFd>,
    pub xattr_prefix: &'static str,
    /// The union's own attribute names under that prefix, built once: lookup reads them on
    /// every directory it finds in every layer.
    pub private: PrivateNames,
    /// Whether directory redirects found in layers are followed (all `redirect_dir=`
    /// settings but `nofollow`, as on the kernel overlay).
    pub follow_redirects: bool,
    /// Whether renaming a directory that lower layers take part in writes a redirect
    /// (`redirect_dir=on`) instead of failing with EXDEV.
    pub write_redirects: bool,
    /// Bounds the descriptors held on layer objects (see `handles`).
    pub fds: std::sync::Arc<FdCache>,
}

/// `<prefix>opaque`, `<prefix>redirect`, `<prefix>whiteout` and `<prefix>metacopy`.
#[derive(Debug)]
pub struct PrivateNames {
    pub opaque: std::ffi::CString,
    pub redirect: std::ffi::CString,
    /// Makes an empty regular file an xattr whiteout (kernel 6.7+).
    pub whiteout: std::ffi::CString,
    /// Makes a regular file a metadata-only copy, which lookup refuses (metacopy=off).
    pub metacopy: std::ffi::CString,
}

impl PrivateNames {
    fn new(prefix: &str) -> PrivateNames {
        // The prefixes are fixed ASCII: no NUL can occur.
        let name =
            |attr: &str| std::ffi::CString::new(format!("{prefix}{attr}")).unwrap_or_default();
        PrivateNames {
            opaque: name("opaque"),
            redirect: name("redirect"),
            whiteout: name("whiteout"),
            metacopy: name("metacopy"),
        }
    }
}

/// Index of a layer in [`LayerStack::layers`].
pub type LayerIndex = u16;

impl LayerStack {
    /// Opens and validates every layer directory of `config`.
    pub fn open(config: &MountConfig) -> Result<LayerStack, String> {
        let mut layers = Vec::new();
        if let Some(upper) = &config.upperdir {
            layers.push(open_layer(upper, "upperdir", LayerRole::Upper)?);
        }
        for lower in &config.lowerdirs {
            layers.push(open_layer(lower, "lowerdir", LayerRole::Lower)?);
        }
        if layers.len() > LayerIndex::MAX as usize {
            return Err(format!(
                "lowerdir: too many layers ({}), at most {} are supported",
                layers.len(),
                LayerIndex::MAX
            ));
        }
        let work = match (&config.upperdir, &config.workdir) {
            (Some(upper), Some(work)) => Some(open_workdir(upper, work, layers[0].dev)?),
            _ => None,
        };
        let xattr_prefix = match (config.xattr_namespace, &work) {
            (XattrNamespace::Trusted, Some(work)) if !can_set_trusted(work.as_fd()) => {
                // Unprivileged (a user namespace): trusted.* cannot be written at all, so
                // the union could not record an opaque directory or a redirect. The kernel
                // overlay needs `userxattr` spelled out here; say what we fall back to.
                log::warn!(
                    "cannot set trusted.* xattrs in {} (not privileged): using user.overlay.* \
                     as with -o userxattr",
                    config
                        .workdir
                        .as_deref()
                        .unwrap_or(Path::new("workdir"))
                        .display()
                );
                XattrNamespace::User.prefix()
            }
            (namespace, _) => namespace.prefix(),
        };
        let roots: Vec<BorrowedFd<'_>> = layers.iter().map(|l| l.root.as_fd()).collect();
        let fds = FdCache::new(&roots);
        Ok(LayerStack {
            fds,
            layers,
            work,
            private: PrivateNames::new(xattr_prefix),
            xattr_prefix,
            follow_redirects: config.redirect_dir != RedirectDir::NoFollow,
            write_redirects: config.redirect_dir == RedirectDir::On,
        })
    }

    pub fn has_upper(&self) -> bool {
        self.layers
            .first()
            .is_some_and(|l| l.role == LayerRole::Upper)
    }

    /// Takes an `O_PATH` descriptor on an object of layer `layer` under management.
    pub fn adopt(&self, layer: LayerIndex, fd: OwnedFd) -> ObjRef {
        self.fds.adopt(layer, fd)
    }

    pub fn root(&self, index: LayerIndex) -> BorrowedFd<'_> {
        self.layers[index as usize].root.as_fd()
    }
}

/// Whether this process may write `trusted.*` attributes in the work dir (on a scratch
/// directory it removes again): only with CAP_SYS_ADMIN in the initial user namespace.
fn can_set_trusted(work: BorrowedFd<'_>) -> bool {
    let name = crate::copy_up::temp_name();
    if sys::mkdir_at(work, &name, 0o700).is_err() {
        return true; // cannot tell; keep the default and let real errors surface later
    }
    let allowed = sys::open_path_at(work, &name)
        .and_then(|dir| sys::set_xattr(dir.as_fd(), c"trusted.overlay.ovlfuse-probe", b"", 0))
        .map(|()| true)
        .or_else(|e| match e.raw_os_error() {
            Some(libc::EPERM) => Ok(false),
            _ => Ok::<bool, std::io::Error>(true),
        })
        .unwrap_or(true);
    let _ = sys::remove_tree(work, &name);
    allowed
}

fn describe(err: &std::io::Error) -> String {
    match err.raw_os_error() {
        Some(libc::ENOENT) => "no such directory".to_string(),
        Some(libc::ENOTDIR) => "not a directory".to_string(),
        Some(libc::EACCES) => "permission denied".to_string(),
        _ => err.to_string(),
    }
}

fn open_layer(path: &Path, option: &str, role: LayerRole) -> Result<Layer, String> {
    let root = sys::open_dir_path(path)
        .map_err(|e| format!("{option}: cannot use {}: {}", path.display(), describe(&e)))?;
    let st = sys::stat_fd(root.as_fd())
        .map_err(|e| format!("{option}: cannot stat {}: {}", path.display(), describe(&e)))?;
    // A layer the daemon cannot list would silently look empty; refuse it instead.
    let mode = if role == LayerRole::Upper {
        libc::R_OK | libc::W_OK | libc::X_OK
    } else {
        libc::R_OK | libc::X_OK
    };
    let cpath = sys::proc_fd_path(root.as_fd());
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::access(cpath.as_ptr(), mode) } != 0 {
        let what = if role == LayerRole::Upper {
            "readable and writable"
        } else {
            "readable"
        };
        return Err(format!(
            "{option}: {} is not {what} by this process: {}",
            path.display(),
            describe(&std::io::Error::last_os_error())
        ));
    }
    Ok(Layer {
        role,
        path: path.to_path_buf(),
        root,
        dev: st.st_dev,
    })
}

/// Checks the workdir the way the kernel does (same filesystem as upperdir, neither inside
/// the other), makes sure `workdir/work` exists and returns a handle on it: copy-up stages
/// files there so that a rename into place is atomic, which only works within one filesystem.
fn open_workdir(upper: &Path, work: &Path, upper_dev: u64) -> Result<OwnedFd, String> {
    let layer = open_layer(work, "workdir", LayerRole::Upper)?;
    if layer.dev != upper_dev {
        return Err(format!(
            "workdir: {} and upperdir {} are on different filesystems; they must share one",
            work.display(),
            upper.display()
        ));
    }
    let real_upper = std::fs::canonicalize(upper)
        .map_err(|e| format!("upperdir: cannot resolve {}: {e}", upper.display()))?;
    let real_work = std::fs::canonicalize(work)
        .map_err(|e| format!("workdir: cannot resolve {}: {e}", work.display()))?;
    if real_upper == real_work {
        return Err(format!(
            "workdir: {} is the same directory as upperdir",
            work.display()
        ));
    }
    if real_work.starts_with(&real_upper) {
        return Err(format!(
            "workdir: {} is inside upperdir {}; they must be separate directories",
            work.display(),
            upper.display()
        ));
    }
    if real_upper.starts_with(&real_work) {
        return Err(format!(
            "upperdir: {} is inside workdir {}; they must be separate directories",
            upper.display(),
            work.display()
        ));
    }
    let name = c"work";
    match sys::stat_at(layer.root.as_fd(), name) {
        Ok(Some(st)) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {}
        Ok(Some(_)) => {
            return Err(format!(
                "workdir: {}/work exists and is not a directory",
                work.display()
            ));
        }
        Ok(None) => {
            let dir = sys::reopen(layer.root.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY)
                .map_err(|e| format!("workdir: cannot open {}: {e}", work.display()))?;
            // SAFETY: valid fd and name.
            let ret = unsafe { libc::mkdirat(sys::raw(&dir), name.as_ptr(), 0o700) };
            if ret != 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(format!(
                        "workdir: cannot create {}/work: {e}",
                        work.display()
                    ));
                }
            }
        }
        Err(e) => return Err(format!("workdir: cannot stat {}/work: {e}", work.display())),
    }
    let staging = sys::open_path_at(layer.root.as_fd(), name)
        .map_err(|e| format!("workdir: cannot open {}/work: {e}", work.display()))?;
    match sys::stat_fd(staging.as_fd()) {
        Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => Ok(staging),
        _ => Err(format!(
            "workdir: {}/work is not a directory",
            work.display()
        )),
    }
}

impl LayerStack {
    /// The staging directory, or EROFS for a union without an upper layer.
    pub fn work(&self) -> std::io::Result<BorrowedFd<'_>> {
        self.work
            .as_ref()
            .map(|w| w.as_fd())
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EROFS))
    }
}
