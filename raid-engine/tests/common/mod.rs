//! The smallest real environment for engine tests: in-memory shard stores behind a
//! `ClusterEnv` whose metadata calls succeed and whose clock is tokio's. It counts the chunk
//! bytes that cross between controllers (calls to a holder other than `local`), and one holder
//! can be told to stop answering reads.

#![allow(dead_code)] // each test file uses part of it

use raid_engine::cluster::{
    ClusterEnv, ClusterView, ControllerState, IntentMark, RowIntent, VolError, VolumeMeta,
};
use raid_engine::codec::CodecKind;
use raid_engine::engine::Engine;
use raid_engine::layout::ControllerId;
use raid_engine::layout::{Geometry, Layout};
use raid_engine::shard::{
    BoxFut, Chunk, ChunkAddr, MemShardStore, Patch, RangeRead, ShardError, ShardStore, VolumeId,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Default)]
pub struct Env {
    pub stores: BTreeMap<ControllerId, Arc<MemShardStore>>,
    /// A controller whose chunk reads never answer (0: none).
    pub silent: AtomicU32,
    /// The controller whose engine runs the test: its own store is not across the network.
    pub local: ControllerId,
    /// Chunk bytes sent to or received from other controllers than `local`.
    pub remote_bytes: AtomicU64,
    /// Chunk writes and patches to other controllers yield once before they are applied, as
    /// a call across the network does not finish in the poll that sends it.
    pub remote_yields: AtomicBool,
}

impl Env {
    /// `n` controllers (ids 1..=n) with empty stores; the engine under test is `local`.
    pub fn new(n: u32, local: ControllerId) -> Arc<Self> {
        Arc::new(Self {
            stores: (1..=n)
                .map(|i| (i, Arc::new(MemShardStore::default())))
                .collect(),
            local,
            ..Self::default()
        })
    }

    /// Another view of `env`'s stores, for an engine on controller `local`.
    pub fn with_stores(env: &Self, local: ControllerId) -> Arc<Self> {
        Arc::new(Self {
            stores: env.stores.clone(),
            local,
            ..Self::default()
        })
    }

    fn count(&self, to: ControllerId, bytes: usize) {
        if to != self.local {
            self.remote_bytes.fetch_add(bytes as u64, Ordering::SeqCst);
        }
    }

    /// Yields once for a call to another controller when told to (see `remote_yields`).
    async fn cross(&self, to: ControllerId) {
        if to != self.local && self.remote_yields.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
    }
}

/// Controllers 1-3 at `epoch`, all up but `down`.
pub fn view(epoch: u64, down: Option<ControllerId>) -> ClusterView {
    ClusterView {
        epoch,
        controllers: (1..=3)
            .map(|i| {
                let state = if Some(i) == down {
                    ControllerState::Down
                } else {
                    ControllerState::Up
                };
                (i, state)
            })
            .collect(),
    }
}

/// An engine on controller `at` of `env` at `view`, serving volume 1: one extent of k=2, m=1
/// rows of `chunk`-byte columns, placed over controllers 1-3 so that controller 1 leads it
/// (while up) and holds column 0, and controller 2 holds column 1.
pub fn engine(env: &Arc<Env>, at: ControllerId, view: ClusterView, chunk: usize) -> Engine {
    let g = Geometry::new(2, 1, chunk as u32, 64, CodecKind::GfMatrix, None).unwrap();
    let layout = Layout {
        size_bytes: g.extent_bytes(),
        geometry: g,
    };
    let meta = VolumeMeta::rotated(1, layout, &[1, 2, 3]).unwrap();
    assert_eq!(
        meta.placement[0],
        [1, 2, 3],
        "the placement these tests assume"
    );
    let engine = Engine::new(at, env.stores[&at].clone(), env.clone(), view);
    engine.add_volume(meta).unwrap();
    engine
}

impl Env {
    /// Holder `to`'s answer to a read: none while it was the silent one when asked; otherwise
    /// `read`'s copies, their bytes counted.
    async fn answer_read(
        &self,
        to: ControllerId,
        silent: bool,
        read: BoxFut<'_, Result<Vec<Chunk>, ShardError>>,
    ) -> Result<Vec<Chunk>, ShardError> {
        if silent {
            std::future::pending::<()>().await;
        }
        let got = read.await?;
        self.count(to, data_len(&got));
        Ok(got)
    }
}

fn data_len(copies: &[Chunk]) -> usize {
    copies.iter().map(|c| c.data.len()).sum()
}

impl ClusterEnv for Env {
    fn read_chunk(
        &self,
        to: ControllerId,
        _epoch: u64,
        addr: ChunkAddr,
    ) -> BoxFut<'_, Result<Vec<Chunk>, ShardError>> {
        let silent = self.silent.load(Ordering::SeqCst) == to;
        Box::pin(self.answer_read(to, silent, self.stores[&to].read(addr)))
    }
    fn read_range(
        &self,
        to: ControllerId,
        _epoch: u64,
        addr: ChunkAddr,
        read: RangeRead,
    ) -> BoxFut<'_, Result<Vec<Chunk>, ShardError>> {
        let silent = self.silent.load(Ordering::SeqCst) == to;
        Box::pin(self.answer_read(to, silent, self.stores[&to].read_range(addr, read)))
    }
    fn write_chunk(
        &self,
        to: ControllerId,
        _epoch: u64,
        addr: ChunkAddr,
        chunk: Chunk,
    ) -> BoxFut<'_, Result<(), ShardError>> {
        self.count(to, chunk.data.len());
        Box::pin(async move {
            self.cross(to).await;
            self.stores[&to].write(addr, chunk).await
        })
    }
    fn patch_chunk(
        &self,
        to: ControllerId,
        _epoch: u64,
        addr: ChunkAddr,
        patch: Patch,
    ) -> BoxFut<'_, Result<Vec<u8>, ShardError>> {
        self.count(to, patch.head.data.len());
        Box::pin(async move {
            self.cross(to).await;
            let old = self.stores[&to].patch(addr, patch).await?;
            self.count(to, old.len());
            Ok(old)
        })
    }
    fn forward_write(
        &self,
        to: ControllerId,
        _: u64,
        _: VolumeId,
        _: u64,
        _: Vec<u8>,
    ) -> BoxFut<'_, Result<(), VolError>> {
        Box::pin(async move { Err(VolError::Peer(format!("no controller {to} here"))) })
    }
    fn forward_read(
        &self,
        to: ControllerId,
        _: u64,
        _: VolumeId,
        _: u64,
        _: u64,
    ) -> BoxFut<'_, Result<Vec<u8>, VolError>> {
        Box::pin(async move { Err(VolError::Peer(format!("no controller {to} here"))) })
    }
    fn mark_intent(&self, _: IntentMark, _: u64, _: u64) -> BoxFut<'_, Result<(), VolError>> {
        Box::pin(async { Ok(()) })
    }
    fn clear_intent(&self, _: IntentMark, _: u64, _: u64) -> BoxFut<'_, Result<(), VolError>> {
        Box::pin(async { Ok(()) })
    }
    fn intents(&self, _: VolumeId) -> Vec<IntentMark> {
        Vec::new()
    }
    fn row_intent(&self, _: VolumeId, _: u64, _: u32) -> RowIntent {
        RowIntent::default()
    }
    fn record_repair(
        &self,
        _: VolumeId,
        _: u64,
        _: u32,
        _: Vec<u64>,
        _: u64,
        _: u64,
    ) -> BoxFut<'_, Result<(), VolError>> {
        Box::pin(async { Ok(()) })
    }
    fn record_served(
        &self,
        _: VolumeId,
        _: u64,
        _: u32,
        _: u64,
        _: u64,
    ) -> BoxFut<'_, Result<(), VolError>> {
        Box::pin(async { Ok(()) })
    }
    fn sleep(&self, d: Duration) -> BoxFut<'_, ()> {
        Box::pin(tokio::time::sleep(d))
    }
}
