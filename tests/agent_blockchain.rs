//! The full block chain without the kernel nbd module: our NBD export → `nbdfuse` → a loop
//! device (`losetup --direct-io=on`) → ext4 → mount. Files written before a snapshot are intact
//! on the mounted snapshot; files written after it are absent.

mod agent_common;
mod skip;

use agent_common::Agent;
use skip::{have_all, root_with};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// An export attached as a block device and mounted; torn down in reverse order on drop.
struct Attached {
    fuse_dir: PathBuf,
    mount: PathBuf,
    nbdfuse: Child,
    loopdev: Option<String>,
    mounted: bool,
}

impl Attached {
    fn new(nbd_socket: &Path, export: &str, dir: &Path, mkfs: bool) -> Self {
        let (fuse_dir, mount) = (
            dir.join(format!("{export}.fuse")),
            dir.join(format!("{export}.mnt")),
        );
        std::fs::create_dir_all(&fuse_dir).unwrap();
        std::fs::create_dir_all(&mount).unwrap();
        let uri = format!("nbd+unix:///{export}?socket={}", nbd_socket.display());
        let nbdfuse = Command::new("nbdfuse")
            .arg(format!("{}/", fuse_dir.display()))
            .arg(&uri)
            .stdout(Stdio::null())
            .spawn()
            .expect("nbdfuse starts");
        let mut a = Attached {
            fuse_dir,
            mount,
            nbdfuse,
            loopdev: None,
            mounted: false,
        };
        let file = a.fuse_dir.join("nbd");
        let t0 = Instant::now();
        while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "nbdfuse did not expose {export}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let dev = run(
            "losetup",
            &["--direct-io=on", "-f", "--show", file.to_str().unwrap()],
        );
        a.loopdev = Some(dev.clone());
        if mkfs {
            run("mkfs.ext4", &["-q", &dev]);
        }
        run("mount", &[&dev, a.mount.to_str().unwrap()]);
        a.mounted = true;
        a
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(&self.mount).status();
        }
        if let Some(dev) = &self.loopdev {
            let _ = Command::new("losetup").args(["-d", dev]).status();
        }
        let _ = Command::new("umount").arg(&self.fuse_dir).status();
        let _ = self.nbdfuse.kill();
        let _ = self.nbdfuse.wait();
    }
}

#[test]
fn ext4_through_nbdfuse_and_loop_keeps_the_snapshot_point_in_time() {
    if !(root_with(&["/dev/loop-control", "/dev/fuse"]) && have_all(&["nbdfuse", "mkfs.ext4"])) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(&tmp.path().join("data"));
    let nbd = agent.cfg.nbd_socket_path();
    agent.fc_ok(&["mkvol", "fs", "67108864"]);
    agent.fc_ok(&["mkvol", "fs-snap", "67108864"]);
    {
        let src = Attached::new(&nbd, "fs", tmp.path(), true);
        std::fs::write(src.mount.join("before.txt"), "written before the snapshot").unwrap();
        std::fs::write(src.mount.join("shared.txt"), "old").unwrap();
        run("sync", &[]);
        agent.fc_ok(&[
            "mkfcmap",
            "--source",
            "fs",
            "--target",
            "fs-snap",
            "--copyrate",
            "0",
        ]);
        agent.fc_ok(&["startfcmap", "--prep", "1"]);
        std::fs::write(src.mount.join("after.txt"), "written after the snapshot").unwrap();
        std::fs::write(src.mount.join("shared.txt"), "new").unwrap();
        run("sync", &[]);

        // The snapshot is crash-consistent: mounting it replays ext4's journal, like after power loss.
        let snap = Attached::new(&nbd, "fs-snap", tmp.path(), false);
        let read = |d: &Path, f: &str| std::fs::read_to_string(d.join(f)).ok();
        assert_eq!(
            read(&snap.mount, "before.txt").as_deref(),
            Some("written before the snapshot")
        );
        assert_eq!(read(&snap.mount, "shared.txt").as_deref(), Some("old"));
        assert_eq!(
            read(&snap.mount, "after.txt"),
            None,
            "a file written after the snapshot is on it"
        );
        assert_eq!(read(&src.mount, "shared.txt").as_deref(), Some("new"));
        assert_eq!(
            read(&src.mount, "after.txt").as_deref(),
            Some("written after the snapshot")
        );
    }
    agent.stop().unwrap();
}
