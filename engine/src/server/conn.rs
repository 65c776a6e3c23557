//! One client connection: the only code that reads and writes its socket.
//!
//! The reader checks the buffer for whole frames before parsing anything, runs each
//! request as its own task (pipelining: replies go out as they complete, matched by
//! request id) and refuses work past the in-flight limit. Replies are encoded straight
//! into one shared output buffer that a writer task flushes in batches. A broken
//! stream (bad length) gets an error frame and the connection closes; a bad request in
//! a well-framed stream gets an error frame and the connection goes on.

use super::shard::Shard;
use crate::notify::Notify;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use ringkv_net::protocol::{self, encode, ErrorCode, FrameError};
use std::cell::{Cell, RefCell};
use std::rc::Rc;

const READ_CHUNK_BYTES: usize = 64 * 1024;

struct Output {
    buf: RefCell<Vec<u8>>,
    ready: Notify,
    closed: Cell<bool>,
    in_flight: Cell<usize>,
    in_flight_done: Notify,
}

/// Answers a connection over the per-shard limit with an error frame, then closes it.
pub(crate) async fn refuse(mut stream: TcpStream) {
    let mut out = Vec::new();
    encode::error(
        &mut out,
        0,
        ErrorCode::Unavailable,
        "too many connections on this shard",
    );
    let _ = stream.set_write_timeout(Some(std::time::Duration::from_secs(1)));
    let _ = stream.write_all(&out).await;
    let _ = stream.close().await;
}

pub(crate) async fn serve(stream: TcpStream, shard: Rc<Shard>) {
    let config = &shard.config;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_write_timeout(Some(config.slow_client_timeout));
    let (mut reader, mut writer) = futures_lite::io::split(stream);
    let output = Rc::new(Output {
        buf: RefCell::new(Vec::with_capacity(64 * 1024)),
        ready: Notify::default(),
        closed: Cell::new(false),
        in_flight: Cell::new(0),
        in_flight_done: Notify::default(),
    });
    let writer_task = {
        let output = output.clone();
        glommio::spawn_local(async move {
            let mut sending = Vec::with_capacity(64 * 1024);
            loop {
                if output.buf.borrow().is_empty() {
                    if output.closed.get() && output.in_flight.get() == 0 {
                        break;
                    }
                    output.ready.wait().await;
                    continue;
                }
                std::mem::swap(&mut *output.buf.borrow_mut(), &mut sending);
                if writer.write_all(&sending).await.is_err() {
                    // the client stopped reading (slow-client timeout) or went away
                    output.closed.set(true);
                    break;
                }
                sending.clear();
                if sending.capacity() > 4 << 20 {
                    sending = Vec::with_capacity(64 * 1024);
                }
            }
            let _ = writer.flush().await;
            let _ = writer.close().await;
        })
    };

    let mut buf: Vec<u8> = Vec::with_capacity(READ_CHUNK_BYTES);
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    'read: loop {
        // take every whole frame already buffered
        let mut consumed = 0;
        loop {
            match protocol::check_frame(&buf[consumed..], config.frame_bytes_max) {
                Ok(None) => break,
                Ok(Some(len)) => {
                    let frame = &buf[consumed..consumed + len];
                    consumed += len;
                    dispatch(frame, &shard, &output);
                }
                Err(err) => {
                    let request_id = if buf.len() - consumed >= protocol::HEADER_BYTES {
                        protocol::header(&buf[consumed..]).request_id
                    } else {
                        0
                    };
                    let code = match err {
                        FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                        FrameError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
                        FrameError::TooShort(_) => ErrorCode::BadRequest,
                    };
                    encode::error(
                        &mut output.buf.borrow_mut(),
                        request_id,
                        code,
                        &err.to_string(),
                    );
                    output.ready.notify_all();
                    if err.resynchronisable() {
                        let len = protocol::header(&buf[consumed..]).frame_len as usize;
                        consumed += len;
                        continue;
                    }
                    break 'read;
                }
            }
        }
        buf.drain(..consumed);
        if output.closed.get() {
            break;
        }
        // idle connections wait long; a frame started must finish soon
        let wait = if buf.is_empty() {
            config.idle_timeout
        } else {
            config.slow_client_timeout
        };
        let read = glommio::timer::timeout(wait, async {
            reader.read(&mut chunk).await.map_err(Into::into)
        })
        .await;
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        if shard.stopping.get() && output.in_flight.get() == 0 && buf.is_empty() {
            break;
        }
    }
    // let requests already running answer, then the writer drains and closes
    let deadline = std::time::Instant::now() + shard.config.drain_timeout;
    while output.in_flight.get() > 0 && std::time::Instant::now() < deadline {
        let _ = glommio::timer::timeout(std::time::Duration::from_millis(100), async {
            output.in_flight_done.wait().await;
            Ok(())
        })
        .await;
    }
    output.closed.set(true);
    output.ready.notify_all();
    writer_task.await;
}

fn dispatch(frame: &[u8], shard: &Rc<Shard>, output: &Rc<Output>) {
    let request_id = protocol::header(frame).request_id;
    if shard.stopping.get() {
        encode::error(
            &mut output.buf.borrow_mut(),
            request_id,
            ErrorCode::ShuttingDown,
            "the node is shutting down",
        );
        output.ready.notify_all();
        return;
    }
    if output.in_flight.get() >= shard.config.in_flight_per_connection_max {
        encode::error(
            &mut output.buf.borrow_mut(),
            request_id,
            ErrorCode::TooManyInFlight,
            "too many requests in flight on this connection",
        );
        output.ready.notify_all();
        return;
    }
    output.in_flight.set(output.in_flight.get() + 1);
    let frame = frame.to_vec();
    let (shard, output) = (shard.clone(), output.clone());
    glommio::spawn_local(async move {
        shard.execute(&frame, &output.buf).await;
        output.in_flight.set(output.in_flight.get() - 1);
        output.ready.notify_all();
        output.in_flight_done.notify_all();
    })
    .detach();
}
