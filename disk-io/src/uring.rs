//! The io_uring engine: one ring per backing file, driven by the tasks that use it.
//!
//! A caller pushes its request and submits it itself (one `io_uring_enter`, under the ring's
//! lock), then reaps whatever the kernel has completed, its own request included when the
//! kernel finished it inline (a page-cache hit). So the common path has no thread hop: the
//! first version of this engine handed every request to a dedicated ring thread through a
//! channel and an eventfd, and at queue depth 32 those two wake-ups per I/O cost more CPU
//! than the I/O (see docs/benchmarks.md). Completions the kernel finishes later (direct I/O,
//! work punted to io-wq) signal an eventfd registered with the ring (every completion does;
//! the kernel's "asynchronous only" variant skips those posted by task work, which would
//! strand them); a reaper waits on it: a task on the tokio runtime the device was opened
//! in (its wake-up lands on a worker that is usually awake already), or a thread when the
//! device was opened outside a runtime.
//!
//! Invariants:
//! - At most `queue_depth` requests are in flight; each owns its buffer in `slots` until its
//!   completion has been reaped, so the kernel never writes to freed memory. Requests beyond
//!   that wait in `pending` (bounded by the callers' buffer pools) and are pushed as slots free.
//! - Short reads and writes are resubmitted for the remainder, so a completion means all bytes.
//! - Dropping the engine waits, under the lock, until nothing is in flight; only then can the
//!   ring and the slots' buffers be freed (the ring is declared first so it closes first).
//! - Answers are sent after the lock is released, so a woken caller never waits on it.

use crate::buf::AlignedBuf;
use crate::device::{Completion, Op, Request};
use crate::error::{IoError, Result};
use io_uring::{opcode, types, IoUring};
use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use tokio::sync::oneshot;

/// Answers collected under the lock and sent after it is released.
type Answers = Vec<(oneshot::Sender<Completion>, Completion)>;

struct Ring {
    // Declared first: dropped (closed) before the slots' buffers.
    ring: IoUring,
    fd: types::Fd,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    pending: VecDeque<Request>,
    /// Entries pushed but not yet accepted by `io_uring_enter`.
    unsubmitted: bool,
    /// Completions being reaped (kept to reuse its allocation).
    cqes: Vec<(u64, i32)>,
}

struct Shared {
    ring: Mutex<Ring>,
    /// Signalled by the kernel for every completion posted (nonblocking).
    efd: OwnedFd,
    closed: AtomicBool,
    /// Keeps the file open as long as the ring may reference it.
    _file: Arc<File>,
}

enum Reaper {
    Task(tokio::task::JoinHandle<()>),
    Thread(JoinHandle<()>),
}

pub(crate) struct UringEngine {
    shared: Arc<Shared>,
    reaper: Option<Reaper>,
}

impl UringEngine {
    /// Sets up the ring and its reaper, or gives the reason io_uring is unusable.
    pub(crate) fn start(file: Arc<File>, queue_depth: u32) -> std::io::Result<Self> {
        let qd = queue_depth.clamp(2, 4096);
        let mut ring = IoUring::new(qd.next_power_of_two())?;
        // Probe: a NOP must complete (seccomp filters may allow setup but block enter).
        // SAFETY: a NOP references no memory.
        let pushed = unsafe {
            ring.submission()
                .push(&opcode::Nop::new().build().user_data(1))
        };
        if pushed.is_err() {
            return Err(std::io::Error::other("submission queue full at probe"));
        }
        ring.submit_and_wait(1)?;
        let probe = ring.completion().next().map(|c| c.result());
        if probe != Some(0) {
            return Err(std::io::Error::other(format!(
                "NOP probe returned {probe:?}"
            )));
        }
        // SAFETY: eventfd returns a new fd or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: raw is a freshly created fd that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        let qd = qd as usize;
        let shared = Arc::new(Shared {
            ring: Mutex::new(Ring {
                ring,
                fd: types::Fd(file.as_raw_fd()),
                slots: (0..qd).map(|_| None).collect(),
                free: (0..qd).rev().collect(),
                pending: VecDeque::new(),
                unsubmitted: false,
                cqes: Vec::with_capacity(qd),
            }),
            efd,
            closed: AtomicBool::new(false),
            _file: file,
        });
        let reaper = match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let _entered = rt.enter();
                // SAFETY: `EventFd` holds the `Shared` that owns the eventfd, so the fd stays
                // open and the same for as long as the `AsyncFd` that owns it lives.
                let afd = unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(
                        EventFd(Arc::clone(&shared)),
                        tokio::io::Interest::READABLE,
                    )
                }
                .map_err(std::io::Error::from)?;
                Reaper::Task(rt.spawn(reap_task(afd)))
            }
            Err(_) => {
                let s = Arc::clone(&shared);
                Reaper::Thread(
                    std::thread::Builder::new()
                        .name("disk-io-reaper".into())
                        .spawn(move || reap_thread(&s))
                        .expect("the OS lets us spawn the io_uring reaper thread"),
                )
            }
        };
        Ok(Self {
            shared,
            reaper: Some(reaper),
        })
    }

    pub(crate) fn send(&self, req: Request) -> Result<()> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(IoError::EngineStopped);
        }
        let answers = {
            let mut r = self.shared.lock();
            r.pending.push_back(req);
            r.pump()
        };
        deliver(answers);
        Ok(())
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ring> {
        // A panic while holding the lock leaves the ring consistent (every step is a push, a
        // submit or a reap of one entry), so a poisoned lock is still usable.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Empties the eventfd; true if it had been signalled.
    fn drain_eventfd(&self) -> bool {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64 from an eventfd we own.
        let n = unsafe { libc::read(self.efd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        n == 8
    }
}

/// The ring's eventfd, kept open by the `Shared` it belongs to.
struct EventFd(Arc<Shared>);

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.efd.as_raw_fd()
    }
}

async fn reap_task(afd: tokio::io::unix::AsyncFd<EventFd>) {
    let shared = Arc::clone(&afd.get_ref().0);
    loop {
        let Ok(mut guard) = afd.readable().await else {
            tracing::error!("the io_uring reaper lost its eventfd registration; completions are reaped by later submissions only");
            return;
        };
        if !shared.drain_eventfd() {
            guard.clear_ready();
            continue;
        }
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        let answers = shared.lock().pump();
        deliver(answers);
    }
}

fn reap_thread(shared: &Shared) {
    loop {
        let mut pfd = libc::pollfd {
            fd: shared.efd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polls one pollfd that lives on this stack frame.
        let _ = unsafe { libc::poll(&mut pfd, 1, -1) };
        if !shared.drain_eventfd() {
            continue;
        }
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        let answers = shared.lock().pump();
        deliver(answers);
    }
}

fn deliver(answers: Answers) {
    for (reply, c) in answers {
        let _ = reply.send(c);
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        {
            let mut r = self.shared.lock();
            // Requests never pushed are answered "stopped" by dropping their senders.
            r.pending.clear();
            while r.free.len() < r.slots.len() {
                if let Err(e) = r.ring.submit_and_wait(1) {
                    if e.raw_os_error() != Some(libc::EINTR) {
                        tracing::error!(cause = %e, "io_uring_enter failed while draining at close; retrying");
                    }
                }
                r.unsubmitted = false;
                drop(r.reap());
            }
        }
        // Wake the reaper so it sees `closed`.
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own.
        let _ = unsafe { libc::write(self.shared.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        match self.reaper.take() {
            Some(Reaper::Thread(t)) => {
                let _ = t.join();
            }
            Some(Reaper::Task(t)) => t.abort(),
            None => {}
        }
    }
}

impl Ring {
    /// Pushes pending requests into free slots, submits, and reaps, until nothing new was
    /// pushed (completions may free slots or need a resubmission). Returns the answers.
    fn pump(&mut self) -> Answers {
        let mut answers = Vec::new();
        loop {
            while !self.free.is_empty() {
                let Some(req) = self.pending.pop_front() else {
                    break;
                };
                let idx = self.free.pop().expect("non-empty");
                let (slot, reply) = slot_from(req);
                self.slots[idx] = Some(slot);
                self.push(idx, reply);
            }
            if self.unsubmitted {
                match self.ring.submit() {
                    Ok(_) => self.unsubmitted = false,
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                    Err(e) => {
                        // EAGAIN/EBUSY: the kernel is short of resources; the entries stay
                        // queued and the next submission or completion retries them.
                        tracing::warn!(cause = %e, "io_uring_enter refused a submission; retrying with the next request");
                    }
                }
            }
            let stuck = self.unsubmitted;
            answers.extend(self.reap());
            let resubmit = self.unsubmitted;
            let more_fit = !self.pending.is_empty() && !self.free.is_empty();
            if stuck || !(resubmit || more_fit) {
                break;
            }
        }
        answers
    }

    /// Takes every completion; finished requests become answers, short transfers are pushed
    /// again (leaving `unsubmitted` set).
    fn reap(&mut self) -> Answers {
        let mut answers = Vec::new();
        // Copied out first (the queue borrows the ring, and a short transfer pushes again)
        // into a buffer the ring keeps, so reaping allocates nothing.
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(ud, res) in &cqes {
            let idx = ud as usize;
            let Some(slot) = self.slots.get_mut(idx).and_then(Option::as_mut) else {
                continue;
            };
            let result = if res < 0 {
                Some(Err(std::io::Error::from_raw_os_error(-res)))
            } else {
                let n = res as usize;
                let total = slot.buf.as_ref().map_or(0, |b| b.len());
                slot.done += n;
                if matches!(slot.op, SlotOp::Flush | SlotOp::Discard { .. }) || slot.done >= total {
                    Some(Ok(()))
                } else if n == 0 {
                    Some(Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)))
                } else {
                    None
                }
            };
            match result {
                Some(result) => {
                    let slot = self.slots[idx].take().expect("checked above");
                    self.free.push(idx);
                    if let Some(reply) = slot.reply {
                        answers.push((
                            reply,
                            Completion {
                                result,
                                buf: slot.buf,
                            },
                        ));
                    }
                }
                None => {
                    let reply = self.slots[idx].as_mut().and_then(|s| s.reply.take());
                    self.push(idx, reply);
                }
            }
        }
        self.cqes = cqes;
        answers
    }

    /// Queues the entry for `slots[idx]` (its remainder, after a short transfer).
    fn push(&mut self, idx: usize, reply: Option<oneshot::Sender<Completion>>) {
        let fd = self.fd;
        let slot = self.slots[idx].as_mut().expect("pushing a live slot");
        if reply.is_some() {
            slot.reply = reply;
        }
        let done = slot.done;
        let entry = match slot.op {
            SlotOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            SlotOp::Discard { len } => opcode::Fallocate::new(fd, len)
                .offset(slot.offset)
                .mode(crate::device::PUNCH_HOLE)
                .build(),
            SlotOp::Read | SlotOp::Write { .. } => {
                let buf = slot.buf.as_mut().expect("data op has a buffer");
                let len = (buf.len() - done) as u32;
                // SAFETY: done < len <= cap, so the pointer stays inside the allocation.
                let ptr = unsafe { buf.as_mut_ptr().add(done) };
                let off = slot.offset + done as u64;
                match slot.op {
                    SlotOp::Read => opcode::Read::new(fd, ptr, len).offset(off).build(),
                    SlotOp::Write { fua } => opcode::Write::new(fd, ptr, len)
                        .offset(off)
                        .rw_flags(if fua { libc::RWF_DSYNC } else { 0 } as _)
                        .build(),
                    SlotOp::Flush | SlotOp::Discard { .. } => unreachable!(),
                }
            }
        };
        let entry = entry.user_data(idx as u64);
        // SAFETY: the buffer is owned by `slots[idx]` until this entry's completion is reaped.
        // The submission queue holds as many entries as there are slots, so it has room once
        // what was pushed before has been handed to the kernel.
        while unsafe { self.ring.submission().push(&entry) }.is_err() {
            let _ = self.ring.submit();
        }
        self.unsubmitted = true;
    }
}

struct Slot {
    op: SlotOp,
    buf: Option<AlignedBuf>,
    offset: u64,
    done: usize,
    reply: Option<oneshot::Sender<Completion>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotOp {
    Read,
    Write { fua: bool },
    Flush,
    Discard { len: u64 },
}

fn slot_from(req: Request) -> (Slot, Option<oneshot::Sender<Completion>>) {
    let (op, buf, offset) = match req.op {
        Op::Read { buf, offset } => (SlotOp::Read, Some(buf), offset),
        Op::Write { buf, offset, fua } => (SlotOp::Write { fua }, Some(buf), offset),
        Op::Flush => (SlotOp::Flush, None, 0),
        Op::Discard { offset, len } => (SlotOp::Discard { len }, None, offset),
    };
    (
        Slot {
            op,
            buf,
            offset,
            done: 0,
            reply: None,
        },
        Some(req.reply),
    )
}
