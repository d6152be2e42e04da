//! The portable engine: a few threads doing `pread`/`pwrite`/`fdatasync`.
//!
//! Used where io_uring is unavailable (old kernels, seccomp). Same contract as the io_uring
//! engine: a completion means every byte was transferred, and FUA writes are synced.

use crate::device::{Completion, Op, Request};
use crate::error::{IoError, Result};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub(crate) struct ThreadEngine {
    tx: Option<SyncSender<Request>>,
    threads: Vec<JoinHandle<()>>,
}

impl ThreadEngine {
    pub(crate) fn start(file: Arc<File>, threads: usize) -> Self {
        let (tx, rx) = sync_channel::<Request>(crate::constants::CHANNEL_DEPTH_MAX);
        let rx = Arc::new(Mutex::new(rx));
        let threads = (0..threads.max(1))
            .map(|i| {
                let rx = Arc::clone(&rx);
                let file = Arc::clone(&file);
                std::thread::Builder::new()
                    .name(format!("disk-io-{i}"))
                    .spawn(move || worker(&file, &rx))
                    .expect("the OS lets us spawn disk threads")
            })
            .collect();
        Self {
            tx: Some(tx),
            threads,
        }
    }

    pub(crate) fn send(&self, req: Request) -> Result<()> {
        self.tx
            .as_ref()
            .ok_or(IoError::EngineStopped)?
            .send(req)
            .map_err(|_| IoError::EngineStopped)
    }
}

impl Drop for ThreadEngine {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn worker(file: &File, rx: &Mutex<Receiver<Request>>) {
    loop {
        let req = match rx.lock().expect("receiver lock").recv() {
            Ok(r) => r,
            Err(_) => return,
        };
        let c = match req.op {
            Op::Read { mut buf, offset } => {
                let result = file.read_exact_at(buf.as_mut_slice(), offset);
                Completion {
                    result,
                    buf: Some(buf),
                }
            }
            Op::Write { buf, offset, fua } => {
                let mut result = file.write_all_at(buf.as_slice(), offset);
                if fua && result.is_ok() {
                    result = file.sync_data();
                }
                Completion {
                    result,
                    buf: Some(buf),
                }
            }
            Op::Flush => Completion {
                result: file.sync_data(),
                buf: None,
            },
            Op::Discard { offset, len } => {
                // SAFETY: fallocate on a descriptor we own; it reads no memory of ours.
                let r = unsafe {
                    libc::fallocate(
                        file.as_raw_fd(),
                        crate::device::PUNCH_HOLE,
                        offset as libc::off_t,
                        len as libc::off_t,
                    )
                };
                let result = if r == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                };
                Completion { result, buf: None }
            }
        };
        let _ = req.reply.send(c);
    }
}
