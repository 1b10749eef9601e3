//! The mutual challenge-response that opens every cluster connection.
//!
//! ```text
//! dialer   -> MAGIC, name, nonce_d
//! listener -> MAGIC, name, nonce_l, HMAC(secret, "accept", nonce_d, nonce_l, names)
//! dialer   -> HMAC(secret, "dial", nonce_d, nonce_l, names)   (or closes: wrong secret)
//! listener -> 1 (welcome) or 0 (refused)
//! both     -> run (8 bytes: a number each start of the process picks)
//! ```

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAGIC: &[u8; 8] = b"WARRENC1";
const NONCE: usize = 32;
const MAC: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the peer does not speak Warren's cluster protocol")]
    NotWarren,
    #[error("node '{peer}' holds another cluster secret")]
    SecretMismatch { peer: String },
    #[error("the peer closed the connection before proving the cluster secret (does it hold another one?)")]
    Unproven,
    #[error("this node itself")]
    SameNode,
    #[error("no random source for the handshake")]
    Random,
}

fn nonce() -> Result<[u8; NONCE], HandshakeError> {
    let mut bytes = [0u8; NONCE];
    SystemRandom::new().fill(&mut bytes).map_err(|_| HandshakeError::Random)?;
    Ok(bytes)
}

fn transcript(role: &[u8], dialer_nonce: &[u8], listener_nonce: &[u8], dialer: &str, listener: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + NONCE * 2 + dialer.len() + listener.len());
    out.extend_from_slice(b"warren-cluster ");
    out.extend_from_slice(role);
    out.extend_from_slice(dialer_nonce);
    out.extend_from_slice(listener_nonce);
    out.extend_from_slice(dialer.as_bytes());
    out.push(0);
    out.extend_from_slice(listener.as_bytes());
    out
}

async fn write_hello(stream: &mut TcpStream, name: &str, nonce: &[u8]) -> Result<(), HandshakeError> {
    let name = name.as_bytes();
    let len = u8::try_from(name.len()).unwrap_or(u8::MAX);
    let mut hello = Vec::with_capacity(MAGIC.len() + 1 + name.len() + nonce.len());
    hello.extend_from_slice(MAGIC);
    hello.push(len);
    hello.extend_from_slice(&name[..usize::from(len)]);
    hello.extend_from_slice(nonce);
    stream.write_all(&hello).await?;
    Ok(())
}

async fn read_hello(stream: &mut TcpStream) -> Result<(String, [u8; NONCE]), HandshakeError> {
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic).await?;
    if &magic != MAGIC {
        return Err(HandshakeError::NotWarren);
    }
    let len = stream.read_u8().await?;
    let mut name = vec![0u8; usize::from(len)];
    stream.read_exact(&mut name).await?;
    let name = String::from_utf8(name).map_err(|_| HandshakeError::NotWarren)?;
    let mut nonce = [0u8; NONCE];
    stream.read_exact(&mut nonce).await?;
    Ok((name, nonce))
}

/// What a handshake learned of the other node: its name and its run.
pub struct Greeted {
    pub name: String,
    pub run: u64,
}

/// Each side tells its run, then reads the other's.
async fn exchange_runs(stream: &mut TcpStream, run: u64) -> Result<u64, HandshakeError> {
    stream.write_all(&run.to_le_bytes()).await?;
    Ok(stream.read_u64_le().await?)
}

/// A number for this start of the process (peers tell a restart from a
/// connection lost and made again by it).
pub fn new_run() -> Result<u64, HandshakeError> {
    let mut bytes = [0u8; 8];
    SystemRandom::new().fill(&mut bytes).map_err(|_| HandshakeError::Random)?;
    Ok(u64::from_le_bytes(bytes))
}

/// Opens a connection to a listener; returns it and the listener's name
/// and run.
pub async fn dial(
    mut stream: TcpStream,
    name: &str,
    secret: &[u8],
    run: u64,
) -> Result<(TcpStream, Greeted), HandshakeError> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mine = nonce()?;
    write_hello(&mut stream, name, &mine).await?;
    let (peer, theirs) = read_hello(&mut stream).await?;
    let mut proof = [0u8; MAC];
    stream.read_exact(&mut proof).await?;
    if peer == name {
        return Err(HandshakeError::SameNode);
    }
    if hmac::verify(&key, &transcript(b"accept", &mine, &theirs, name, &peer), &proof).is_err() {
        return Err(HandshakeError::SecretMismatch { peer });
    }
    let tag = hmac::sign(&key, &transcript(b"dial", &mine, &theirs, name, &peer));
    stream.write_all(tag.as_ref()).await?;
    match stream.read_u8().await {
        Ok(1) => {
            let peer_run = exchange_runs(&mut stream, run).await?;
            Ok((stream, Greeted { name: peer, run: peer_run }))
        }
        _ => Err(HandshakeError::SecretMismatch { peer }),
    }
}

/// Answers a dialer; returns the connection and the dialer's name and run.
pub async fn accept(
    mut stream: TcpStream,
    name: &str,
    secret: &[u8],
    run: u64,
) -> Result<(TcpStream, Greeted), HandshakeError> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let (peer, theirs) = read_hello(&mut stream).await?;
    let mine = nonce()?;
    write_hello(&mut stream, name, &mine).await?;
    let tag = hmac::sign(&key, &transcript(b"accept", &theirs, &mine, &peer, name));
    stream.write_all(tag.as_ref()).await?;
    if peer == name {
        return Err(HandshakeError::SameNode);
    }
    let mut proof = [0u8; MAC];
    if stream.read_exact(&mut proof).await.is_err() {
        return Err(HandshakeError::Unproven);
    }
    if hmac::verify(&key, &transcript(b"dial", &theirs, &mine, &peer, name), &proof).is_err() {
        let _ = stream.write_all(&[0]).await;
        return Err(HandshakeError::SecretMismatch { peer });
    }
    stream.write_all(&[1]).await?;
    let peer_run = exchange_runs(&mut stream, run).await?;
    Ok((stream, Greeted { name: peer, run: peer_run }))
}
