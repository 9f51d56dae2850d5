//! Splices a WebSocket tunnel: client and backend bytes both ways, in one task.
//!
//! An idle plain-TCP tunnel owns no buffer (TLS tunnels copy through rustls and two 16 KiB
//! buffers, see `Buffered`). The task waits on socket readiness; when a socket is
//! readable, bytes are read into a per-thread scratch buffer and written straight to the
//! other socket. Only what the other socket cannot take right away is copied into a
//! per-direction buffer, freed as soon as it drains. A FIN one way is passed on as a write
//! shutdown while the other way keeps flowing. A failed read ends both ways; a write that
//! finds its peer gone ends only its way, once the other has delivered what it holds.
//!
//! Every way a tunnel ends comes back to [`run`] as an [`End`], decided in one place; a
//! future graceful close (a WebSocket Close frame between frames) belongs in `drive`, which
//! still owns both sockets when it decides.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use duplex_metrics::{Counter, TunnelLife, TunnelSeries};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::Interest;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::send_timeout::{Queued, SendTimeout};
use crate::tls::{BackendStream, ClientStream, MaybeTls};

/// Scratch buffer per worker thread; large enough to move 16 KiB messages in one read.
const SCRATCH_SIZE: usize = 64 * 1024;
/// Reads one direction may do in a row before yielding to other tasks.
const READS_PER_POLL: usize = 16;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH_SIZE].into_boxed_slice());
}

/// Per-tunnel settings from the upstream.
pub struct Settings {
    pub idle_timeout: Option<Duration>,
    /// Cancelled when the tunnel must close now (end of the shutdown grace period).
    pub close: CancellationToken,
}

/// How long a half-closed tunnel (one side has ended its sending, the other has not) may
/// stay without a byte moving before it is closed: a WebSocket peer that has received its
/// peer's end closes its own side at once, so one that stays silent is gone or stuck (a
/// frozen client after the backend closed on a deploy). Without a bound such a tunnel
/// would hold its backend's load mark, a drain and a connection slot for good. HAProxy's
/// `timeout client-fin` and `server-fin` play this part; nginx's `proxy_read_timeout`
/// (60 s) bounds every tunnel this way.
pub const HALF_CLOSED_IDLE: Duration = Duration::from_secs(60);

/// How long a tunnel with nothing left to deliver (one side is gone, and the other has
/// been given everything and its end) goes on reading, and dropping, what its live side
/// still sends: time for that side to take the end it was given, since its socket closed
/// with bytes unread would be reset, and could lose them. A peer that streams on
/// regardless would otherwise be read at full speed for [`HALF_CLOSED_IDLE`]. nginx's
/// `lingering_timeout` plays the same part for HTTP clients.
pub const LINGER: Duration = Duration::from_secs(2);

/// How a tunnel ended.
#[derive(Debug)]
enum End {
    /// Both sides finished sending.
    Done,
    Error(io::Error),
    Idle,
    /// Half-closed and quiet for [`HALF_CLOSED_IDLE`].
    HalfClosedIdle,
    /// Nothing left to deliver, and [`LINGER`] passed.
    Lingered,
    Closed,
}

/// Waits for the client's side of an upgrade, then spawns the tunnel as its own lean task
/// on `tracker`. Awaiting the upgrade happens in this short-lived future, so the
/// long-lived task holds only what a running tunnel needs. `backend` is the backend's
/// socket with the bytes it sent after its 101. `hold` is whatever must live as long as
/// the tunnel: the backend's load mark and the client connection's bookkeeping.
pub async fn start<H: Send + 'static>(
    client: OnUpgrade,
    backend: (BackendStream, Bytes),
    settings: Settings,
    series: TunnelSeries,
    hold: H,
    tracker: TaskTracker,
) {
    // The client's side is ready once hyper has written our 101.
    let client = match client.await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!(error = %crate::error::ProxyError::Client(e), "upgrade did not complete");
            return;
        }
    };
    // Only the proxy's own stream type is ever upgraded.
    let Ok(c) = client.downcast::<TokioIo<SendTimeout<ClientStream>>>() else {
        tracing::error!("upgraded connection of an unexpected type; closing");
        return;
    };
    let (backend, backend_early) = backend;
    let TunnelSeries {
        client_to_backend: c2b,
        backend_to_client: b2c,
        life,
    } = series;
    let mut client = c.io.into_inner().into_inner();
    if let MaybeTls::Tls(tls) = &mut client {
        // A tunnel is bounded by the upstream's `idle_timeout`, not the listener's
        // `send_timeout`, which sits under TLS on the socket.
        tls.get_mut().0.disarm();
    }
    match (client, backend) {
        (MaybeTls::Plain(client), MaybeTls::Plain(backend)) => {
            let t = Splice {
                client,
                backend,
                c2b: Direction::new(c.read_buf, c2b),
                b2c: Direction::new(backend_early, b2c),
                active: false,
                broken: None,
            };
            tracker.spawn(run(t, settings, life, hold));
        }
        (client, backend) => {
            let t = Buffered::new(client, c.read_buf, c2b, backend, backend_early, b2c);
            tracker.spawn(run(t, settings, life, hold));
        }
    }
}

/// Runs a tunnel to its end and accounts for it. A plain function returning a future
/// rather than an `async fn`: the state is moved into the future once, where an `async fn`
/// would keep its arguments and their moved copies side by side (hundreds of bytes per idle
/// tunnel).
fn run<P: Pump, H>(
    t: P,
    settings: Settings,
    series: TunnelLife,
    hold: H,
) -> impl Future<Output = ()> {
    let mut state = Running {
        t,
        settings,
        series,
        _hold: hold,
        started: Instant::now(),
    };
    async move {
        state.series.active.inc();
        let end = drive(&mut state.t, &state.settings).await;
        // The one place a tunnel's end is known; its sockets close with `state` below.
        match &end {
            End::Done => tracing::debug!("tunnel closed by both sides"),
            End::Error(e) => tracing::debug!(error = %e, "tunnel ended by an error"),
            End::Idle => tracing::debug!("tunnel closed after idle_timeout"),
            End::HalfClosedIdle => tracing::debug!(
                "tunnel closed: one side ended and the other stayed quiet for {HALF_CLOSED_IDLE:?}"
            ),
            End::Lingered => tracing::debug!(
                "tunnel closed: one side is gone, and the other had taken all it was owed {LINGER:?} before"
            ),
            End::Closed => tracing::debug!("tunnel closed by duplex"),
        }
        let Running {
            t,
            settings,
            series,
            _hold: hold,
            started,
        } = state;
        // Sockets, then the load count, then the gauge: whoever sees the gauge at zero
        // sees the backend's load released too.
        drop((t, settings));
        drop(hold);
        series.active.dec();
        series.duration.observe(started.elapsed().as_secs_f64());
    }
}

/// Everything a running tunnel owns.
struct Running<P, H> {
    t: P,
    settings: Settings,
    series: TunnelLife,
    /// Released when the tunnel ends: the backend's load mark and the connection's gauge.
    _hold: H,
    started: Instant,
}

/// The idle timer ticks this many times per `idle_timeout`: a quiet tunnel closes between
/// `idle_timeout` and `idle_timeout * (1 + 1/IDLE_TICKS)` after its last byte, while a
/// read costs only a flag write, never a timer reset.
const IDLE_TICKS: u32 = 8;

/// What `drive` runs: both directions of a tunnel, and whether bytes moved lately.
trait Pump {
    /// Ready once both directions are done.
    fn poll_pump(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Whether any byte moved since the last call.
    fn take_active(&mut self) -> bool;
    /// Whether one side's end of sending has been passed on to the other.
    fn half_closed(&self) -> bool;
    /// Whether nothing is left to deliver: one direction's destination is gone, and the
    /// other direction is done.
    fn lingering(&self) -> bool;
}

/// The bound on a quiet half-closed tunnel in force: [`HALF_CLOSED_IDLE`], which tests
/// may shorten for their thread (a function rather than a field or an argument, so that
/// no tunnel carries it).
fn half_closed_idle() -> Duration {
    #[cfg(test)]
    if let Some(d) = tests::HALF_CLOSED_IDLE.with(std::cell::Cell::get) {
        return d;
    }
    HALF_CLOSED_IDLE
}

/// How far a tunnel is toward its end, for the quiet bound in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Open,
    /// One side's end has been passed on: [`HALF_CLOSED_IDLE`].
    HalfClosed,
    /// Nothing left to deliver: [`LINGER`].
    Lingering,
}

/// The idle timer's state, owned by `drive`'s poll function.
struct Quiet {
    /// One eighth of the bound in force, if any.
    tick: Option<Duration>,
    /// Ticks in a row without a byte moved.
    ticks: u32,
    /// The furthest stage seen: the bound of each is taken when shorter than the one in
    /// force.
    stage: Stage,
    /// The stage whose bound is in force.
    bound_by: Stage,
    /// Only tunnels with an idle timeout, or half-closed, carry a timer (boxed, so the
    /// others pay nothing).
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Runs both directions until the tunnel ends.
async fn drive(t: &mut impl Pump, settings: &Settings) -> End {
    let tick = settings.idle_timeout.map(|d| d / IDLE_TICKS);
    let mut q = Quiet {
        tick,
        ticks: 0,
        stage: Stage::Open,
        bound_by: Stage::Open,
        sleep: tick.map(|t| Box::pin(tokio::time::sleep(t))),
    };
    let close = settings.close.cancelled();
    tokio::pin!(close);
    poll_fn(move |cx| {
        match t.poll_pump(cx) {
            Poll::Ready(Ok(())) => return Poll::Ready(End::Done),
            Poll::Ready(Err(e)) => return Poll::Ready(End::Error(e)),
            Poll::Pending => {}
        }
        if close.as_mut().poll(cx).is_ready() {
            return Poll::Ready(End::Closed);
        }
        let stage = if t.lingering() {
            Stage::Lingering
        } else if t.half_closed() {
            Stage::HalfClosed
        } else {
            Stage::Open
        };
        if stage > q.stage {
            q.stage = stage;
            let bound = match stage {
                Stage::Lingering => LINGER,
                _ => half_closed_idle(),
            };
            if bound < q.tick.map_or(Duration::MAX, |t| t * IDLE_TICKS) {
                q.bound_by = stage;
                let next = bound / IDLE_TICKS;
                // The quiet time counted so far still counts, in the shorter ticks: the
                // tunnel closes no later than the longer bound would have closed it. The
                // linger is a grace from now, not a bound on quiet: it starts at zero.
                q.ticks = match (stage, q.tick) {
                    (Stage::Lingering, _) | (_, None) => 0,
                    (_, Some(old)) => {
                        let quiet = old * q.ticks;
                        let ticks = quiet.as_nanos() / next.as_nanos().max(1);
                        u32::try_from(ticks).unwrap_or(u32::MAX).min(IDLE_TICKS - 1)
                    }
                };
                q.tick = Some(next);
                let at = tokio::time::Instant::now() + next;
                match q.sleep.as_mut() {
                    Some(s) => s.as_mut().reset(at),
                    None => q.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
                }
            }
        }
        if let (Some(tick), Some(sleep)) = (q.tick, q.sleep.as_mut()) {
            while sleep.as_mut().poll(cx).is_ready() {
                q.ticks = if t.take_active() { 0 } else { q.ticks + 1 };
                if q.ticks >= IDLE_TICKS {
                    return Poll::Ready(match q.bound_by {
                        Stage::Open => End::Idle,
                        Stage::HalfClosed => End::HalfClosedIdle,
                        Stage::Lingering => End::Lingered,
                    });
                }
                sleep.as_mut().reset(tokio::time::Instant::now() + tick);
            }
        }
        Poll::Pending
    })
    .await
}

/// Both sockets of a plain-TCP tunnel and the state of each direction.
struct Splice {
    client: TcpStream,
    backend: TcpStream,
    c2b: Direction,
    b2c: Direction,
    /// Set by any byte moved; cleared by the idle timer.
    active: bool,
    /// A write failed (that side is gone): the tunnel ends with this once the other
    /// direction has delivered what it holds. Only the kind and the side, which fit beside
    /// `active` (a whole error would grow every tunnel's task by an allocation step).
    broken: Option<(io::ErrorKind, Side)>,
}

/// Which of a tunnel's sockets failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Client,
    Backend,
}

/// A tunnel's error, with the side whose socket gave it.
#[derive(Debug, thiserror::Error)]
#[error("{} side: {source}", match .side { Side::Client => "client", Side::Backend => "backend" })]
struct SideError {
    side: Side,
    #[source]
    source: io::Error,
}

impl SideError {
    fn io(side: Side, source: io::Error) -> io::Error {
        io::Error::new(source.kind(), SideError { side, source })
    }
}

/// How a direction failed: reading its source, or writing to its destination.
enum Broke {
    Read(io::Error),
    Write(io::Error),
}

/// One direction of the tunnel.
struct Direction {
    /// Bytes read but not yet written; `None` (one word, no allocation) while the tunnel
    /// keeps up, as idle tunnels always do.
    pending: Option<Box<Bytes>>,
    read_done: bool,
    shut_down: bool,
    /// The destination is gone: what the source still sends is read and dropped, until
    /// its end (see [`discard`]).
    discard: bool,
    bytes: Counter,
}

impl Direction {
    fn new(early: Bytes, bytes: Counter) -> Direction {
        // Bytes that arrived with the handshake go first.
        bytes.inc_by(early.len() as u64);
        Direction {
            pending: (!early.is_empty()).then(|| Box::new(early)),
            read_done: false,
            shut_down: false,
            discard: false,
            bytes,
        }
    }

    fn finished(&self) -> bool {
        self.shut_down
    }

    /// Its destination is gone: nothing more can be delivered, nor is its end passed on;
    /// the source is still read, and what it sends dropped.
    fn give_up(&mut self) {
        self.pending = None;
        self.discard = true;
    }
}

impl Pump for Splice {
    fn take_active(&mut self) -> bool {
        std::mem::take(&mut self.active)
    }

    fn half_closed(&self) -> bool {
        let ended = |d: &Direction| d.finished() || d.discard;
        ended(&self.c2b) || ended(&self.b2c)
    }

    /// One direction's destination is gone, and the other direction has handed all it
    /// had to the kernel, which has it acknowledged by the live peer: closing that socket
    /// with bytes still queued could reset them away. Where the queue cannot be read, a
    /// tunnel never lingers, and ends by the half-closed bound.
    fn lingering(&self) -> bool {
        let drained = |sock: &TcpStream| sock.queued() == Some(0);
        (self.c2b.discard && self.b2c.finished() && drained(&self.client))
            || (self.b2c.discard && self.c2b.finished() && drained(&self.backend))
    }

    /// A failed read ends the tunnel: that side is gone, and whatever the other direction
    /// holds was for it. A failed write ends only its direction: the other one may still
    /// hold bytes that side sent before it went (read, or queued in our socket), which its
    /// peer is owed; it ends when those are delivered, at the read of the error or EOF.
    fn poll_pump(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let a = direction(
            cx,
            (&self.client, Side::Client),
            (&mut self.backend, Side::Backend),
            &mut self.c2b,
            &mut self.active,
            &mut self.broken,
        )?;
        let b = direction(
            cx,
            (&self.backend, Side::Backend),
            (&mut self.client, Side::Client),
            &mut self.b2c,
            &mut self.active,
            &mut self.broken,
        )?;
        if a.is_ready() && b.is_ready() && self.c2b.finished() && self.b2c.finished() {
            Poll::Ready(
                self.broken
                    .take()
                    .map_or(Ok(()), |(kind, side)| Err(SideError::io(side, kind.into()))),
            )
        } else {
            Poll::Pending
        }
    }
}

/// Polls one direction; one whose destination is found gone is polled again at once, to
/// start discarding (and be woken by its source).
fn direction(
    cx: &mut Context<'_>,
    (from, from_side): (&TcpStream, Side),
    (to, to_side): (&mut TcpStream, Side),
    d: &mut Direction,
    active: &mut bool,
    broken: &mut Option<(io::ErrorKind, Side)>,
) -> Poll<io::Result<()>> {
    let sides = (from_side, to_side);
    let was_discarding = d.discard;
    let polled = settle(pump(cx, from, to, d, active), d, sides, broken);
    if d.discard && !was_discarding {
        return settle(pump(cx, from, to, d, active), d, sides, broken);
    }
    polled
}

/// A direction's poll, with a failed write turned into that direction's end (the error
/// kept for the tunnel's) and a failed read returned.
fn settle(
    polled: Poll<Result<(), Broke>>,
    d: &mut Direction,
    (from_side, to_side): (Side, Side),
    broken: &mut Option<(io::ErrorKind, Side)>,
) -> Poll<io::Result<()>> {
    match polled {
        Poll::Ready(Err(Broke::Read(e))) => Poll::Ready(Err(SideError::io(from_side, e))),
        // Only a peer that is gone (its socket reset or closed under us): any other write
        // error leaves a live socket that would never hear the end of this direction.
        Poll::Ready(Err(Broke::Write(e))) if gone(&e) => {
            tracing::debug!(error = %e, "tunnel: one side is gone; delivering what the other sent before");
            d.give_up();
            broken.get_or_insert((e.kind(), to_side));
            Poll::Ready(Ok(()))
        }
        Poll::Ready(Err(Broke::Write(e))) => Poll::Ready(Err(SideError::io(to_side, e))),
        Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
        Poll::Pending => Poll::Pending,
    }
}

/// Reads `from` to its end and drops what comes, for a direction whose destination is gone:
/// a socket closed with bytes unread sends a reset, which would destroy what the other
/// direction is still delivering to the same peer. Not activity for the idle timers.
fn discard(cx: &mut Context<'_>, from: &TcpStream, d: &mut Direction) -> Poll<Result<(), Broke>> {
    for _ in 0..READS_PER_POLL {
        ready!(from.poll_read_ready(cx)).map_err(Broke::Read)?;
        let read = SCRATCH.with(|s| from.try_read(&mut s.borrow_mut()[..]));
        match read {
            Ok(0) => {
                d.read_done = true;
                d.shut_down = true;
                return Poll::Ready(Ok(()));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(Broke::Read(e))),
        }
    }
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// Whether a failed write says the peer's socket is gone for good.
fn gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::TimedOut
    )
}

/// Moves bytes `from` → `to` until `from` would block; ready once EOF has been passed on.
fn pump(
    cx: &mut Context<'_>,
    from: &TcpStream,
    to: &mut TcpStream,
    d: &mut Direction,
    active: &mut bool,
) -> Poll<Result<(), Broke>> {
    if d.discard {
        return discard(cx, from, d);
    }
    for _ in 0..READS_PER_POLL {
        // Drain what the other side could not take yet.
        while let Some(pending) = d.pending.as_mut() {
            ready!(to.poll_write_ready(cx)).map_err(Broke::Write)?;
            match to.try_write(pending) {
                Ok(n) => {
                    let _ = pending.split_to(n);
                    // A backlog draining slowly is not an idle tunnel.
                    *active = true;
                    if pending.is_empty() {
                        d.pending = None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(Broke::Write(e))),
            }
        }
        if d.read_done {
            if !d.shut_down {
                ready!(Pin::new(&mut *to).poll_shutdown(cx)).map_err(Broke::Write)?;
                d.shut_down = true;
            }
            return Poll::Ready(Ok(()));
        }
        ready!(from.poll_read_ready(cx)).map_err(Broke::Read)?;
        let moved = SCRATCH.with(|s| -> Result<Option<usize>, Broke> {
            let mut s = s.borrow_mut();
            // A short read emptied the socket: the outer `try_io` then clears read readiness
            // now rather than learn it from one more read that returns EAGAIN (nginx's
            // trick; edge-triggered readiness wakes us for anything that arrives after).
            // The readiness it clears is the one it saw before the read, so an event that
            // another worker's I/O driver records meanwhile is kept, not swallowed.
            let mut short = 0;
            let n = match from.try_io(Interest::READABLE, || match from.try_read(&mut s[..]) {
                Ok(n) if n > 0 && n < s.len() => {
                    short = n;
                    Err(io::ErrorKind::WouldBlock.into())
                }
                other => other,
            }) {
                Ok(0) => return Ok(None),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && short > 0 => short,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Some(0)),
                Err(e) => return Err(Broke::Read(e)),
            };
            let mut off = 0;
            while off < n {
                match to.try_write(&s[off..n]) {
                    Ok(m) => off += m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(Broke::Write(e)),
                }
            }
            if off < n {
                d.pending = Some(Box::new(Bytes::copy_from_slice(&s[off..n])));
            }
            Ok(Some(n))
        });
        match moved? {
            None => d.read_done = true,
            Some(0) => {}
            Some(n) => {
                d.bytes.inc_by(n as u64);
                *active = true;
            }
        }
    }
    // Budget spent with data still flowing: let other tasks run, then come back.
    cx.waker().wake_by_ref();
    Poll::Pending
}

/// Buffer per direction of a TLS tunnel, where bytes pass through rustls anyway.
const TLS_BUFFER: usize = 16 * 1024;

/// A tunnel with TLS on either side: tokio's bidirectional copy through buffers, each side
/// wrapped to count bytes as they are read.
struct Buffered {
    copy: Pin<Box<dyn Future<Output = io::Result<()>> + Send>>,
    flags: Arc<Flags>,
}

/// What a [`Buffered`] tunnel's two sides tell the timers.
#[derive(Default)]
struct Flags {
    /// Set by any byte read or written; cleared by the idle timer.
    active: AtomicBool,
    /// Set once either side has been shut down for writing: an end passed on.
    half_closed: AtomicBool,
}

impl Buffered {
    fn new(
        client: ClientStream,
        client_early: Bytes,
        c2b: Counter,
        backend: BackendStream,
        backend_early: Bytes,
        b2c: Counter,
    ) -> Buffered {
        let flags = Arc::new(Flags::default());
        let shared = Arc::clone(&flags);
        let copy = async move {
            let mut client = Counting {
                io: client,
                bytes: c2b,
                flags: Arc::clone(&shared),
            };
            let mut backend = Counting {
                io: backend,
                bytes: b2c,
                flags: shared,
            };
            // Bytes that arrived with the handshakes go first.
            client.bytes.inc_by(client_early.len() as u64);
            backend.io.write_all(&client_early).await?;
            backend.io.flush().await?;
            backend.bytes.inc_by(backend_early.len() as u64);
            client.io.write_all(&backend_early).await?;
            client.io.flush().await?;
            tokio::io::copy_bidirectional_with_sizes(
                &mut client,
                &mut backend,
                TLS_BUFFER,
                TLS_BUFFER,
            )
            .await?;
            Ok(())
        };
        Buffered {
            copy: Box::pin(copy),
            flags,
        }
    }
}

impl Pump for Buffered {
    fn poll_pump(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.copy.as_mut().poll(cx)
    }

    fn take_active(&mut self) -> bool {
        self.flags.active.swap(false, Ordering::Relaxed)
    }

    fn half_closed(&self) -> bool {
        self.flags.half_closed.load(Ordering::Relaxed)
    }

    /// The buffered copy (TLS toward a backend) ends at the first write error: it never
    /// discards, so it never lingers.
    fn lingering(&self) -> bool {
        false
    }
}

/// A stream whose reads are counted: what is read from one side is what goes to the other.
struct Counting<S> {
    io: S,
    bytes: Counter,
    flags: Arc<Flags>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counting<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = match Pin::new(&mut self.io).poll_read(cx, buf) {
            // A TLS peer that ends its side with a bare TCP FIN, without close_notify
            // (rustls's UnexpectedEof): an end of stream like any other, so the tunnel
            // half-closes and the other direction carries on, rather than both ending at
            // once and what the other side still had to say being lost. WebSocket frames
            // carry their own lengths, so a cut-off message is still seen as one.
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(())),
            res => res,
        };
        let n = buf.filled().len() - before;
        if n > 0 {
            self.bytes.inc_by(n as u64);
            self.flags.active.store(true, Ordering::Relaxed);
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counting<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(1..)) = res {
            // A backlog draining slowly is not an idle tunnel.
            self.flags.active.store(true, Ordering::Relaxed);
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.io).poll_shutdown(cx);
        if res.is_ready() {
            self.flags.half_closed.store(true, Ordering::Relaxed);
        }
        res
    }
}
#[cfg(test)]
mod tests;
