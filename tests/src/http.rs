//! One plain HTTP GET, for the worker's `/healthz`, `/readyz` and `/metrics`.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET `http://{addr}{path}`: the status code and the body, `None` when nothing answers.
pub async fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.ok()?;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((status, body))
}

/// The status code of `GET http://{addr}{path}`, `None` when nothing answers.
pub async fn status(addr: &str, path: &str) -> Option<u16> {
    get(addr, path).await.map(|(status, _)| status)
}
