//! A minimal io_uring echo server: the physical reference of a request/response
//! round trip on this machine (same connections, same pipeline depth, no work done).
//!
//! One thread, one ring; each connection has one 64 KiB buffer and at most one
//! operation in flight (recv, then send what was received, then recv again). A 100 ms
//! timeout entry wakes the loop to check the stop flag.

use io_uring::{opcode, squeue, types, IoUring};
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

const CONNECTIONS_MAX: usize = 4096;
const BUFFER_BYTES: usize = 64 * 1024;

const ACCEPT: u64 = 1;
const RECV: u64 = 2;
const SEND: u64 = 3;
const TICK: u64 = 4;

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes received and the part of them already sent back.
    len: usize,
    sent: usize,
}

fn push(ring: &mut IoUring, entry: squeue::Entry) -> io::Result<()> {
    // bounded: one submit frees the whole queue
    for _ in 0..2 {
        // SAFETY: every entry points into a buffer owned by a `Conn` that stays alive
        // (and unmoved on the heap) until the entry's completion is reaped, or into
        // leaked memory.
        if unsafe { ring.submission().push(&entry) }.is_ok() {
            return Ok(());
        }
        ring.submit()?;
    }
    Err(io::Error::other("io_uring submission queue stays full"))
}

fn recv_entry(slot: usize, c: &mut Conn) -> squeue::Entry {
    opcode::Recv::new(
        types::Fd(c.stream.as_raw_fd()),
        c.buf.as_mut_ptr(),
        c.buf.len() as u32,
    )
    .build()
    .user_data(((slot as u64) << 8) | RECV)
}

fn send_entry(slot: usize, c: &Conn) -> squeue::Entry {
    let rest = &c.buf[c.sent..c.len];
    opcode::Send::new(
        types::Fd(c.stream.as_raw_fd()),
        rest.as_ptr(),
        rest.len() as u32,
    )
    .build()
    .user_data(((slot as u64) << 8) | SEND)
}

/// Serves `listener` until `stop` is set.
pub fn serve(listener: TcpListener, stop: Arc<AtomicBool>) -> io::Result<()> {
    let mut ring = IoUring::new(1024)?;
    let listen_fd = listener.as_raw_fd();
    let accept = || {
        opcode::Accept::new(
            types::Fd(listen_fd),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .build()
        .user_data(ACCEPT)
    };
    // leaked so that the kernel may still read it while the ring shuts down
    let tick: &'static types::Timespec =
        Box::leak(Box::new(types::Timespec::new().nsec(100_000_000)));
    let tick_entry = || opcode::Timeout::new(tick).build().user_data(TICK);
    push(&mut ring, accept())?;
    push(&mut ring, tick_entry())?;
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut done = Vec::with_capacity(1024);
    while !stop.load(Ordering::Relaxed) {
        ring.submit_and_wait(1)?;
        done.clear();
        done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for &(user_data, result) in &done {
            let slot = (user_data >> 8) as usize;
            match user_data & 0xFF {
                TICK => push(&mut ring, tick_entry())?,
                ACCEPT => {
                    if result >= 0 {
                        // SAFETY: a successful accept returns a new socket we own.
                        let stream = unsafe { TcpStream::from_raw_fd(result) };
                        let open = conns.iter().filter(|c| c.is_some()).count();
                        if open < CONNECTIONS_MAX {
                            let _ = stream.set_nodelay(true);
                            let slot = free.pop().unwrap_or_else(|| {
                                conns.push(None);
                                conns.len() - 1
                            });
                            let c = conns[slot].insert(Conn {
                                stream,
                                buf: vec![0; BUFFER_BYTES],
                                len: 0,
                                sent: 0,
                            });
                            let entry = recv_entry(slot, c);
                            push(&mut ring, entry)?;
                        }
                    }
                    push(&mut ring, accept())?;
                }
                RECV => {
                    let Some(c) = conns.get_mut(slot).and_then(Option::as_mut) else {
                        continue;
                    };
                    if result <= 0 {
                        conns[slot] = None;
                        free.push(slot);
                        continue;
                    }
                    c.len = result as usize;
                    c.sent = 0;
                    let entry = send_entry(slot, c);
                    push(&mut ring, entry)?;
                }
                SEND => {
                    let Some(c) = conns.get_mut(slot).and_then(Option::as_mut) else {
                        continue;
                    };
                    if result <= 0 {
                        conns[slot] = None;
                        free.push(slot);
                        continue;
                    }
                    c.sent += result as usize;
                    let entry = if c.sent < c.len {
                        send_entry(slot, c)
                    } else {
                        recv_entry(slot, c)
                    };
                    push(&mut ring, entry)?;
                }
                _ => {}
            }
        }
    }
    // operations still in flight point into the buffers: leak them rather than free
    // memory the kernel may yet write
    for c in conns.into_iter().flatten() {
        std::mem::forget(c.buf);
    }
    Ok(())
}

/// Starts the echo server on a thread; returns its address and the stop flag.
pub fn spawn(listen: &str) -> io::Result<(std::net::SocketAddr, Arc<AtomicBool>)> {
    let listener = TcpListener::bind(listen)?;
    let addr = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("ringkv-echo".into())
        .spawn(move || {
            if let Err(e) = serve(listener, flag) {
                eprintln!("ringkv-echo: {e}");
            }
        })?;
    Ok((addr, stop))
}
