//! The Prometheus text endpoint (`--metrics-listen HOST:PORT`): shard 0 answers
//! `GET /metrics` over HTTP/1.1 with the node's stats (the same figures as STATS,
//! summed over the shards; `ringkv_net::stats::prometheus_text`), one request per
//! connection. It is for a scraper on a trusted network: a request head over
//! [`HEAD_BYTES_MAX`], or not whole within [`TIMEOUT`], closes the connection, and at
//! most [`CONNECTIONS_MAX`] are served at once (more are closed at once).

use super::shard::Shard;
use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

/// The longest request head read.
pub(crate) const HEAD_BYTES_MAX: usize = 8 * 1024;
/// Reading the whole head, and writing the whole answer, each get this long (a client
/// that sends or reads a byte now and then does not hold a connection longer).
pub(crate) const TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once.
pub(crate) const CONNECTIONS_MAX: usize = 8;

/// Accepts scrapes until the node stops.
pub(crate) async fn serve(listener: TcpListener, shard: Rc<Shard>) {
    let open = Rc::new(Cell::new(0usize));
    super::shard::accept_until_stopped(&listener, &shard, "metrics accept failed", |stream| {
        if open.get() >= CONNECTIONS_MAX {
            return drop(stream);
        }
        open.set(open.get() + 1);
        let (shard, open) = (shard.clone(), open.clone());
        glommio::spawn_local(async move {
            answer(stream, &shard).await;
            open.set(open.get() - 1);
        })
        .detach();
    })
    .await
}

/// What a request head asks for: the metrics, or something else (404), or nothing
/// whole yet.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Metrics,
    Other,
    Incomplete,
}

fn asked(head: &[u8]) -> Asked {
    if !head.windows(4).any(|w| w == b"\r\n\r\n") {
        return Asked::Incomplete;
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    match (parts.next(), parts.next()) {
        (Some(b"GET"), Some(path)) if path == b"/metrics" || path.starts_with(b"/metrics?") => {
            Asked::Metrics
        }
        _ => Asked::Other,
    }
}

async fn answer(mut stream: TcpStream, shard: &Rc<Shard>) {
    let head = glommio::timer::timeout(TIMEOUT, async {
        let mut head = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            match asked(&head) {
                Asked::Incomplete if head.len() < HEAD_BYTES_MAX => {}
                Asked::Incomplete => return Ok(None),
                done => return Ok(Some(done)),
            }
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(n) => head.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let Ok(Some(what)) = head else {
        return;
    };
    let (status, body) = match what {
        Asked::Metrics => match shard.node_stats(0).await {
            Ok(stats) => ("200 OK", ringkv_net::stats::prometheus_text(&stats)),
            Err((_, message)) => ("503 Service Unavailable", format!("{message}\n")),
        },
        _ => (
            "404 Not Found",
            "only GET /metrics is served here\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = glommio::timer::timeout(TIMEOUT, async {
        stream.write_all(response.as_bytes()).await?;
        stream.close().await.map_err(glommio::GlommioError::IoError)
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_whole_get_of_metrics_is_the_metrics() {
        assert_eq!(
            asked(b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n"),
            Asked::Metrics
        );
        assert_eq!(
            asked(b"GET /metrics HTTP/1.1\r\nHost: a\r\n"),
            Asked::Incomplete
        );
        assert_eq!(asked(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n"), Asked::Metrics);
        assert_eq!(asked(b"GET /metricsx HTTP/1.1\r\n\r\n"), Asked::Other);
        assert_eq!(asked(b"GET / HTTP/1.1\r\n\r\n"), Asked::Other);
        assert_eq!(asked(b"POST /metrics HTTP/1.1\r\n\r\n"), Asked::Other);
        assert_eq!(asked(b"\r\n\r\n"), Asked::Other);
        assert_eq!(asked(b""), Asked::Incomplete);
    }
}
