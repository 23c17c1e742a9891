//! The admin API's client, for the CLI's operator commands: plain HTTP/1.1 with the bearer
//! token, one connection per call. (Put TLS in front of the API, e.g. a port-forward or a
//! sidecar, when it crosses a network you do not trust.)

use std::time::Duration;

use anyhow::Context as _;
use axum::http::{header, Method, Request, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use secrecy::{ExposeSecret, SecretString};

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Client {
    /// `host:port`.
    authority: String,
    /// The URL's path, without a trailing slash ("" for the root).
    prefix: String,
    token: SecretString,
}

/// An answer: its status and JSON body (`null` when the body is not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: serde_json::Value,
}

impl Reply {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The API's error message, or the status.
    pub fn error(&self) -> String {
        match self.body.get("message").and_then(|m| m.as_str()) {
            Some(m) => format!("{m} (HTTP {})", self.status),
            None => format!("HTTP {}", self.status),
        }
    }
}

impl Client {
    /// `url` like `http://127.0.0.1:8080`.
    pub fn new(url: &str, token: SecretString) -> anyhow::Result<Self> {
        let uri: Uri = url
            .parse()
            .with_context(|| format!("--admin-url {url:?} is not a URL"))?;
        anyhow::ensure!(
            uri.scheme_str() == Some("http"),
            "--admin-url {url:?}: only http:// URLs are supported"
        );
        let authority = uri
            .authority()
            .with_context(|| format!("--admin-url {url:?} has no host"))?;
        let authority = match authority.port_u16() {
            Some(_) => authority.to_string(),
            None => format!("{authority}:80"),
        };
        anyhow::ensure!(
            !token.expose_secret().is_empty(),
            "no admin token: set CAUSAL_COMMIT_ADMIN_TOKEN or pass --token-file"
        );
        Ok(Client {
            authority,
            prefix: uri.path().trim_end_matches('/').to_string(),
            token,
        })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<Reply> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<Reply> {
        self.call(Method::POST, path, Some(body)).await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<Reply> {
        let what = format!("{method} {path} on {}", self.authority);
        tokio::time::timeout(CALL_TIMEOUT, self.exchange(method, path, body))
            .await
            .with_context(|| format!("{what}: no answer within 30s"))?
            .with_context(|| format!("calling the admin API: {what}"))
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<Reply> {
        let stream = tokio::net::TcpStream::connect(&self.authority).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin API connection ended");
            }
        });
        let bytes = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b)?),
            None => Bytes::new(),
        };
        let request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(header::HOST, &self.authority)
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", self.token.expose_secret()),
            )
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes))?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok(Reply {
            status,
            body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        })
    }
}

/// Percent-encodes one path segment (a contact id may hold `/`, spaces, anything printable).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
