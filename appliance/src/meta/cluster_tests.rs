//! Three metadata-log replicas in one process over an in-memory router: election, replication
//! of commands to every state machine, leader loss, and a replica restarted from its redb file.

// openraft's network trait fixes the (large) RPC error type.
#![allow(clippy::result_large_err)]

use super::store::{self, Applied};
use super::{MetaCommand, MetaResponse, MetaTypes, StoredState};
use openraft::error::{InstallSnapshotError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Config, Raft};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

type Node = Raft<MetaTypes>;

#[derive(Clone, Default)]
struct Router {
    nodes: Arc<Mutex<BTreeMap<u64, Node>>>,
    down: Arc<Mutex<BTreeSet<u64>>>,
}

struct Conn {
    router: Router,
    target: u64,
}

impl Router {
    fn get<E: std::error::Error>(&self, target: u64) -> Result<Node, RPCError<u64, BasicNode, E>> {
        if self.down.lock().unwrap().contains(&target) {
            let e = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "down");
            return Err(RPCError::Unreachable(Unreachable::new(&e)));
        }
        self.nodes
            .lock()
            .unwrap()
            .get(&target)
            .cloned()
            .ok_or_else(|| {
                let e = std::io::Error::new(std::io::ErrorKind::NotFound, "no such node");
                RPCError::Unreachable(Unreachable::new(&e))
            })
    }
}

impl RaftNetworkFactory<MetaTypes> for Router {
    type Network = Conn;
    async fn new_client(&mut self, target: u64, _node: &BasicNode) -> Conn {
        Conn {
            router: self.clone(),
            target,
        }
    }
}

impl RaftNetwork<MetaTypes> for Conn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<MetaTypes>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let n = self.router.get(self.target)?;
        n.append_entries(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<MetaTypes>,
        _option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<u64>,
        RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>,
    > {
        let n = self.router.get(self.target)?;
        n.install_snapshot(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
    async fn vote(
        &mut self,
        rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        let n = self.router.get(self.target)?;
        n.vote(rpc)
            .await
            .map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

fn config() -> Arc<Config> {
    Arc::new(
        Config {
            heartbeat_interval: 50,
            election_timeout_min: 200,
            election_timeout_max: 400,
            ..Default::default()
        }
        .validate()
        .unwrap(),
    )
}

async fn start(router: &Router, id: u64, dir: &std::path::Path) -> Arc<Mutex<Applied>> {
    let (log, sm) = store::open(&dir.join(format!("meta-{id}.redb"))).unwrap();
    let shared = sm.shared();
    let raft = Raft::new(id, config(), router.clone(), log, sm)
        .await
        .unwrap();
    router.nodes.lock().unwrap().insert(id, raft);
    router.down.lock().unwrap().remove(&id);
    shared
}

async fn leader(router: &Router, not: Option<u64>) -> (u64, Node) {
    for _ in 0..200 {
        let nodes: Vec<(u64, Node)> = router
            .nodes
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect();
        for (id, n) in nodes {
            if Some(id) != not && n.metrics().borrow().current_leader == Some(id) {
                return (id, n);
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no leader elected within 5 s");
}

async fn converge(states: &[&Arc<Mutex<Applied>>], want: &super::MetaState) {
    for _ in 0..200 {
        if states.iter().all(|s| &s.lock().unwrap().state == want) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("replicas did not converge on {want:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicates_survives_leader_loss_and_restarts_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let router = Router::default();
    let s1 = start(&router, 1, dir.path()).await;
    let s2 = start(&router, 2, dir.path()).await;
    let s3 = start(&router, 3, dir.path()).await;
    let members: BTreeMap<u64, BasicNode> = (1..=3).map(|i| (i, BasicNode::default())).collect();
    let n1 = router.nodes.lock().unwrap()[&1].clone();
    n1.initialize(members).await.unwrap();

    let (lid, l) = leader(&router, None).await;
    for id in 1..=3 {
        let r = l
            .client_write(MetaCommand::SetState {
                id,
                state: StoredState::Up,
            })
            .await
            .unwrap();
        assert_eq!(
            r.data,
            MetaResponse::Ok {
                epoch: u64::from(id)
            }
        );
    }
    let mark = (1, 0, 0, 2);
    let r = l
        .client_write(MetaCommand::Mark {
            mark,
            missed: 77,
            epoch: 3,
        })
        .await
        .unwrap();
    assert_eq!(r.data, MetaResponse::Ok { epoch: 3 });
    // A mark from a stale epoch is refused by the state machine, on every replica alike.
    let r = l
        .client_write(MetaCommand::Mark {
            mark: (1, 0, 0, 1),
            missed: 5,
            epoch: 2,
        })
        .await
        .unwrap();
    assert_eq!(r.data, MetaResponse::StaleEpoch { ours: 3, theirs: 2 });
    let want = s1.lock().unwrap().state.clone();
    assert_eq!(want.intents.len(), 1);
    converge(&[&s1, &s2, &s3], &want).await;

    // The leader goes away: the other two elect a leader and keep committing.
    router.down.lock().unwrap().insert(lid);
    let old = router.nodes.lock().unwrap().remove(&lid).unwrap();
    old.shutdown().await.unwrap();
    drop(old);
    let (lid2, l2) = leader(&router, Some(lid)).await;
    assert_ne!(lid2, lid);
    l2.client_write(MetaCommand::SetState {
        id: lid as u32,
        state: StoredState::Down,
    })
    .await
    .unwrap();

    // The old leader restarts from its redb file and catches up.
    let restarted = start(&router, lid, dir.path()).await;
    let survivors: Vec<Arc<Mutex<Applied>>> = [(1, &s1), (2, &s2), (3, &s3)]
        .into_iter()
        .filter(|(id, _)| *id != lid)
        .map(|(_, s)| (*s).clone())
        .collect();
    let want = survivors[0].lock().unwrap().state.clone();
    assert_eq!(want.epoch, 4);
    converge(&[&restarted, &survivors[0], &survivors[1]], &want).await;
    for n in router.nodes.lock().unwrap().values() {
        let _ = n.clone();
    }
    let nodes: Vec<Node> = router.nodes.lock().unwrap().values().cloned().collect();
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}
