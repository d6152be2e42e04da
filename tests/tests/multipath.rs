//! One disk through two portals of one appliance: the same identity on both paths, a target
//! port group per portal, both portals in SendTargets, and a reservation taken on one path
//! enforced on the other.

use tests::appliance::{run_tool, Appliance, IQN};
use tests::initiator::{write16, Initiator, LoginOptions};

fn designator(out: &str, kind: &str) -> String {
    // iscsi-inq prints "Designator Type:(N) NAME" then "Designator:[...]" for each designator.
    let i = out
        .find(kind)
        .unwrap_or_else(|| panic!("no {kind} in:\n{out}"));
    let rest = &out[i..];
    let d = rest.find("Designator:[").expect("designator value");
    rest[d..].lines().next().unwrap().to_owned()
}

#[test]
fn two_portals_are_two_paths_to_one_disk() {
    let app = Appliance::start_portals(2, "");
    let vpd = |portal: usize| {
        let (ok, out) = run_tool(
            "iscsi-inq",
            &["-e", "1", "-c", "131", &app.url_on(portal, 0)],
        );
        assert!(ok, "{out}");
        out
    };
    let (a, b) = (vpd(0), vpd(1));
    assert_eq!(
        designator(&a, "(3) NAA"),
        designator(&b, "(3) NAA"),
        "same LU identity on both paths"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Each path is its own relative target port and target port group (VPD 0x83 types 4, 5).
        let mut ports = Vec::new();
        for addr in &app.addrs {
            let mut h = Initiator::login(*addr, &LoginOptions::normal(IQN))
                .await
                .unwrap();
            let d = h
                .command(0, &[0x12, 1, 0x83, 0, 255, 0], &[], 255)
                .await
                .unwrap()
                .data;
            let (mut i, mut rel, mut tpg) = (4, 0u16, 0u16);
            while i + 4 <= d.len() {
                let len = usize::from(d[i + 3]);
                let v = u16::from_be_bytes([d[i + 6], d[i + 7]]);
                match d[i + 1] & 0x0f {
                    4 => rel = v,
                    5 => tpg = v,
                    _ => {}
                }
                i += 4 + len;
            }
            ports.push((rel, tpg));
            h.logout().await.unwrap();
        }
        assert_eq!(ports, vec![(1, 1), (2, 2)]);
        // SendTargets through either portal lists both, each with its TPGT.
        let mut d = Initiator::login(app.addrs[1], &LoginOptions::discovery())
            .await
            .unwrap();
        let keys = d.send_targets().await.unwrap();
        let addrs: Vec<&str> = keys
            .iter()
            .filter(|(k, _)| k == "TargetAddress")
            .map(|(_, v)| v.as_str())
            .collect();
        assert_eq!(
            addrs,
            vec![format!("{},1", app.addrs[0]), format!("{},2", app.addrs[1])]
        );
        d.logout().await.unwrap();
        // REPORT TARGET PORT GROUPS lists both groups.
        let mut host = Initiator::login(app.addrs[0], &LoginOptions::normal(IQN))
            .await
            .unwrap();
        let rtpg = host
            .command(0, &[0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[], 256)
            .await
            .unwrap();
        assert_eq!(
            u32::from_be_bytes(rtpg.data[..4].try_into().unwrap()),
            24,
            "two 12-byte group descriptors"
        );
        // Register and reserve (Write Exclusive) through portal 1...
        let prout = |sa: u8, ty: u8| [0x5f, sa, ty, 0, 0, 0, 0, 0, 24, 0];
        let params = |key: u64| {
            let mut p = vec![0u8; 24];
            p[8..16].copy_from_slice(&key.to_be_bytes());
            p
        };
        assert_eq!(
            host.command(0, &prout(0, 0), &params(0xa1), 24)
                .await
                .unwrap()
                .status,
            0
        );
        let mut reserve = vec![0u8; 24];
        reserve[..8].copy_from_slice(&0xa1u64.to_be_bytes());
        assert_eq!(
            host.command(0, &prout(1, 1), &reserve, 24)
                .await
                .unwrap()
                .status,
            0
        );
        // ...and another host writing through portal 2 is refused at once.
        let mut other = LoginOptions::normal(IQN);
        other.initiator_name = "iqn.2026-11.io.rainio:other-host".into();
        let mut second = Initiator::login(app.addrs[1], &other).await.unwrap();
        let w = second
            .command(0, &write16(0, 1), &[0u8; 512], 512)
            .await
            .unwrap();
        assert_eq!(
            w.status, 0x18,
            "RESERVATION CONFLICT through the other path"
        );
        second.logout().await.unwrap();
        host.logout().await.unwrap();
    });
}
