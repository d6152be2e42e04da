//! The stock Linux kernel initiator, end to end, against a three-controller cluster: runs
//! `scripts/linux-guest-test.sh`, which boots a throw-away Debian guest under qemu (software
//! emulation) with open-iscsi, multipath-tools, e2fsprogs and fio from Debian's packages. The
//! guest logs in through every controller's portal, dm-multipath must build one map with one
//! path per controller (ALUA prioritizer), ext4 is made, fio writes with verification data
//! while the script SIGKILLs a controller, every block verifies, and the guest logs out.
//!
//! It needs root (debootstrap, apt-get) and a few minutes (the guest root is built once into
//! target/linux-guest/). The test command runs it on its own, before the other tests, so the
//! emulated guest does not compete with the timing of the cluster tests.

#[test]
fn stock_linux_initiator_with_dm_multipath_survives_a_controller_kill() {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../scripts/linux-guest-test.sh"
    );
    let out = std::process::Command::new("bash")
        .arg(script)
        .output()
        .expect("run scripts/linux-guest-test.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "the Linux guest test failed");
    assert!(text.contains("linux guest: PASS"), "no PASS line");
    assert!(
        text.contains("RAINIO-PATHS maps=1 paths=3"),
        "one map, three paths"
    );
    assert!(
        text.contains("failed-paths="),
        "the controller was killed mid-write"
    );
}
