//! The io_uring engine: one dedicated thread owns a ring and a backing file.
//!
//! Callers push requests on a bounded channel and, if the ring thread is asleep in
//! `io_uring_enter`, write an eventfd that the ring always has a read armed on, so a new request
//! never waits behind in-flight I/O. Requests that arrive together are submitted with one
//! `io_uring_enter` (batched submission).
//!
//! Invariants:
//! - At most `queue_depth` requests are in flight; each owns its buffer in `slots` until its
//!   completion has been reaped, so the kernel never writes to freed memory.
//! - Short reads and writes are resubmitted for the remainder, so a completion means all bytes.
//! - The eventfd's 8-byte read target and every slot outlive the ring (dropped after it).

use crate::buf::AlignedBuf;
use crate::device::{Completion, Op, Request};
use crate::error::{IoError, Result};
use io_uring::{opcode, types, IoUring};
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

const EVENTFD_TOKEN: u64 = u64::MAX;

struct Wake {
    efd: OwnedFd,
    sleeping: AtomicBool,
}

impl Wake {
    fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to an eventfd we own.
        let _ = unsafe { libc::write(self.efd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

pub(crate) struct UringEngine {
    tx: Option<SyncSender<Request>>,
    wake: Arc<Wake>,
    thread: Option<JoinHandle<()>>,
}

impl UringEngine {
    /// Starts the ring thread, or gives the file back with the reason io_uring is unusable.
    pub(crate) fn start(file: Arc<File>, queue_depth: u32) -> std::io::Result<Self> {
        let qd = queue_depth.clamp(2, 4096);
        let mut ring = IoUring::new((qd * 2).next_power_of_two())?;
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
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: raw is a freshly created fd that nothing else owns.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        let wake = Arc::new(Wake {
            efd,
            sleeping: AtomicBool::new(false),
        });
        let (tx, rx) = sync_channel(crate::constants::CHANNEL_DEPTH_MAX);
        let w = Arc::clone(&wake);
        let thread = std::thread::Builder::new()
            .name("disk-io-uring".into())
            .spawn(move || run(ring, file, rx, w, qd as usize))
            .expect("the OS lets us spawn the io_uring thread");
        Ok(Self {
            tx: Some(tx),
            wake,
            thread: Some(thread),
        })
    }

    pub(crate) fn send(&self, req: Request) -> Result<()> {
        self.tx
            .as_ref()
            .ok_or(IoError::EngineStopped)?
            .send(req)
            .map_err(|_| IoError::EngineStopped)?;
        if self.wake.sleeping.swap(false, Ordering::SeqCst) {
            self.wake.notify();
        }
        Ok(())
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        self.tx = None;
        self.wake.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Slot {
    op: SlotOp,
    buf: Option<AlignedBuf>,
    offset: u64,
    done: usize,
    reply: Option<tokio::sync::oneshot::Sender<Completion>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SlotOp {
    Read,
    Write { fua: bool },
    Flush,
    Discard { len: u64 },
}

fn run(ring: IoUring, file: Arc<File>, rx: Receiver<Request>, wake: Arc<Wake>, qd: usize) {
    // Declared before the ring so they are dropped after it.
    let mut efd_buf: Box<[u8; 8]> = Box::new([0; 8]);
    let mut slots: Vec<Option<Slot>> = (0..qd).map(|_| None).collect();
    let mut ring = ring;
    let fd = types::Fd(file.as_raw_fd());
    let mut free: Vec<usize> = (0..qd).rev().collect();
    let mut efd_armed = false;
    let mut closing = false;
    loop {
        if !efd_armed {
            let e = opcode::Read::new(types::Fd(wake.efd.as_raw_fd()), efd_buf.as_mut_ptr(), 8)
                .build()
                .user_data(EVENTFD_TOKEN);
            // SAFETY: efd_buf is boxed and outlives the ring (declared before it).
            unsafe {
                ring.submission()
                    .push(&e)
                    .expect("queue sized for depth + 1")
            };
            efd_armed = true;
        }
        while !closing && !free.is_empty() {
            match rx.try_recv() {
                Ok(req) => {
                    let idx = free.pop().expect("non-empty");
                    slots[idx] = Some(slot_from(req));
                    push(&mut ring, fd, idx, slots[idx].as_mut().expect("just set"));
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => closing = true,
            }
        }
        let inflight = qd - free.len();
        if closing && inflight == 0 {
            break;
        }
        wake.sleeping.store(true, Ordering::SeqCst);
        // A request sent between the try_recv above and the store would find `sleeping` false
        // and not notify: look once more now that the flag is visible to senders.
        if !closing && !free.is_empty() {
            match rx.try_recv() {
                Ok(req) => {
                    wake.sleeping.store(false, Ordering::SeqCst);
                    let idx = free.pop().expect("non-empty");
                    slots[idx] = Some(slot_from(req));
                    push(&mut ring, fd, idx, slots[idx].as_mut().expect("just set"));
                    continue;
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => {
                    wake.sleeping.store(false, Ordering::SeqCst);
                    closing = true;
                    continue;
                }
            }
        }
        if let Err(e) = ring.submit_and_wait(1) {
            if e.raw_os_error() != Some(libc::EINTR) {
                tracing::error!(cause = %e, "io_uring_enter failed; the disk thread keeps retrying");
            }
        }
        wake.sleeping.store(false, Ordering::SeqCst);
        let cqes: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in cqes {
            if ud == EVENTFD_TOKEN {
                efd_armed = false;
                continue;
            }
            let idx = ud as usize;
            let slot = slots[idx].as_mut().expect("completion for a live slot");
            if res < 0 {
                finish(slot, Err(std::io::Error::from_raw_os_error(-res)));
            } else {
                let n = res as usize;
                let total = slot.buf.as_ref().map_or(0, |b| b.len());
                slot.done += n;
                if matches!(slot.op, SlotOp::Flush | SlotOp::Discard { .. }) || slot.done >= total {
                    finish(slot, Ok(()));
                } else if n == 0 {
                    finish(
                        slot,
                        Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
                    );
                } else {
                    push(&mut ring, fd, idx, slot);
                    continue;
                }
            }
            slots[idx] = None;
            free.push(idx);
        }
    }
}

fn slot_from(req: Request) -> Slot {
    let (op, buf, offset) = match req.op {
        Op::Read { buf, offset } => (SlotOp::Read, Some(buf), offset),
        Op::Write { buf, offset, fua } => (SlotOp::Write { fua }, Some(buf), offset),
        Op::Flush => (SlotOp::Flush, None, 0),
        Op::Discard { offset, len } => (SlotOp::Discard { len }, None, offset),
    };
    Slot {
        op,
        buf,
        offset,
        done: 0,
        reply: Some(req.reply),
    }
}

fn push(ring: &mut IoUring, fd: types::Fd, idx: usize, slot: &mut Slot) {
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
    while unsafe { ring.submission().push(&entry) }.is_err() {
        let _ = ring.submit();
    }
}

fn finish(slot: &mut Slot, result: std::io::Result<()>) {
    if let Some(reply) = slot.reply.take() {
        let _ = reply.send(Completion {
            result,
            buf: slot.buf.take(),
        });
    }
}
