//! libiscsi's `iscsi-test-cu` against a real appliance on loopback.
//!
//! Gates: no failure outside `conformance/expected-failures.txt`; no listed test passing (the
//! list may only shrink); and every test of the suites the fabric slice promises (the iSCSI
//! family, READ/WRITE 6/10/12/16, READ CAPACITY 10/16, INQUIRY, TEST UNIT READY) really runs
//! and passes, not merely "skipped". Results go to `target/conformance/results.txt`.

use std::collections::BTreeMap;
use tests::appliance::{run_tool, Appliance};
use tests::cunit::{self, Outcome};

/// Suites whose every test must pass (not skip).
const REQUIRED_SUITES: &[&str] = &[
    "iSCSIcmdsn",
    "iSCSIdatasn",
    "iSCSIResiduals",
    "iSCSITMF",
    "Read6",
    "Read10",
    "Read12",
    "Read16",
    "Write10",
    "Write12",
    "Write16",
    "ReadCapacity10",
    "ReadCapacity16",
    "Inquiry",
    "TestUnitReady",
];

#[test]
fn iscsi_test_cu_all_family() {
    // Two portals (two paths to the LU): the MultipathIO tests use the second.
    let app = Appliance::start_portals(2, "");
    let url = app.url(0, None);
    let url2 = app.url_on(1, 0);
    let (_, out) = run_tool(
        "iscsi-test-cu",
        // Two initiator names (the reservation tests log in as both) and two portals (the
        // MultipathIO tests use the second path).
        &[
            "--dataloss",
            "--verbose",
            "--initiator-name",
            "iqn.2026-11.io.rainio:conformance-1",
            "--initiator-name-2",
            "iqn.2026-11.io.rainio:conformance-2",
            "--test",
            "ALL",
            &url,
            &url2,
        ],
    );
    let results = cunit::parse(&out);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/conformance");
    std::fs::create_dir_all(&dir).expect("results dir");
    std::fs::write(dir.join("iscsi-test-cu.log"), &out).expect("write log");
    assert!(
        results.len() >= 200,
        "expected the whole ALL family (230 tests), parsed {}; output:\n{out}",
        results.len()
    );

    let expected_text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../conformance/expected-failures.txt"
    ))
    .expect("conformance/expected-failures.txt");
    let expected: BTreeMap<String, String> = cunit::parse_expected(&expected_text)
        .expect("every line has a reason")
        .into_iter()
        .collect();

    let skips_text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../conformance/expected-skips.txt"
    ))
    .expect("conformance/expected-skips.txt");
    let expected_skips: BTreeMap<String, String> = cunit::parse_expected(&skips_text)
        .expect("every line has a reason")
        .into_iter()
        .collect();

    let mut report = String::new();
    let (mut pass, mut fail, mut skip) = (0, 0, 0);
    let mut problems = Vec::new();
    for r in &results {
        match r.outcome {
            Outcome::Pass => pass += 1,
            Outcome::Fail => fail += 1,
            Outcome::Skip => skip += 1,
        }
        report.push_str(&format!("{:?}\t{}\n", r.outcome, r.name));
        let listed = expected.contains_key(&r.name);
        if r.outcome == Outcome::Fail && !listed {
            problems.push(format!(
                "{} failed and is not in conformance/expected-failures.txt",
                r.name
            ));
        }
        if r.outcome != Outcome::Fail && listed {
            problems.push(format!(
                "{} no longer fails: remove it from conformance/expected-failures.txt",
                r.name
            ));
        }
        let suite = r.name.split('.').next().unwrap_or_default();
        let skip_listed = expected_skips.contains_key(&r.name);
        if REQUIRED_SUITES.contains(&suite) && r.outcome == Outcome::Skip && !skip_listed {
            problems.push(format!(
                "{} was skipped but its suite is required to pass",
                r.name
            ));
        }
        if skip_listed && r.outcome != Outcome::Skip {
            problems.push(format!(
                "{} no longer skips: remove it from conformance/expected-skips.txt",
                r.name
            ));
        }
    }
    for suite in REQUIRED_SUITES {
        assert!(
            results
                .iter()
                .any(|r| r.name.starts_with(&format!("{suite}."))),
            "suite {suite} did not run"
        );
    }
    std::fs::write(dir.join("results.txt"), &report).expect("write results");
    println!(
        "iscsi-test-cu ALL: {pass} passed, {fail} failed, {skip} skipped (of {})",
        results.len()
    );
    assert!(
        problems.is_empty(),
        "conformance problems:\n{}\nappliance log tail:\n{}",
        problems.join("\n"),
        tail(&app.log())
    );
}

fn tail(s: &str) -> &str {
    &s[s.len().saturating_sub(4000)..]
}
