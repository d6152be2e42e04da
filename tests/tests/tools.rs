//! The stock libiscsi tools (Debian libiscsi-bin) against a real appliance: what an operator
//! would type first. Each test starts its own appliance process on a free loopback port.

use tests::appliance::{run_tool, Appliance, IQN};

const CHAP: &str = "[target.chap]\nuser = \"host1\"\nsecret = \"host1-secret-0123\"\n";

#[test]
fn iscsi_ls_lists_the_target_and_its_lun() {
    let app = Appliance::start("");
    let (ok, out) = run_tool("iscsi-ls", &["-s", &format!("iscsi://{}", app.addr)]);
    assert!(ok, "iscsi-ls failed:\n{out}");
    assert!(
        out.contains(&format!("Target:{IQN} Portal:{},1", app.addr)),
        "{out}"
    );
    // iscsi-ls prints block size x last LBA: 128 MiB - 512 bytes shows as 127M.
    assert!(
        out.contains("Lun:0    Type:DIRECT_ACCESS (Size:127M)"),
        "{out}"
    );
    // The exact capacity from READ CAPACITY(16).
    let (ok, out) = run_tool("iscsi-readcapacity16", &[&app.url(0, None)]);
    assert!(ok, "{out}");
    assert!(out.contains("LOGICAL BLOCK LENGTH IN BYTES:512"), "{out}");
    assert!(
        out.contains(&format!(
            "RETURNED LOGICAL BLOCK ADDRESS:{}",
            128 * 2048 - 1
        )),
        "{out}"
    );
}

#[test]
fn iscsi_inq_shows_the_naa_designator() {
    let app = Appliance::start("");
    // iscsi-inq takes the page code in decimal: 131 = 0x83.
    let (ok, out) = run_tool("iscsi-inq", &["-e", "1", "-c", "131", &app.url(0, None)]);
    assert!(ok, "{out}");
    assert_eq!(
        out.matches("Designator Type:(3) NAA").count(),
        1,
        "one NAA designator in VPD 0x83:\n{out}"
    );
    assert_eq!(
        out.matches("Designator Type:(4) RELATIVE_TARGET_PORT")
            .count(),
        1,
        "{out}"
    );
    assert_eq!(
        out.matches("Designator Type:(5) TARGET_PORT_GROUP").count(),
        1,
        "{out}"
    );
    let (ok, out) = run_tool("iscsi-inq", &["-e", "1", "-c", "128", &app.url(0, None)]);
    assert!(ok && out.contains("Unit Serial Number:["), "{out}");
}

#[test]
fn chap_right_secret_logs_in_wrong_secret_is_refused() {
    let app = Appliance::start(CHAP);
    let (ok, out) = run_tool(
        "iscsi-inq",
        &[&app.url(0, Some(("host1", "host1-secret-0123")))],
    );
    assert!(ok, "right secret refused:\n{out}\n{}", app.log());
    // The same listing and identity as without CHAP.
    let (ok, out) = run_tool(
        "iscsi-ls",
        &[
            "-s",
            &format!("iscsi://host1%host1-secret-0123@{}", app.addr),
        ],
    );
    assert!(
        ok && out.contains("Lun:0    Type:DIRECT_ACCESS (Size:127M)"),
        "iscsi-ls with CHAP:\n{out}"
    );
    let (ok, out) = run_tool(
        "iscsi-inq",
        &[
            "-e",
            "1",
            "-c",
            "131",
            &app.url(0, Some(("host1", "host1-secret-0123"))),
        ],
    );
    assert!(
        ok && out.contains("Designator Type:(3) NAA"),
        "VPD 0x83 with CHAP:\n{out}"
    );
    let (ok, out) = run_tool(
        "iscsi-inq",
        &[&app.url(0, Some(("host1", "wrong-secret-000")))],
    );
    assert!(!ok, "wrong secret accepted:\n{out}");
    assert!(
        out.to_lowercase().contains("login") || out.to_lowercase().contains("auth"),
        "{out}"
    );
    let (ok, out) = run_tool("iscsi-inq", &[&app.url(0, None)]);
    assert!(!ok, "login without CHAP accepted:\n{out}");
    assert!(app.log().contains("login refused"), "refusals are logged");
}
