//! The CSI node plugin against a real agent: NBD export -> nbdfuse -> loop -> ext4/xfs -> mount
//! -> bind mounts, driven through the library (attacher, mount helpers).

mod agent_common;

use agent_common::{Agent, have};
use flashcopy_csi::csi::node::attach::{Attacher, Export, FuseLoop};
use flashcopy_csi::csi::node::{Error, mount};
use std::path::Path;
use std::process::Command;

fn root_with_loop_and_fuse() -> bool {
    let ok = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
        && Path::new("/dev/loop-control").exists()
        && Path::new("/dev/fuse").exists();
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "the CSI node tests need root, loop devices and FUSE under CI"
        );
        println!("skipped: the CSI node tests need root, /dev/loop-control and /dev/fuse");
    }
    ok
}

fn can_attach() -> bool {
    root_with_loop_and_fuse() && have("nbdfuse") && have("losetup") && have("mkfs.ext4")
}

/// Detaches everything an attacher holds, even when a test fails half way.
struct Detach<'a>(&'a dyn Attacher, Vec<String>);

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        for v in &self.1 {
            if let Ok(Some(dev)) = self.0.device(v) {
                for m in mount::mounts_of(&dev).unwrap_or_default() {
                    let _ = mount::unmount_lazy(&m.mount_point);
                }
            }
            let _ = self.0.detach(v);
        }
    }
}

#[test]
fn fuse_loop_attach_is_idempotent_and_recovers_from_a_dead_nbdfuse() {
    if !can_attach() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let agent = Agent::start(&tmp.path().join("data"));
    agent.fc_ok(&["mkvol", "a", "33554432"]);
    let export = Export {
        socket: agent.cfg.nbd_socket_path(),
        name: "a".into(),
    };
    let att = FuseLoop::new(&tmp.path().join("state")).unwrap();
    let _guard = Detach(&att, vec!["node/a".into()]);

    assert_eq!(att.device("node/a").unwrap(), None);
    let dev = att.attach("node/a", &export).unwrap();
    assert_eq!(mount::device_size(&dev).unwrap(), 32 << 20);
    assert_eq!(att.attach("node/a", &export).unwrap(), dev, "attach twice");
    assert_eq!(att.device("node/a").unwrap(), Some(dev.clone()));
    assert_eq!(att.volumes().unwrap(), vec!["node/a".to_string()]);
    assert_eq!(mount::probe(&dev).unwrap(), mount::Contents::Blank);

    // A mounted device is not detached.
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    mount::format(&dev, mount::FsType::Ext4).unwrap();
    assert_eq!(
        mount::probe(&dev).unwrap(),
        mount::Contents::Filesystem("ext4".into())
    );
    mount::mount(&dev, &mnt, mount::FsType::Ext4, &[]).unwrap();
    assert!(matches!(att.detach("node/a"), Err(Error::Busy { .. })));
    assert!(mount::unmount(&mnt).unwrap());
    assert!(!mount::unmount(&mnt).unwrap(), "second unmount is a no-op");

    // nbdfuse dies: the attachment reports itself broken, and recovery cleans it up.
    let pid: i32 = std::fs::read_to_string(tmp.path().join("state/node%2Fa/nbdfuse.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(flashcopy_csi::csi::node::attach::wait_until(
        std::time::Duration::from_secs(5),
        || matches!(att.device("node/a"), Err(Error::Unhealthy(_)))
    ));
    assert_eq!(att.recover().unwrap(), vec!["node/a".to_string()]);
    assert_eq!(att.device("node/a").unwrap(), None);
    assert!(
        flashcopy_csi::csi::node::attach::loops_backed_by(
            &tmp.path()
                .canonicalize()
                .unwrap()
                .join("state/node%2Fa/fuse/nbd")
        )
        .is_empty()
    );

    // Attaching again finds the filesystem written before.
    let dev = att.attach("node/a", &export).unwrap();
    assert_eq!(
        mount::probe(&dev).unwrap(),
        mount::Contents::Filesystem("ext4".into())
    );
    att.detach("node/a").unwrap();
    att.detach("node/a").unwrap();
    assert_eq!(att.device("node/a").unwrap(), None);
    drop(_guard);
    agent.stop().unwrap();
}
