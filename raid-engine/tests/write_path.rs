//! Which write path the primary takes for a write inside one data column: patches (new bytes
//! to the column's holder and old bytes back, a parity delta to the parity holder) or whole
//! chunks, whichever moves fewer bytes between controllers, with the same result either way.
//!
//! Three controllers, k=2, m=1; controller 1 leads the extent and holds data column 0, so a
//! whole column 1 written there costs the column and the parity whole (2 chunks across the
//! network, column 0 read from its own store) where patches would cost 3 (the column out and
//! back, the parity delta).

mod common;

use common::Env;
use std::sync::atomic::Ordering;

const CHUNK: usize = 16 << 10;

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test]
async fn a_write_inside_one_column_takes_the_path_that_moves_fewer_bytes() {
    let env = Env::new(3, 1);
    let engine = common::engine(&env, 1, common::view(1, None), CHUNK);
    let row = 2 * CHUNK;
    let mut model = bytes(row, 1);
    engine.write(1, 0, &model).await.unwrap();
    // The row is loaded and cached: from here on, only the writes' own traffic counts.
    assert_eq!(engine.read(1, 0, row as u64).await.unwrap(), model);

    // (at, len, patched?, chunks of traffic): a 4 KiB write in either column patches (the
    // bytes out and back, or only the parity delta for column 0); a whole column 0 patches
    // (one delta); a whole column 1 is cheaper whole (column and parity).
    let cases = [
        (4096, 4096, true, None),
        (CHUNK + 8192, 4096, true, None),
        (0, CHUNK, true, Some(1)),
        (CHUNK, CHUNK, false, Some(2)),
    ];
    for (i, (at, len, patched, chunks)) in cases.into_iter().enumerate() {
        let new = bytes(len, 7 + i as u8);
        let before = engine.stats().patched_writes;
        let moved = env.remote_bytes.load(Ordering::SeqCst);
        engine.write(1, at as u64, &new).await.unwrap();
        model[at..at + len].copy_from_slice(&new);
        let moved = env.remote_bytes.load(Ordering::SeqCst) - moved;
        assert_eq!(
            engine.stats().patched_writes - before,
            u64::from(patched),
            "case {i}: {len} bytes at {at}"
        );
        let want = chunks.map_or(if at < CHUNK { len } else { 3 * len }, |c| c * CHUNK);
        assert_eq!(moved, want as u64, "case {i}: bytes across controllers");
        assert_eq!(
            engine.read(1, 0, row as u64).await.unwrap(),
            model,
            "case {i}"
        );
    }
    // The parity is right: with either data holder's controller down, an engine that
    // loads the row afresh decodes the same bytes from the other column and the parity.
    for down in [1, 2] {
        let at = if down == 1 { 2 } else { 1 };
        let env = Env::with_stores(&env, at);
        let engine = common::engine(&env, at, common::view(2, Some(down)), CHUNK);
        assert_eq!(
            engine.read(1, 0, row as u64).await.unwrap(),
            model,
            "controller {down} down"
        );
        assert!(
            engine.stats().degraded_reads > 0,
            "controller {down} down: decoded"
        );
    }
}
