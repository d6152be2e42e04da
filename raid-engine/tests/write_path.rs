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
use raid_engine::engine::Engine;
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

/// Issues `writes` (offset, bytes) together, in order, and applies them to `model` once each
/// has succeeded.
async fn write_together(engine: &Engine, model: &mut [u8], writes: &[(usize, Vec<u8>)]) {
    let done =
        futures::future::join_all(writes.iter().map(|(at, b)| engine.write(1, *at as u64, b)))
            .await;
    for (r, (at, b)) in done.into_iter().zip(writes) {
        r.unwrap();
        model[*at..at + b.len()].copy_from_slice(b);
    }
}

/// Writes that queue for a row while another write of it is being committed are committed
/// with it: the two halves of a row written concurrently cost the row's second column and its
/// parity (what one whole-row write costs), not each column's own parity update (a delta for
/// column 0, the column and the parity again for column 1: 3 chunks). The bytes are those of
/// the writes applied in arrival order, and the parity matches them. Gathering needs other
/// writes in progress (a write alone does not wait for company), so each batch below starts
/// behind a 4 KiB write to another row, whose parity delta is on its way to its holder.
#[tokio::test]
async fn concurrent_writes_of_one_row_are_committed_together() {
    let env = Env::new(3, 1);
    let engine = common::engine(&env, 1, common::view(1, None), CHUNK);
    let row = 2 * CHUNK;
    let mut model = bytes(2 * row, 1);
    engine.write(1, 0, &model).await.unwrap();
    assert_eq!(engine.read(1, 0, model.len() as u64).await.unwrap(), model);
    env.remote_yields.store(true, Ordering::SeqCst);
    // The write in progress: 4 KiB of the next row's column 0, held here (its parity delta
    // crosses to controller 3).
    let other = |seed| (row, bytes(4096, seed));

    let writes = [other(39), (0, bytes(CHUNK, 40)), (CHUNK, bytes(CHUNK, 41))];
    let moved = env.remote_bytes.load(Ordering::SeqCst);
    write_together(&engine, &mut model, &writes).await;
    assert_eq!(engine.stats().gathered_writes, 1);
    assert_eq!(
        env.remote_bytes.load(Ordering::SeqCst) - moved,
        2 * CHUNK as u64 + 4096,
        "bytes across controllers"
    );
    assert_eq!(engine.read(1, 0, model.len() as u64).await.unwrap(), model);

    // Overlapping writes queued together: the later ones' bytes win where they overlap, and
    // a write that does not touch the run before it is committed on its own, after it.
    let writes = [
        other(49),
        (0, bytes(CHUNK, 50)),
        (4096, bytes(8192, 51)),
        (8192, bytes(8192, 52)),
        (CHUNK + 4096, bytes(4096, 53)),
        (0, bytes(4096, 54)),
    ];
    let before = engine.stats().gathered_writes;
    write_together(&engine, &mut model, &writes).await;
    assert_eq!(engine.stats().gathered_writes - before, 4);
    assert_eq!(engine.read(1, 0, model.len() as u64).await.unwrap(), model);

    // A write smaller than a column does not wait for company (the rest of its row is not
    // likely to follow): two 4 KiB writes issued together are committed one after the other.
    let writes = [other(55), (0, bytes(4096, 56)), (4096, bytes(4096, 57))];
    let before = engine.stats().gathered_writes;
    write_together(&engine, &mut model, &writes).await;
    assert_eq!(engine.stats().gathered_writes, before);
    assert_eq!(engine.read(1, 0, model.len() as u64).await.unwrap(), model);

    // With no other write in progress, the first write does not wait for company: the two
    // halves issued together are committed one after the other.
    let before = engine.stats().gathered_writes;
    let (a, b) = (bytes(CHUNK, 60), bytes(CHUNK, 61));
    let (ra, rb) = futures::join!(engine.write(1, 0, &a), engine.write(1, CHUNK as u64, &b));
    ra.unwrap();
    rb.unwrap();
    model[..CHUNK].copy_from_slice(&a);
    model[CHUNK..row].copy_from_slice(&b);
    assert_eq!(engine.stats().gathered_writes, before);
    assert_eq!(engine.read(1, 0, model.len() as u64).await.unwrap(), model);

    // The parity is right: an engine that loads the rows afresh with column 0's holder down
    // decodes the same bytes from column 1 and the parity.
    let env = Env::with_stores(&env, 2);
    let engine = common::engine(&env, 2, common::view(2, Some(1)), CHUNK);
    assert_eq!(engine.read(1, 0, model.len() as u64).await.unwrap(), model);
    assert!(engine.stats().degraded_reads > 0, "decoded");
}
