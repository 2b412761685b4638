//! Filesystems and mounts: blank-device detection, `mkfs.ext4` / `mkfs.xfs`, mount, bind mount,
//! unmount, the mount table (`/proc/self/mountinfo`), `statvfs` and online growth
//! (`resize2fs` / `xfs_growfs`). Plain system tools, so what runs is what an operator would type.

use super::error::{Error, Result, failed, io_err, output, run};
use std::io::Read;
use std::path::{Path, PathBuf};

/// The filesystems the node creates and grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    /// ext4 (the default).
    Ext4,
    /// XFS.
    Xfs,
}

impl FsType {
    /// Parses a CSI `fs_type` ("" means the default, ext4).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "" | "ext4" => Ok(Self::Ext4),
            "xfs" => Ok(Self::Xfs),
            other => Err(Error::UnsupportedFs(other.to_string())),
        }
    }

    /// The name `mount -t` and `blkid` use.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ext4 => "ext4",
            Self::Xfs => "xfs",
        }
    }
}

/// What a block device holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contents {
    /// Nothing: no signature and the first [`BLANK_PROBE_BYTES`] are zeros.
    Blank,
    /// A filesystem `blkid` recognises (its TYPE).
    Filesystem(String),
    /// Something else: a partition table, another signature, or non-zero data.
    Other(String),
}

/// How much of the device start must be zeros for it to count as blank.
pub const BLANK_PROBE_BYTES: usize = 1 << 20;

/// Probes `dev`: `blkid -p` for signatures, then the first bytes for data. A device is
/// formatted only when this says [`Contents::Blank`].
pub fn probe(dev: &Path) -> Result<Contents> {
    let args = ["-p", "-o", "export"];
    let out = output(
        "blkid",
        &[args[0], args[1], args[2], &dev.to_string_lossy()],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::to_string)
    };
    match out.status.code() {
        Some(0) => {
            return Ok(match (field("TYPE"), field("PTTYPE")) {
                (_, Some(pt)) => Contents::Other(format!("partition table {pt}")),
                (Some(t), _) if field("USAGE").as_deref() == Some("filesystem") => {
                    Contents::Filesystem(t)
                }
                (Some(t), _) => Contents::Other(t),
                (None, None) => Contents::Other(text.trim().replace('\n', " ")),
            });
        }
        // 2: nothing found.
        Some(2) => {}
        _ => {
            return Err(super::error::failed(
                "blkid",
                &[args[0], args[1], args[2], &dev.to_string_lossy()],
                &out,
            ));
        }
    }
    let mut f = std::fs::File::open(dev).map_err(io_err("opening", dev))?;
    let mut buf = vec![0u8; BLANK_PROBE_BYTES];
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).map_err(io_err("reading", dev))? {
            0 => break,
            k => n += k,
        }
    }
    Ok(match buf[..n].iter().position(|&b| b != 0) {
        None => Contents::Blank,
        Some(at) => Contents::Other(format!("non-zero data at byte {at}")),
    })
}

/// Creates a filesystem on `dev`. Callers check [`probe`] first.
pub fn format(dev: &Path, fs: FsType) -> Result<()> {
    let dev = dev.to_string_lossy();
    match fs {
        FsType::Ext4 => run("mkfs.ext4", &["-q", "-F", &dev])?,
        FsType::Xfs => run("mkfs.xfs", &["-q", &dev])?,
    };
    Ok(())
}

/// Mounts the filesystem on `dev` at `target` (a directory) with `options` (mount -o).
pub fn mount(dev: &Path, target: &Path, fs: FsType, options: &[String]) -> Result<()> {
    let mut args = vec!["-t".to_string(), fs.name().to_string()];
    if !options.is_empty() {
        args.push("-o".into());
        args.push(options.join(","));
    }
    args.push(dev.to_string_lossy().into_owned());
    args.push(target.to_string_lossy().into_owned());
    run("mount", &args)?;
    Ok(())
}

/// Bind-mounts `src` (a directory or a device node) on `target`, read-only when asked (bind,
/// then remount: a bind mount takes its flags only from a remount). `options` are added to the
/// remount (e.g. `noexec`).
pub fn bind(src: &Path, target: &Path, read_only: bool, options: &[String]) -> Result<()> {
    run("mount", &[Path::new("--bind"), src, target])?;
    if read_only || !options.is_empty() {
        let mut o = vec!["remount".to_string(), "bind".to_string()];
        if read_only {
            o.push("ro".into());
        }
        o.extend(options.iter().cloned());
        if let Err(e) = run(
            "mount",
            &["-o".as_ref(), o.join(",").as_ref(), target.as_os_str()],
        ) {
            // Never leave a writable bind behind a failed read-only remount.
            let _ = run("umount", &[target]);
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts the top mount at `target`; returns false when nothing was mounted there.
pub fn unmount(target: &Path) -> Result<bool> {
    if mounted_at(target)?.is_none() {
        return Ok(false);
    }
    // A mount can stay busy for a moment after its last user closed it (a close still in
    // flight, a block-device probe by udev or blkid): retry briefly before failing the call.
    let t0 = std::time::Instant::now();
    let mut delay = std::time::Duration::from_millis(20);
    loop {
        let out = output("umount", &[target])?;
        if out.status.success() {
            return Ok(true);
        }
        let busy = String::from_utf8_lossy(&out.stderr).contains("busy");
        if !busy || t0.elapsed() > std::time::Duration::from_secs(3) {
            return Err(failed("umount", &[target], &out));
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(std::time::Duration::from_millis(400));
    }
}

/// Unmounts everything stacked at `target`.
pub fn unmount_all(target: &Path) -> Result<()> {
    while unmount(target)? {}
    Ok(())
}

/// Detaches the mount at `target` from the tree now (`umount -l`), for mounts whose device
/// died.
pub fn unmount_lazy(target: &Path) -> Result<()> {
    run("umount", &[Path::new("-l"), target])?;
    Ok(())
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Device numbers, "major:minor".
    pub dev: String,
    /// The mounted directory of the filesystem (a bind mount of a subtree shows it).
    pub root: PathBuf,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (`ro`/`rw`, `noexec`, ...).
    pub options: Vec<String>,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source (device path, or e.g. "nbdfuse").
    pub source: String,
}

impl MountEntry {
    /// True when this mount is read-only.
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
    /// The device node this mount binds (a Block publish), e.g. `/dev/loop3`: mountinfo shows
    /// such a bind as the node's path inside the `/dev` filesystem.
    pub fn bound_node(&self) -> Option<PathBuf> {
        if !matches!(self.fstype.as_str(), "devtmpfs" | "tmpfs") {
            return None;
        }
        Some(Path::new("/dev").join(self.root.strip_prefix("/").ok()?))
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text; lines that do not parse are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 2 {
                return None;
            }
            Some(MountEntry {
                dev: l[2].to_string(),
                root: unescape(l[3]).into(),
                mount_point: unescape(l[4]).into(),
                options: l[5].split(',').map(str::to_string).collect(),
                fstype: r[0].to_string(),
                source: unescape(r[1]),
            })
        })
        .collect()
}

/// The mount table of this process's mount namespace.
pub fn mounts() -> Result<Vec<MountEntry>> {
    let p = Path::new("/proc/self/mountinfo");
    Ok(parse_mountinfo(
        &std::fs::read_to_string(p).map_err(io_err("reading", p))?,
    ))
}

/// Absolute form of `path` with symlinks resolved as far as it exists (mountinfo shows
/// resolved paths).
pub fn resolve(path: &Path) -> PathBuf {
    if let Ok(p) = std::fs::canonicalize(path) {
        return p;
    }
    match (path.parent(), path.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => resolve(parent).join(name),
        _ => path.to_path_buf(),
    }
}

/// The top mount at `path`, if any.
pub fn mounted_at(path: &Path) -> Result<Option<MountEntry>> {
    let p = resolve(path);
    Ok(mounts()?.into_iter().rev().find(|m| m.mount_point == p))
}

/// The block device name under /sys/class/block for a device path (`/dev/loop3` -> `loop3`).
fn sys_name(dev: &Path) -> Result<String> {
    let real = std::fs::canonicalize(dev).map_err(io_err("resolving", dev))?;
    Ok(real
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default())
}

fn sys_read(dev: &Path, file: &str) -> Result<String> {
    let p = Path::new("/sys/class/block")
        .join(sys_name(dev)?)
        .join(file);
    Ok(std::fs::read_to_string(&p)
        .map_err(io_err("reading", &p))?
        .trim()
        .to_string())
}

/// The "major:minor" numbers of a block device.
pub fn device_numbers(dev: &Path) -> Result<String> {
    sys_read(dev, "dev")
}

/// The size of a block device in bytes.
pub fn device_size(dev: &Path) -> Result<u64> {
    let sectors = sys_read(dev, "size")?;
    sectors
        .parse::<u64>()
        .map(|s| s * 512)
        .map_err(|_| Error::Unhealthy(format!("{}: bad size {sectors:?}", dev.display())))
}

/// Every mount of the block device `dev` (its filesystem and all binds of it).
pub fn mounts_of(dev: &Path) -> Result<Vec<MountEntry>> {
    let n = device_numbers(dev)?;
    Ok(mounts()?.into_iter().filter(|m| m.dev == n).collect())
}

/// Every bind mount of the device node `dev` itself (block-mode publishes).
pub fn binds_of_node(dev: &Path) -> Result<Vec<MountEntry>> {
    let node = Path::new("/dev").join(sys_name(dev)?);
    Ok(mounts()?
        .into_iter()
        .filter(|m| m.bound_node().as_ref() == Some(&node))
        .collect())
}

/// Grows the filesystem on `dev`, mounted at `mount_point`, to fill the device.
pub fn grow(dev: &Path, mount_point: &Path, fs: FsType) -> Result<()> {
    match fs {
        FsType::Ext4 => run("resize2fs", &[dev])?,
        FsType::Xfs => run("xfs_growfs", &[mount_point])?,
    };
    Ok(())
}

/// Capacity and inode figures of a mounted filesystem (`statvfs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsStats {
    /// Bytes in the filesystem.
    pub total_bytes: u64,
    /// Bytes free for unprivileged users.
    pub available_bytes: u64,
    /// Bytes in use.
    pub used_bytes: u64,
    /// Inodes in the filesystem.
    pub total_inodes: u64,
    /// Free inodes.
    pub free_inodes: u64,
    /// Inodes in use.
    pub used_inodes: u64,
}

/// `statvfs(path)`.
pub fn stats(path: &Path) -> Result<FsStats> {
    let s = rustix::fs::statvfs(path).map_err(|e| Error::Io {
        what: "statvfs",
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    let unit = s.f_frsize;
    Ok(FsStats {
        total_bytes: s.f_blocks * unit,
        available_bytes: s.f_bavail * unit,
        used_bytes: s.f_blocks.saturating_sub(s.f_bfree) * unit,
        total_inodes: s.f_files,
        free_inodes: s.f_ffree,
        used_inodes: s.f_files.saturating_sub(s.f_ffree),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes_and_optional_fields() {
        let text = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    37 35 7:3 / /var/lib/k/target ro,relatime shared:5 master:2 - ext4 /dev/loop3 rw\n\
                    garbage\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, Path::new("/mnt/with space"));
        assert_eq!(m[0].root, Path::new("/mnt1"));
        assert_eq!(m[0].dev, "98:0");
        assert!(!m[0].read_only());
        assert_eq!(m[1].fstype, "ext4");
        assert_eq!(m[1].source, "/dev/loop3");
        assert!(m[1].read_only());
    }

    #[test]
    fn fs_types() {
        assert_eq!(FsType::parse("").unwrap(), FsType::Ext4);
        assert_eq!(FsType::parse("xfs").unwrap(), FsType::Xfs);
        assert!(matches!(
            FsType::parse("ntfs"),
            Err(Error::UnsupportedFs(s)) if s == "ntfs"
        ));
    }
}
