//! Hedged reads: once the engine has seen enough chunk reads to know what "slow" is, a read
//! whose holder does not answer within the threshold is decoded from the other holders, and
//! that answer is returned, with the right bytes, while the slow holder is still silent.
//!
//! The environment here is the smallest real one: three in-memory shard stores behind a
//! `ClusterEnv` whose metadata calls succeed and whose clock is tokio's; one holder can be told
//! to stop answering reads.

mod common;

use common::Env;
use std::sync::atomic::Ordering;
use std::time::Duration;

const CHUNK: usize = 4096;

fn data(b: u64) -> Vec<u8> {
    (0..2 * CHUNK)
        .map(|i| (i as u64 * 7 + b * 13) as u8)
        .collect()
}

#[tokio::test]
async fn a_silent_holder_is_hedged_by_decoding_from_the_others() {
    let env = Env::new(3, 1);
    // Controller 1 leads extent 0 (the only one): it serves every read here.
    let engine = common::engine(&env, 1, common::view(1, None), CHUNK);
    let data_holder = 2;
    let row = 2 * CHUNK as u64;
    for r in 0..64 {
        engine.write(1, r * row, &data(r)).await.unwrap();
    }
    // Reads teach the engine what a normal chunk read takes.
    for r in 0..64 {
        assert_eq!(engine.read(1, r * row, row).await.unwrap(), data(r));
    }
    let threshold = engine
        .hedge_threshold()
        .expect("a threshold after 64 row reads");
    assert!(threshold >= raid_engine::engine::HEDGE_FLOOR);
    // The holder of column 1 stops answering: reads of column 1 still complete (bounded by a
    // generous deadline only so a regression fails instead of hanging), from the decode.
    env.silent.store(data_holder, Ordering::SeqCst);
    let before = engine.stats();
    for r in 0..8 {
        let got = tokio::time::timeout(
            Duration::from_secs(30),
            engine.read(1, r * row + CHUNK as u64, CHUNK as u64),
        )
        .await
        .expect("a read stuck behind a silent holder");
        assert_eq!(got.unwrap(), data(r)[CHUNK..], "row {r} column 1");
    }
    let after = engine.stats();
    assert_eq!(after.hedged_reads - before.hedged_reads, 8, "{after:?}");
    assert_eq!(after.hedges_won - before.hedges_won, 8, "{after:?}");
    // Column 0 lives on controller 1 itself: no hedge needed.
    for r in 0..8 {
        assert_eq!(
            engine.read(1, r * row, CHUNK as u64).await.unwrap(),
            data(r)[..CHUNK]
        );
    }
    assert_eq!(engine.stats().hedged_reads, after.hedged_reads);
}
