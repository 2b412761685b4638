//! The agent with a pool of raw block devices (`--device`), on loop devices: one device per
//! volume, new volumes read as zeros, a volume that fits no free device is refused, resize
//! within the device, and the assignment survives a restart. Needs root, `losetup` and
//! `qemu-io`; skipped otherwise (listed by ci/test.sh; a failure under CI).

mod agent_common;
mod skip;

use agent_common::Agent;
use flashcopy_csi::agent::Config;
use skip::{have_all, root_with};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A loop device over a file, detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn attach(file: &Path) -> Option<Self> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .unwrap_or_else(|e| panic!("running losetup: {e}"));
        if !out.status.success() {
            skip::skip(&format!(
                "losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            return None;
        }
        Some(Self(
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .to_owned()
                .into(),
        ))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn qemu_io(nbd: &Path, export: &str, cmd: &str) {
    let uri = format!("nbd+unix:///{export}?socket={}", nbd.display());
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", cmd, &uri])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    println!("$ qemu-io {cmd} {uri}\n{text}");
    assert!(o.status.success() && !text.contains("fail"), "{text}");
}

#[test]
fn volumes_on_block_devices() {
    if !(root_with(&["/dev/loop-control"]) && have_all(&["losetup", "qemu-io"])) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Old data on the devices: a new volume must not show it.
    let mut devs = Vec::new();
    for (i, mib) in [8u64, 4].iter().enumerate() {
        let f = tmp.path().join(format!("dev{i}.img"));
        std::fs::write(&f, vec![0xEEu8; (*mib << 20) as usize]).unwrap();
        match LoopDevice::attach(&f) {
            Some(d) => devs.push(d),
            None => return,
        }
    }
    let data = tmp.path().join("data");
    let mut cfg = Config::new(&data);
    cfg.devices = devs.iter().map(|d| d.0.clone()).collect();
    let a = Agent::start_with(cfg.clone());
    let nbd = cfg.nbd_socket_path();

    a.fc_ok(&["mkvol", "big", "6M"]);
    qemu_io(&nbd, "1", "read -P 0 0 6M");
    let o = a.fc(&["mkvol", "other", "6M"]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("no free block device of 6291456 bytes"), "{e}");
    a.fc_ok(&["mkvol", "small", "4M"]);
    let o = a.fc(&["mkvol", "more", "1M"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("all 2 in use"));

    qemu_io(&nbd, "1", "write -P 0x5a 0 6M");
    a.fc_ok(&["resizevol", "big", "8M"]);
    qemu_io(&nbd, "1", "read -P 0 6M 2M");
    let o = a.fc(&["resizevol", "big", "9M"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("past the size of its block device"));

    // A snapshot between the two device-backed volumes works like any other.
    a.fc_ok(&["rmvol", "small"]);
    a.fc_ok(&["mkvol", "snap", "4M"]);
    let v: serde_json::Value =
        serde_json::from_str(&a.fc_ok(&["lsvol", "snap", "-o", "json"])).unwrap();
    let snap = v["nbd_export"].as_str().unwrap().to_string();
    a.fc_ok(&["resizevol", "big", "4M"]);
    a.fc_ok(&[
        "mkfcmap",
        "--source",
        "big",
        "--target",
        "snap",
        "--copyrate",
        "0",
    ]);
    a.fc_ok(&["startfcmap", "--prep", "1"]);
    qemu_io(&nbd, "1", "write -P 0x77 0 1M");
    qemu_io(&nbd, &snap, "read -P 0x5a 0 4M");
    a.stop().unwrap();
    assert!(data.join("devices.json").exists());

    let a = Agent::start_with(cfg);
    let out = a.fc_ok(&["lsvol"]);
    assert!(
        out.contains("big") && out.contains("4.00MiB") && out.contains("snap"),
        "{out}"
    );
    qemu_io(&nbd, "1", "read -P 0x77 0 1M");
    qemu_io(&nbd, &snap, "read -P 0x5a 0 4M");
    a.stop().unwrap();
}
