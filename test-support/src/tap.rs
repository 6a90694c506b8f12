//! A TCP forwarder between an agent and the hub that records, for each connection, when
//! bytes last moved each way and when each side closed it: what a test asserts about a
//! tunnel's socket, rather than a flag the hub keeps about it.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// A listener on loopback forwarding every connection to `upstream`.
pub struct Tap {
    pub addr: SocketAddr,
    connections: Arc<Mutex<Vec<Arc<Tapped>>>>,
    task: tokio::task::JoinHandle<()>,
}

/// What one forwarded connection saw so far.
#[derive(Clone, Debug, Default)]
pub struct TapRecord {
    pub opened: Option<Instant>,
    /// Bytes from the hub to the agent, and when the last of them moved.
    pub to_agent: u64,
    pub last_to_agent: Option<Instant>,
    /// Bytes from the agent to the hub, and when the last of them moved.
    pub to_hub: u64,
    pub last_to_hub: Option<Instant>,
    /// When the hub's side ended (end of stream or error), and the agent's.
    pub hub_closed: Option<Instant>,
    pub agent_closed: Option<Instant>,
}

impl TapRecord {
    /// When the last byte moved either way.
    pub fn last_byte(&self) -> Option<Instant> {
        self.last_to_agent.max(self.last_to_hub)
    }

    /// Whether both directions have ended: the socket carries nothing any more.
    pub fn closed(&self) -> bool {
        self.hub_closed.is_some() && self.agent_closed.is_some()
    }
}

struct Tapped(Mutex<TapRecord>);

impl Tapped {
    fn update(&self, f: impl FnOnce(&mut TapRecord)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

impl Tap {
    pub async fn start(upstream: SocketAddr) -> Tap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: Arc<Mutex<Vec<Arc<Tapped>>>> = Arc::default();
        let list = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((agent, _)) = listener.accept().await {
                let Ok(hub) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let tapped = Arc::new(Tapped(Mutex::new(TapRecord {
                    opened: Some(Instant::now()),
                    ..TapRecord::default()
                })));
                list.lock().unwrap().push(tapped.clone());
                let (agent_read, agent_write) = agent.into_split();
                let (hub_read, hub_write) = hub.into_split();
                tokio::spawn(pump(
                    hub_read,
                    agent_write,
                    tapped.clone(),
                    Direction::ToAgent,
                ));
                tokio::spawn(pump(agent_read, hub_write, tapped, Direction::ToHub));
            }
        });
        Tap {
            addr,
            connections,
            task,
        }
    }

    /// Every connection so far, oldest first.
    pub fn records(&self) -> Vec<TapRecord> {
        self.connections
            .lock()
            .unwrap()
            .iter()
            .map(|c| c.0.lock().unwrap().clone())
            .collect()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Clone, Copy)]
enum Direction {
    ToAgent,
    ToHub,
}

async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    tapped: Arc<Tapped>,
    direction: Direction,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let now = Instant::now();
        tapped.update(|r| match direction {
            Direction::ToAgent => {
                r.to_agent += n as u64;
                r.last_to_agent = Some(now);
            }
            Direction::ToHub => {
                r.to_hub += n as u64;
                r.last_to_hub = Some(now);
            }
        });
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let now = Instant::now();
    tapped.update(|r| match direction {
        Direction::ToAgent => r.hub_closed = Some(now),
        Direction::ToHub => r.agent_closed = Some(now),
    });
    let _ = to.shutdown().await;
}
