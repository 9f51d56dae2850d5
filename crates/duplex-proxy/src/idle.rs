//! A timer for "nothing moved for this long", cheap when things do move.
//!
//! Used where a peer may stall a transfer: a client that stops reading a response
//! ([`crate::send_timeout`]), a client that stops sending a request body and a backend
//! that stops sending a response body ([`crate::http_proxy`]). The timer is armed only
//! the first time the transfer has to wait, so a transfer that never waits (most of them)
//! never touches tokio's timer wheel; progress marks it for re-arming before the next
//! wait rather than resetting it each time.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Fires once `idle` has passed without progress while the transfer waits.
pub struct IdleTimer {
    idle: Duration,
    /// Armed the first time the transfer has to wait; kept for later waits.
    timer: Option<Pin<Box<Sleep>>>,
    /// Progress since the timer was armed: re-arm it before waiting again.
    moved: bool,
}

impl IdleTimer {
    pub fn new(idle: Duration) -> IdleTimer {
        IdleTimer {
            idle,
            timer: None,
            moved: false,
        }
    }

    pub fn idle(&self) -> Duration {
        self.idle
    }

    /// Records progress: the next wait gets the whole `idle` again.
    pub fn moved(&mut self) {
        self.moved = true;
    }

    /// Called when the transfer has to wait: whether `idle` has passed since the last
    /// progress. When not, `cx` is woken when it will have.
    pub fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let idle = self.idle;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
        if std::mem::take(&mut self.moved) {
            timer.as_mut().reset(Instant::now() + idle);
        }
        timer.as_mut().poll(cx).is_ready()
    }
}
