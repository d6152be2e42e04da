//! Login, discovery and hostile input over real sockets, driven by the project's own test
//! initiator so the exact login status and PDUs can be checked.

use iscsi_target::proto::pdu::*;
use tests::appliance::{Appliance, IQN};
use tests::initiator::{read16, write16, Initiator, InitiatorError, LoginOptions};

const CHAP: &str = "[target.chap]\nuser = \"host1\"\nsecret = \"host1-secret-0123\"\nmutual_user = \"rainio\"\nmutual_secret = \"target-secret-4567\"\n";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn with_chap(secret: &[u8]) -> LoginOptions {
    LoginOptions {
        chap: Some(("host1".into(), secret.to_vec())),
        ..LoginOptions::normal(IQN)
    }
}

#[test]
fn wrong_chap_secret_gets_authentication_failure_status() {
    let app = Appliance::start(CHAP);
    rt().block_on(async {
        match Initiator::login(app.addr, &with_chap(b"not-the-secret")).await {
            Err(InitiatorError::LoginStatus(2, 1)) => {}
            other => panic!("expected status 0x0201 (authentication failure), got {other:?}"),
        }
        // No CHAP offered to a CHAP target: also an authentication failure.
        match Initiator::login(app.addr, &LoginOptions::normal(IQN)).await {
            Err(InitiatorError::LoginStatus(2, 1)) => {}
            other => panic!("expected status 0x0201, got {other:?}"),
        }
        // Right secret, mutual CHAP: the target proves itself too.
        let mut opts = with_chap(b"host1-secret-0123");
        opts.mutual = Some(("rainio".into(), b"target-secret-4567".to_vec()));
        let mut i = Initiator::login(app.addr, &opts)
            .await
            .expect("mutual CHAP login");
        let r = i.command(0, &[0, 0, 0, 0, 0, 0], &[], 0).await.unwrap();
        assert_eq!(r.status, 0, "TEST UNIT READY");
        i.logout().await.unwrap();
        // The target must not prove itself with the wrong secret: a client expecting another
        // mutual secret rejects it.
        let mut opts = with_chap(b"host1-secret-0123");
        opts.mutual = Some(("rainio".into(), b"some-other-secret".to_vec()));
        assert!(matches!(
            Initiator::login(app.addr, &opts).await,
            Err(InitiatorError::TargetAuth)
        ));
    });
}

#[test]
fn normal_login_reports_tpgt_first_and_unknown_target_is_not_found() {
    let app = Appliance::start("");
    rt().block_on(async {
        let i = Initiator::login(app.addr, &LoginOptions::normal(IQN))
            .await
            .unwrap();
        assert!(
            i.tpgt_in_first_response,
            "TargetPortalGroupTag must be in the first login response"
        );
        i.logout().await.unwrap();
        match Initiator::login(
            app.addr,
            &LoginOptions::normal("iqn.2026-11.io.rainio:nope"),
        )
        .await
        {
            Err(InitiatorError::LoginStatus(2, 3)) => {}
            other => panic!("expected 0x0203 target not found, got {other:?}"),
        }
    });
}

#[test]
fn discovery_lists_target_with_address_and_tpgt() {
    let app = Appliance::start("");
    rt().block_on(async {
        let mut d = Initiator::login(app.addr, &LoginOptions::discovery())
            .await
            .unwrap();
        let keys = d.send_targets().await.unwrap();
        assert_eq!(
            keys,
            vec![
                ("TargetName".to_string(), IQN.to_string()),
                ("TargetAddress".to_string(), format!("{},1", app.addr))
            ]
        );
        d.logout().await.unwrap();
    });
}

#[test]
fn data_round_trips_with_digests_and_r2t() {
    let app = Appliance::start("");
    rt().block_on(async {
        let mut opts = LoginOptions::normal(IQN);
        opts.digests = true;
        let mut i = Initiator::login(app.addr, &opts).await.unwrap();
        assert!(i.digests().header && i.digests().data);
        // 1 MiB: beyond FirstBurstLength, so R2Ts carry most of it.
        let data: Vec<u8> = (0..1 << 20).map(|x: u32| (x * 7 % 251) as u8).collect();
        let w = i
            .command(0, &write16(100, 2048), &data, 1 << 20)
            .await
            .unwrap();
        assert_eq!(w.status, 0);
        let r = i
            .command(0, &read16(100, 2048), &[], 1 << 20)
            .await
            .unwrap();
        assert_eq!(r.status, 0);
        assert!(r.data == data, "read back differs");
        // A read past the end: CHECK CONDITION, ILLEGAL REQUEST, LBA OUT OF RANGE.
        let r = i
            .command(0, &read16(128 * 2048, 1), &[], 512)
            .await
            .unwrap();
        assert_eq!(r.status, 2);
        assert_eq!((r.sense[2] & 0x0f, r.sense[12]), (0x05, 0x21));
        i.logout().await.unwrap();
    });
}

/// Malformed PDUs get a Reject or a dropped connection; the target keeps serving others.
#[test]
fn hostile_pdus_are_rejected_and_the_target_survives() {
    let app = Appliance::start("");
    rt().block_on(async {
        // An undefined opcode in full feature phase: Reject (command not supported), session lives.
        let mut i = Initiator::login(app.addr, &LoginOptions::normal(IQN))
            .await
            .unwrap();
        let mut raw = [0u8; 48];
        raw[0] = 0x1c;
        i.send_raw(&raw).await.unwrap();
        match i.recv().await.unwrap() {
            (Bhs::Reject(r), data) => {
                assert_eq!(r.reason, 0x05);
                assert_eq!(&data[..48], &raw[..]);
            }
            other => panic!("expected Reject, got {other:?}"),
        }
        let r = i.command(0, &[0, 0, 0, 0, 0, 0], &[], 0).await.unwrap();
        assert_eq!(r.status, 0, "session still usable after a Reject");

        // A data segment longer than we declared: Reject, then the connection is dropped
        // without the target buffering the body.
        let mut hdr = [0u8; 48];
        let bhs = Bhs::NopOut(NopOut {
            immediate: true,
            lun: 0,
            itt: 9,
            ttt: RESERVED_TAG,
            cmd_sn: i.cmd_sn(),
            exp_stat_sn: 0,
        });
        bhs.encode(&mut hdr, 0, (1 << 24) - 1);
        i.send_raw(&hdr).await.unwrap();
        match i.recv().await {
            Ok((Bhs::Reject(r), _)) => assert_eq!(r.reason, 0x04),
            other => panic!("expected Reject, got {other:?}"),
        }
        i.expect_closed().await.unwrap();

        // Garbage before login: the login fails or the connection drops; never a hang.
        let mut g = Initiator::raw(app.addr).await.unwrap();
        g.send_raw(&[0xffu8; 300]).await.unwrap();
        g.expect_closed().await.unwrap();

        // A truncated BHS then EOF.
        let mut t = Initiator::raw(app.addr).await.unwrap();
        t.send_raw(&[0x43, 0x87, 0, 0]).await.unwrap();
        drop(t);

        // A bad header digest: the connection is dropped.
        let mut opts = LoginOptions::normal(IQN);
        opts.digests = true;
        opts.isid = 0x8000_0000_0002;
        let mut d = Initiator::login(app.addr, &opts).await.unwrap();
        let mut wire = Vec::new();
        let nop = Bhs::NopOut(NopOut {
            immediate: true,
            lun: 0,
            itt: 5,
            ttt: RESERVED_TAG,
            cmd_sn: d.cmd_sn(),
            exp_stat_sn: 0,
        });
        encode_pdu(
            &mut wire,
            &nop,
            &[],
            &[],
            Digests {
                header: true,
                data: true,
            },
        );
        wire[48] ^= 0xff;
        d.send_raw(&wire).await.unwrap();
        d.expect_closed().await.unwrap();

        // The target still serves a well-behaved host.
        let mut ok = Initiator::login(app.addr, &LoginOptions::normal(IQN))
            .await
            .unwrap();
        assert_eq!(
            ok.command(0, &[0, 0, 0, 0, 0, 0], &[], 0)
                .await
                .unwrap()
                .status,
            0
        );
        ok.logout().await.unwrap();
    });
    assert!(!app.log().contains("panicked"), "{}", app.log());
}

/// A second login with the same initiator name and ISID replaces the first session.
#[test]
fn session_reinstatement_closes_the_old_session() {
    let app = Appliance::start("");
    rt().block_on(async {
        let mut first = Initiator::login(app.addr, &LoginOptions::normal(IQN))
            .await
            .unwrap();
        let second = Initiator::login(app.addr, &LoginOptions::normal(IQN))
            .await
            .unwrap();
        first.expect_closed().await.unwrap();
        second.logout().await.unwrap();
    });
}

/// SIGTERM: logged-in initiators get an Async logout request, the process exits 0.
#[test]
fn sigterm_asks_initiators_to_log_out_and_exits_cleanly() {
    let mut app = Appliance::start("");
    let rt = rt();
    let mut i = rt
        .block_on(Initiator::login(app.addr, &LoginOptions::normal(IQN)))
        .unwrap();
    let pid = app.pid().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    let msg = rt.block_on(i.recv()).unwrap();
    assert!(
        matches!(msg.0, Bhs::AsyncMessage(AsyncMessage { event: 1, .. })),
        "expected an Async logout request, got {msg:?}"
    );
    let status = app.terminate();
    assert!(status.success(), "exit status {status:?}\n{}", app.log());
}

/// APTPL: registrations and the reservation made with APTPL=1 survive a restart of the
/// appliance; without APTPL they do not.
#[test]
fn aptpl_reservations_survive_a_restart() {
    let mut app = Appliance::start("");
    let rt = rt();
    let prout = |sa: u8, ty: u8| [0x5f, sa, ty, 0, 0, 0, 0, 0, 24, 0];
    let params = |key: u64, sa_key: u64, aptpl: bool| {
        let mut p = vec![0u8; 24];
        p[..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p[20] = u8::from(aptpl);
        p
    };
    let read_keys = [0x5e, 0, 0, 0, 0, 0, 0, 0, 255, 0];
    rt.block_on(async {
        let mut i = Initiator::login(app.addr, &LoginOptions::normal(IQN))
            .await
            .unwrap();
        assert_eq!(
            i.command(0, &prout(0, 0), &params(0, 0x1234, true), 24)
                .await
                .unwrap()
                .status,
            0
        );
        assert_eq!(
            i.command(0, &prout(1, 5), &params(0x1234, 0, false), 24)
                .await
                .unwrap()
                .status,
            0
        );
        i.logout().await.unwrap();
    });
    app.restart();
    rt.block_on(async {
        let mut i = Initiator::login(app.addr, &LoginOptions::normal(IQN))
            .await
            .unwrap();
        let r = i.command(0, &read_keys, &[], 255).await.unwrap();
        assert_eq!(
            u32::from_be_bytes(r.data[4..8].try_into().unwrap()),
            8,
            "one key after restart"
        );
        assert_eq!(
            u64::from_be_bytes(r.data[8..16].try_into().unwrap()),
            0x1234
        );
        let rr = i
            .command(0, &[0x5e, 1, 0, 0, 0, 0, 0, 0, 255, 0], &[], 255)
            .await
            .unwrap();
        assert_eq!(rr.data[21] & 0x0f, 5, "the WR_EX_RO reservation is back");
        let caps = i
            .command(0, &[0x5e, 2, 0, 0, 0, 0, 0, 0, 8, 0], &[], 8)
            .await
            .unwrap();
        assert_eq!(caps.data[2] & 0x01, 1, "PTPL_C");
        assert_eq!(caps.data[3] & 0x01, 1, "PTPL_A");
        // Turn APTPL off (re-register with the same key, APTPL=0): nothing persists any more.
        assert_eq!(
            i.command(0, &prout(0, 0), &params(0x1234, 0x1234, false), 24)
                .await
                .unwrap()
                .status,
            0
        );
        i.logout().await.unwrap();
    });
    app.restart();
    rt.block_on(async {
        let mut i = Initiator::login(app.addr, &LoginOptions::normal(IQN))
            .await
            .unwrap();
        let r = i.command(0, &read_keys, &[], 255).await.unwrap();
        assert_eq!(
            u32::from_be_bytes(r.data[4..8].try_into().unwrap()),
            0,
            "no keys without APTPL"
        );
        i.logout().await.unwrap();
    });
}

/// An initiator not on the target's allow-list can neither log in nor discover the target.
#[test]
fn allow_list_refuses_login_and_hides_the_target() {
    let app = Appliance::start("allowed_initiators = [\"iqn.2026-11.io.rainio:test-*\"]");
    rt().block_on(async {
        // Allowed by prefix: logs in and discovers.
        let i = Initiator::login(app.addr, &LoginOptions::normal(IQN))
            .await
            .unwrap();
        i.logout().await.unwrap();
        let mut d = Initiator::login(app.addr, &LoginOptions::discovery())
            .await
            .unwrap();
        assert_eq!(d.send_targets().await.unwrap().len(), 2);
        d.logout().await.unwrap();
        // Not allowed: authorization failure, and an empty SendTargets answer.
        let stranger = |mut o: LoginOptions| {
            o.initiator_name = "iqn.1991-05.com.microsoft:stranger".into();
            o
        };
        match Initiator::login(app.addr, &stranger(LoginOptions::normal(IQN))).await {
            Err(InitiatorError::LoginStatus(2, 2)) => {}
            other => panic!("expected 0x0202 authorization failure, got {other:?}"),
        }
        let mut d = Initiator::login(app.addr, &stranger(LoginOptions::discovery()))
            .await
            .unwrap();
        assert!(
            d.send_targets().await.unwrap().is_empty(),
            "the target is not disclosed"
        );
        d.logout().await.unwrap();
    });
    assert!(app.log().contains("allow-list"), "the refusal is logged");
}

/// A CHAP response captured from one login does not open another (the challenge is fresh each
/// time), and an initiator's mutual-CHAP challenge is answered only once.
#[test]
fn chap_replays_are_refused() {
    let app = Appliance::start(CHAP);
    rt().block_on(async {
        let first = Initiator::login(app.addr, &with_chap(b"host1-secret-0123"))
            .await
            .unwrap();
        let captured = first.last_chap.clone().expect("a CHAP exchange happened");
        first.logout().await.unwrap();
        let mut replay = with_chap(b"host1-secret-0123");
        replay.replay_chap = Some(captured);
        match Initiator::login(app.addr, &replay).await {
            Err(InitiatorError::LoginStatus(2, 1)) => {}
            other => panic!("a replayed CHAP_R must fail authentication, got {other:?}"),
        }
        let mut mutual = with_chap(b"host1-secret-0123");
        mutual.mutual = Some(("rainio".into(), b"target-secret-4567".to_vec()));
        mutual.fixed_mutual_challenge = Some([0x5a; 16]);
        mutual.isid = 0x8000_0000_0042;
        let s = Initiator::login(app.addr, &mutual).await.unwrap();
        s.logout().await.unwrap();
        match Initiator::login(app.addr, &mutual).await {
            Err(InitiatorError::LoginStatus(2, 1)) => {}
            other => panic!("a reused mutual challenge must be refused, got {other:?}"),
        }
    });
    assert!(app.log().contains("replay"), "{}", app.log());
}
