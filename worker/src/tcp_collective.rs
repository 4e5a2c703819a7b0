//! A multi-process [`Collective`] over TCP: the CPU backend's tensor parallelism
//! between worker processes (on loopback, or across pods).
//!
//! Owns a full mesh of connections (one per pair of ranks) and one writer thread
//! per connection. Bootstrap: rank `r` binds its address, connects (with retries
//! until a deadline) to every lower rank and accepts every higher one; each
//! connection starts with a hello (magic, version, group id, world size, rank) in
//! both directions, so a stray or stale process is refused.
//!
//! All-reduce is "all-gather, then sum in rank order": every rank sends its buffer
//! to every peer and computes `slot₀ + slot₁ + … + slotₙ₋₁` itself, exactly as
//! [`LocalCollective`](crate::LocalCollective) does, so every rank gets bit-identical
//! results (and the same bits as the in-process group). Gather sends to rank 0 only.
//! Writes go through the writer threads while the caller reads, so two ranks that
//! send each other large buffers never deadlock on full socket buffers.
//!
//! Invariants: every frame carries an op tag, an op sequence number and a length, so
//! ranks that fall out of step fail loudly instead of mixing data. A peer that
//! closes its connection (died) is an error at once; one that sends nothing within
//! `op_timeout` (hung) is an error after it. After any error the collective stays
//! failed: the streams may be out of step, so the group must be bootstrapped again.
//!
//! Costs per all-reduce of `n` floats: `(world−1)·4n` bytes sent and received per
//! rank, one copy into a shared frame, `(world−1)·n` additions; latency ≈ one
//! loopback round trip (~30 µs) plus the transfer.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::collective::Collective;
use crate::WorkerError;

#[cfg(target_endian = "big")]
compile_error!("the TCP collective sends f32 buffers in native (little-endian) order");

const MAGIC: [u8; 8] = *b"STRLCOLL";
const VERSION: u32 = 1;
/// magic, version, group id, world size, rank.
const HELLO_LEN: usize = 8 + 4 + 8 + 4 + 4;
/// op tag, op sequence number, element count.
const HEADER_LEN: usize = 1 + 8 + 8;

/// Where the ranks of one group are and how long to wait for them.
#[derive(Clone, Debug)]
pub struct TcpGroup {
    pub rank: usize,
    /// `host:port` of every rank, indexed by rank (this rank's own entry included).
    pub peers: Vec<String>,
    /// Address to bind; `None` means `peers[rank]`.
    pub listen: Option<String>,
    /// Connections carrying another group id are refused.
    pub group_id: u64,
    /// How long bootstrap waits for every peer to be reachable and to answer.
    pub connect_timeout: Duration,
    /// How long one collective waits for a peer's data before failing.
    pub op_timeout: Duration,
}

impl Default for TcpGroup {
    fn default() -> Self {
        Self {
            rank: 0,
            peers: Vec::new(),
            listen: None,
            group_id: 0,
            connect_timeout: Duration::from_secs(120),
            op_timeout: Duration::from_secs(60),
        }
    }
}

impl TcpGroup {
    /// The group an `Init`'s TCP bootstrap describes for `rank` of `tp`; every rank's
    /// address must be there.
    pub fn from_bootstrap(
        rank: usize,
        tp: usize,
        peers: &proto::v1::TcpPeers,
        connect_timeout: Duration,
        op_timeout: Duration,
    ) -> Result<Self, WorkerError> {
        if peers.peer_addrs.len() != tp {
            return Err(WorkerError::Config(format!(
                "TP = {tp} needs TCP peer addresses for all {tp} ranks, got {}",
                peers.peer_addrs.len()
            )));
        }
        Ok(Self {
            rank,
            peers: peers.peer_addrs.clone(),
            listen: (!peers.listen_addr.is_empty()).then(|| peers.listen_addr.clone()),
            group_id: peers.group_id,
            connect_timeout,
            op_timeout,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AllReduce = 1,
    Gather = 2,
}

/// A connection's sending half: a thread that writes queued frames in order.
struct PeerWriter {
    frames: Option<Sender<Arc<Vec<u8>>>>,
    thread: Option<JoinHandle<()>>,
    /// Set by the thread when a write fails.
    failure: Arc<Mutex<Option<String>>>,
}

struct Peer {
    rank: usize,
    stream: TcpStream,
    writer: PeerWriter,
}

/// One rank's end of a TCP full mesh.
pub struct TcpCollective {
    rank: usize,
    world: usize,
    /// Every other rank, in rank order.
    peers: Vec<Peer>,
    /// Number of collectives issued so far (frames carry it).
    op_seq: u64,
    op_timeout: Duration,
    /// Per rank: the last buffer received from it (reused between ops).
    slots: Vec<Vec<f32>>,
    /// Why the collective can no longer be used.
    failed: Option<String>,
}

impl TcpCollective {
    /// Binds this rank's address and bootstraps the mesh.
    pub fn connect(group: &TcpGroup) -> Result<Self, WorkerError> {
        check_group(group)?;
        let addr = group
            .listen
            .clone()
            .unwrap_or_else(|| group.peers[group.rank].clone());
        let listener = TcpListener::bind(&addr).map_err(|e| {
            WorkerError::Collective(format!("rank {}: cannot listen on {addr}: {e}", group.rank))
        })?;
        Self::connect_with_listener(group, listener)
    }

    /// Bootstraps the mesh on an already bound listener (its address must be the one
    /// the other ranks know as `peers[rank]`).
    pub fn connect_with_listener(
        group: &TcpGroup,
        listener: TcpListener,
    ) -> Result<Self, WorkerError> {
        check_group(group)?;
        let (rank, world) = (group.rank, group.peers.len());
        let deadline = Instant::now() + group.connect_timeout;
        let mut streams: Vec<(usize, TcpStream)> = Vec::with_capacity(world.saturating_sub(1));
        for (peer, addr) in group.peers.iter().enumerate().take(rank) {
            streams.push((peer, dial(group, peer, addr, deadline)?));
        }
        streams.extend(accept_higher(group, &listener, deadline)?);
        streams.sort_by_key(|(r, _)| *r);
        let peers = streams
            .into_iter()
            .map(|(r, stream)| {
                stream
                    .set_read_timeout(Some(group.op_timeout))
                    .and_then(|()| stream.set_nodelay(true))
                    .map_err(|e| io_error(rank, r, "configuring the connection", e))?;
                let writer = PeerWriter::spawn(rank, r, &stream, group.op_timeout)?;
                Ok(Peer {
                    rank: r,
                    stream,
                    writer,
                })
            })
            .collect::<Result<Vec<_>, WorkerError>>()?;
        tracing::info!(
            rank,
            world,
            group_id = group.group_id,
            "TCP collective connected"
        );
        Ok(Self {
            rank,
            world,
            peers,
            op_seq: 0,
            op_timeout: group.op_timeout,
            slots: vec![Vec::new(); world],
            failed: None,
        })
    }

    fn check_usable(&self) -> Result<(), WorkerError> {
        match &self.failed {
            Some(why) => Err(WorkerError::Collective(format!(
                "rank {}: the collective failed earlier ({why}); bootstrap the group again",
                self.rank
            ))),
            None => Ok(()),
        }
    }

    /// Records the first failure and returns it.
    fn fail(&mut self, e: WorkerError) -> WorkerError {
        if self.failed.is_none() {
            self.failed = Some(e.to_string());
        }
        e
    }

    /// Queues `frame` on the writers of `to` (peer ranks).
    fn send(
        &mut self,
        frame: &Arc<Vec<u8>>,
        to: impl Fn(usize) -> bool,
    ) -> Result<(), WorkerError> {
        for p in self.peers.iter().filter(|p| to(p.rank)) {
            p.writer.send(self.rank, p.rank, frame.clone())?;
        }
        Ok(())
    }

    /// Reads the current op's frame from the `i`-th peer into `slots[peer rank]`.
    fn receive(&mut self, i: usize, op: Op, len: usize) -> Result<(), WorkerError> {
        let (me, seq, timeout) = (self.rank, self.op_seq, self.op_timeout);
        let peer = &mut self.peers[i];
        let r = peer.rank;
        let mut header = [0u8; HEADER_LEN];
        read_exact(&mut peer.stream, &mut header, me, r, timeout, &peer.writer)?;
        let got_op = header[0];
        let got_seq = u64::from_le_bytes(header[1..9].try_into().expect("8 bytes"));
        let got_len = u64::from_le_bytes(header[9..17].try_into().expect("8 bytes"));
        if got_op != op as u8 || got_seq != seq || got_len != len as u64 {
            return Err(WorkerError::Collective(format!(
                "rank {me}: rank {r} is out of step: expected op {op:?} #{seq} of {len} floats, got op {got_op} #{got_seq} of {got_len}"
            )));
        }
        let slot = &mut self.slots[r];
        slot.resize(len, 0.0);
        read_exact(
            &mut peer.stream,
            bytemuck::cast_slice_mut(slot),
            me,
            r,
            timeout,
            &peer.writer,
        )
    }

    fn all_reduce_inner(&mut self, buf: &mut [f32]) -> Result<(), WorkerError> {
        let frame = Arc::new(encode(Op::AllReduce, self.op_seq, buf));
        self.send(&frame, |_| true)?;
        for i in 0..self.peers.len() {
            self.receive(i, Op::AllReduce, buf.len())?;
        }
        // Sum in rank order on every rank, as LocalCollective does.
        let own = &mut self.slots[self.rank];
        own.clear();
        own.extend_from_slice(buf);
        buf.copy_from_slice(&self.slots[0]);
        for s in &self.slots[1..] {
            for (b, v) in buf.iter_mut().zip(s) {
                *b += v;
            }
        }
        Ok(())
    }

    fn gather_inner(&mut self, local: &[f32]) -> Result<Option<Vec<f32>>, WorkerError> {
        if self.rank != 0 {
            let frame = Arc::new(encode(Op::Gather, self.op_seq, local));
            self.send(&frame, |r| r == 0)?;
            return Ok(None);
        }
        let mut out = Vec::with_capacity(local.len() * self.world);
        out.extend_from_slice(local);
        for i in 0..self.peers.len() {
            self.receive(i, Op::Gather, local.len())?;
            out.extend_from_slice(&self.slots[self.peers[i].rank]);
        }
        Ok(Some(out))
    }
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), WorkerError> {
        self.check_usable()?;
        let r = self.all_reduce_inner(buf);
        self.op_seq += 1;
        r.map_err(|e| self.fail(e))
    }

    fn gather(&mut self, local: &[f32]) -> Result<Option<Vec<f32>>, WorkerError> {
        self.check_usable()?;
        let r = self.gather_inner(local);
        self.op_seq += 1;
        r.map_err(|e| self.fail(e))
    }
}

impl Drop for TcpCollective {
    /// A healthy collective first lets its writers deliver what is queued (a gather
    /// returns before its frame is sent); a failed one shuts its connections down
    /// first, which also unblocks a writer stuck on an unresponsive peer.
    fn drop(&mut self) {
        let healthy = self.failed.is_none();
        for p in &mut self.peers {
            if !healthy {
                let _ = p.stream.shutdown(Shutdown::Both);
            }
            p.writer.frames = None;
        }
        for p in &mut self.peers {
            if let Some(t) = p.writer.thread.take() {
                let _ = t.join();
            }
            let _ = p.stream.shutdown(Shutdown::Both);
        }
    }
}

impl PeerWriter {
    fn spawn(
        me: usize,
        peer: usize,
        stream: &TcpStream,
        timeout: Duration,
    ) -> Result<Self, WorkerError> {
        let mut out = stream
            .try_clone()
            .map_err(|e| io_error(me, peer, "cloning the connection", e))?;
        out.set_write_timeout(Some(timeout))
            .map_err(|e| io_error(me, peer, "configuring the connection", e))?;
        let (tx, rx) = mpsc::channel::<Arc<Vec<u8>>>();
        let failure = Arc::new(Mutex::new(None));
        let slot = failure.clone();
        let thread = std::thread::Builder::new()
            .name(format!("coll-{me}->{peer}"))
            .spawn(move || {
                for frame in rx {
                    if let Err(e) = out.write_all(&frame) {
                        *slot.lock().expect("writer failure lock") =
                            Some(describe_io(me, peer, "sending", &e));
                        return;
                    }
                }
            })
            .map_err(|e| io_error(me, peer, "starting its writer thread", e))?;
        Ok(Self {
            frames: Some(tx),
            thread: Some(thread),
            failure,
        })
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().expect("writer failure lock").clone()
    }

    fn send(&self, me: usize, peer: usize, frame: Arc<Vec<u8>>) -> Result<(), WorkerError> {
        if let Some(f) = self.failure() {
            return Err(WorkerError::Collective(f));
        }
        self.frames
            .as_ref()
            .and_then(|tx| tx.send(frame).ok())
            .ok_or_else(|| {
                WorkerError::Collective(format!("rank {me}: the writer to rank {peer} stopped"))
            })
    }
}

fn check_group(group: &TcpGroup) -> Result<(), WorkerError> {
    if group.peers.is_empty() || group.rank >= group.peers.len() {
        return Err(WorkerError::Collective(format!(
            "rank {} needs an address for every rank, got {} peer addresses",
            group.rank,
            group.peers.len()
        )));
    }
    Ok(())
}

fn encode(op: Op, seq: u64, data: &[f32]) -> Vec<u8> {
    let mut f = Vec::with_capacity(HEADER_LEN + 4 * data.len());
    f.push(op as u8);
    f.extend_from_slice(&seq.to_le_bytes());
    f.extend_from_slice(&(data.len() as u64).to_le_bytes());
    f.extend_from_slice(bytemuck::cast_slice(data));
    f
}

fn hello(group: &TcpGroup) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..20].copy_from_slice(&group.group_id.to_le_bytes());
    h[20..24].copy_from_slice(&(group.peers.len() as u32).to_le_bytes());
    h[24..28].copy_from_slice(&(group.rank as u32).to_le_bytes());
    h
}

/// The rank a peer's hello announces, if it belongs to this group.
fn parse_hello(group: &TcpGroup, h: &[u8; HELLO_LEN]) -> Result<usize, String> {
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4 bytes"));
    if h[..8] != MAGIC || u32_at(8) != VERSION {
        return Err("not a stral collective peer (bad magic or version)".into());
    }
    let gid = u64::from_le_bytes(h[12..20].try_into().expect("8 bytes"));
    if gid != group.group_id {
        return Err(format!(
            "group id {gid} is not this group's {}",
            group.group_id
        ));
    }
    if u32_at(20) as usize != group.peers.len() {
        return Err(format!(
            "world size {} is not this group's {}",
            u32_at(20),
            group.peers.len()
        ));
    }
    Ok(u32_at(24) as usize)
}

/// Connects to lower rank `peer`, retrying until `deadline`, and exchanges hellos.
fn dial(
    group: &TcpGroup,
    peer: usize,
    addr: &str,
    deadline: Instant,
) -> Result<TcpStream, WorkerError> {
    let me = group.rank;
    let mut last_err = String::from("no attempt");
    while Instant::now() < deadline {
        let attempt = (|| -> Result<TcpStream, String> {
            let sock = addr
                .to_socket_addrs()
                .map_err(|e| format!("resolving {addr}: {e}"))?
                .next()
                .ok_or_else(|| format!("{addr} resolves to no address"))?;
            let left = deadline.saturating_duration_since(Instant::now());
            let mut s = TcpStream::connect_timeout(&sock, left.max(Duration::from_millis(1)))
                .map_err(|e| format!("connecting to {addr}: {e}"))?;
            s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(|e| e.to_string())?;
            s.write_all(&hello(group))
                .map_err(|e| format!("sending hello to {addr}: {e}"))?;
            let mut h = [0u8; HELLO_LEN];
            s.read_exact(&mut h)
                .map_err(|e| format!("waiting for the hello of {addr}: {e}"))?;
            match parse_hello(group, &h)? {
                r if r == peer => Ok(s),
                r => Err(format!("{addr} answered as rank {r}, expected rank {peer}")),
            }
        })();
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) => {
                tracing::debug!(rank = me, peer, error = %e, "collective connect attempt failed");
                last_err = e;
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Err(WorkerError::Collective(format!(
        "rank {me}: could not reach rank {peer} at {addr} before the bootstrap deadline: {last_err}"
    )))
}

/// Accepts every higher rank until `deadline`; refuses strangers and duplicates.
fn accept_higher(
    group: &TcpGroup,
    listener: &TcpListener,
    deadline: Instant,
) -> Result<Vec<(usize, TcpStream)>, WorkerError> {
    let (me, world) = (group.rank, group.peers.len());
    let mut got: Vec<(usize, TcpStream)> = Vec::new();
    if me + 1 == world {
        return Ok(got);
    }
    listener.set_nonblocking(true).map_err(|e| {
        WorkerError::Collective(format!("rank {me}: configuring the listener: {e}"))
    })?;
    while got.len() < world - me - 1 {
        let now = Instant::now();
        if now >= deadline {
            let missing: Vec<usize> = (me + 1..world)
                .filter(|r| got.iter().all(|(g, _)| g != r))
                .collect();
            return Err(WorkerError::Collective(format!(
                "rank {me}: ranks {missing:?} did not connect before the bootstrap deadline"
            )));
        }
        let (mut s, from) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            Err(e) => {
                return Err(WorkerError::Collective(format!(
                    "rank {me}: accepting a peer: {e}"
                )))
            }
        };
        // A connection that never says hello must not stall the others for long.
        let left = deadline
            .saturating_duration_since(now)
            .clamp(Duration::from_millis(1), Duration::from_secs(5));
        let checked = (|| -> Result<usize, String> {
            s.set_nonblocking(false).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(left)).map_err(|e| e.to_string())?;
            let mut h = [0u8; HELLO_LEN];
            s.read_exact(&mut h)
                .map_err(|e| format!("reading hello: {e}"))?;
            let r = parse_hello(group, &h)?;
            if r <= me || r >= world || got.iter().any(|(g, _)| *g == r) {
                return Err(format!("unexpected or duplicate rank {r}"));
            }
            s.write_all(&hello(group))
                .map_err(|e| format!("answering hello: {e}"))?;
            Ok(r)
        })();
        match checked {
            Ok(r) => got.push((r, s)),
            Err(e) => {
                tracing::warn!(rank = me, %from, error = %e, "refused a collective connection")
            }
        }
    }
    Ok(got)
}

fn read_exact(
    stream: &mut TcpStream,
    buf: &mut [u8],
    me: usize,
    peer: usize,
    timeout: Duration,
    writer: &PeerWriter,
) -> Result<(), WorkerError> {
    stream.read_exact(buf).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                format!("rank {me}: no data from rank {peer} within {timeout:?} (is it hung?)")
            }
            std::io::ErrorKind::UnexpectedEof => {
                format!("rank {me}: rank {peer} closed the connection (did it die?)")
            }
            _ => describe_io(me, peer, "receiving", &e),
        };
        // A failed write usually explains a failed read better.
        WorkerError::Collective(writer.failure().unwrap_or(why))
    })
}

fn describe_io(me: usize, peer: usize, what: &str, e: &std::io::Error) -> String {
    format!("rank {me}: {what} with rank {peer}: {e}")
}

fn io_error(me: usize, peer: usize, what: &str, e: std::io::Error) -> WorkerError {
    WorkerError::Collective(describe_io(me, peer, what, &e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LocalCollective;

    fn listeners(n: usize) -> (Vec<TcpListener>, Vec<String>) {
        let ls: Vec<TcpListener> = (0..n)
            .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        let addrs = ls
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect();
        (ls, addrs)
    }

    fn group(rank: usize, peers: &[String], connect_ms: u64, op_ms: u64) -> TcpGroup {
        TcpGroup {
            rank,
            peers: peers.to_vec(),
            group_id: 7,
            connect_timeout: Duration::from_millis(connect_ms),
            op_timeout: Duration::from_millis(op_ms),
            ..Default::default()
        }
    }

    /// Values of very different magnitudes, so the summation order shows in the bits.
    fn data(rank: usize, op: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = ((i * 31 + rank * 17 + op * 7) % 1000) as f32;
                (x * 0.731).sin() * 10f32.powi((i % 9) as i32 - 4)
            })
            .collect()
    }

    /// Per rank: the results of a fixed script of all-reduces and gathers.
    fn script(c: &mut dyn Collective) -> Vec<Vec<f32>> {
        let r = c.rank();
        let mut out = Vec::new();
        // The 1M-float buffer is larger than loopback socket buffers.
        for (op, n) in [(0, 1), (1, 37), (2, 1 << 20), (3, 1000)].into_iter() {
            let mut b = data(r, op, n);
            c.all_reduce_sum(&mut b).unwrap();
            out.push(b);
            if let Some(g) = c.gather(&data(r, op + 10, 5)).unwrap() {
                out.push(g);
            }
        }
        out
    }

    fn run_tcp(world: usize) -> Vec<Vec<Vec<f32>>> {
        let (ls, addrs) = listeners(world);
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let g = group(rank, &addrs, 10_000, 10_000);
                std::thread::spawn(move || {
                    let mut c = TcpCollective::connect_with_listener(&g, l).unwrap();
                    assert_eq!((c.rank(), c.world_size()), (rank, world));
                    script(&mut c)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
        v.iter()
            .map(|x| x.iter().map(|f| f.to_bits()).collect())
            .collect()
    }

    #[test]
    fn all_reduce_and_gather_equal_the_local_collective_bit_for_bit() {
        for world in [2, 3] {
            let tcp = run_tcp(world);
            let local: Vec<_> = LocalCollective::group(world)
                .into_iter()
                .map(|mut c| std::thread::spawn(move || script(&mut c)))
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect();
            for rank in 0..world {
                assert_eq!(
                    bits(&tcp[rank]),
                    bits(&local[rank]),
                    "world {world} rank {rank}"
                );
            }
            assert!(tcp[0].len() > tcp[1].len(), "only rank 0 gathers");
        }
    }

    #[test]
    fn a_single_rank_needs_no_peers() {
        let (mut ls, addrs) = listeners(1);
        let mut c = TcpCollective::connect_with_listener(&group(0, &addrs, 100, 100), ls.remove(0))
            .unwrap();
        let mut b = vec![1.5, 2.5];
        c.all_reduce_sum(&mut b).unwrap();
        assert_eq!(b, [1.5, 2.5]);
        assert_eq!(c.gather(&[3.0]).unwrap(), Some(vec![3.0]));
    }

    #[test]
    fn bootstrap_waits_for_a_peer_that_starts_late() {
        // Rank 0 binds its address only after a delay: rank 1 retries meanwhile.
        let (ls, addrs) = listeners(2);
        let addr0 = addrs[0].clone();
        drop(ls);
        let a = addrs.clone();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let mut c = TcpCollective::connect(&group(0, &a, 5000, 5000)).unwrap();
            let mut b = vec![1.0];
            c.all_reduce_sum(&mut b).unwrap();
            b
        });
        let t0 = Instant::now();
        let mut c = TcpCollective::connect(&group(1, &addrs, 5000, 5000)).unwrap();
        assert!(
            t0.elapsed() >= Duration::from_millis(200),
            "connected to {addr0} too early"
        );
        let mut b = vec![2.0];
        c.all_reduce_sum(&mut b).unwrap();
        assert_eq!(b, [3.0]);
        assert_eq!(late.join().unwrap(), [3.0]);
    }

    #[test]
    fn a_missing_peer_fails_bootstrap_at_the_deadline_naming_it() {
        let (mut ls, addrs) = listeners(2);
        let t0 = Instant::now();
        let e = TcpCollective::connect_with_listener(&group(0, &addrs, 300, 300), ls.remove(0))
            .err()
            .expect("no peer, no group");
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert!(e.to_string().contains("ranks [1] did not connect"), "{e}");
    }

    #[test]
    fn a_peer_of_another_group_is_refused() {
        let (ls, addrs) = listeners(2);
        let handles: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let g = TcpGroup {
                    group_id: rank as u64,
                    ..group(rank, &addrs, 400, 400)
                };
                std::thread::spawn(move || TcpCollective::connect_with_listener(&g, l).is_err())
            })
            .collect();
        for h in handles {
            assert!(h.join().unwrap(), "mismatched group ids must not connect");
        }
    }

    #[test]
    fn a_dead_peer_is_an_error_at_once_and_the_collective_stays_failed() {
        let (ls, addrs) = listeners(2);
        let mut it = ls.into_iter();
        let (l0, l1) = (it.next().unwrap(), it.next().unwrap());
        let a = addrs.clone();
        let dying = std::thread::spawn(move || {
            let c = TcpCollective::connect_with_listener(&group(1, &a, 5000, 30_000), l1).unwrap();
            drop(c);
        });
        let mut c =
            TcpCollective::connect_with_listener(&group(0, &addrs, 5000, 30_000), l0).unwrap();
        dying.join().unwrap();
        let t0 = Instant::now();
        let e = c.all_reduce_sum(&mut [1.0; 8]).unwrap_err().to_string();
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "took {:?}",
            t0.elapsed()
        );
        assert!(e.contains("rank 1"), "{e}");
        let again = c.gather(&[1.0]).unwrap_err().to_string();
        assert!(again.contains("failed earlier"), "{again}");
    }

    #[test]
    fn a_hung_peer_times_out() {
        let (ls, addrs) = listeners(2);
        let mut it = ls.into_iter();
        let (l0, l1) = (it.next().unwrap(), it.next().unwrap());
        let a = addrs.clone();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let hung = std::thread::spawn(move || {
            let _c = TcpCollective::connect_with_listener(&group(1, &a, 5000, 5000), l1).unwrap();
            // Alive but never joins the all-reduce.
            let _ = done_rx.recv();
        });
        let mut c = TcpCollective::connect_with_listener(&group(0, &addrs, 5000, 300), l0).unwrap();
        let t0 = Instant::now();
        let e = c.all_reduce_sum(&mut [1.0; 4]).unwrap_err().to_string();
        assert!(t0.elapsed() >= Duration::from_millis(250));
        assert!(t0.elapsed() < Duration::from_secs(3));
        assert!(e.contains("no data from rank 1"), "{e}");
        done_tx.send(()).unwrap();
        hung.join().unwrap();
    }
}
