//! A device's command inbox: a short FIFO in which a `stop` is never queued behind other
//! work. A stop goes to the front, and the commands it overtakes are answered "superseded"
//! (a queued pause or start has no meaning once the instrument is told to stop).
//! A command whose sender stopped waiting (its deadline passed and it was reported
//! `timeout`) is dropped unexecuted when it reaches the front.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::Notify;

use super::{CommandKind, Control};

/// Commands other than stop that may wait for one device.
pub const QUEUE_LIMIT: usize = 8;

#[derive(Default)]
struct Shared {
    queue: Mutex<State>,
    wake: Notify,
}

#[derive(Default)]
struct State {
    items: VecDeque<Control>,
    senders: usize,
}

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    // A panic while holding this lock cannot leave the queue half-changed (every
    // operation is one push or pop), so a poisoned lock is still usable.
    s.queue.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The device task's end.
pub struct Inbox(Arc<Shared>);

/// The command router's end (cloneable).
pub struct Outbox(Arc<Shared>);

/// Why a command could not be queued; it comes back with the error.
#[derive(Debug)]
pub enum Refused {
    /// The device is still handling a command; the control is handed back.
    Busy(Control),
    /// The device's task has ended; the control is handed back.
    Closed(Control),
}

/// A device's control channel: the router's sending half and the driver's receiving half.
pub fn inbox() -> (Outbox, Inbox) {
    let shared = Arc::new(Shared::default());
    lock(&shared).senders = 1;
    (Outbox(shared.clone()), Inbox(shared))
}

impl Clone for Outbox {
    fn clone(&self) -> Self {
        lock(&self.0).senders += 1;
        Outbox(self.0.clone())
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        lock(&self.0).senders -= 1;
        self.0.wake.notify_one();
    }
}

impl Outbox {
    /// Queues a command. A stop always gets in, at the front.
    pub fn send(&self, c: Control) -> Result<(), Refused> {
        if Arc::strong_count(&self.0) <= lock(&self.0).senders {
            return Err(Refused::Closed(c));
        }
        let superseded = {
            let mut st = lock(&self.0);
            if c.command == CommandKind::Stop {
                let old: Vec<Control> = st.items.drain(..).collect();
                st.items.push_back(c);
                old
            } else if st.items.len() >= QUEUE_LIMIT {
                return Err(Refused::Busy(c));
            } else {
                st.items.push_back(c);
                Vec::new()
            }
        };
        for old in superseded {
            let text = if old.command == CommandKind::Stop {
                "superseded by a newer stop"
            } else {
                "superseded by a stop"
            };
            let _ = old.reply.send(Err(text.into()));
        }
        self.0.wake.notify_one();
        Ok(())
    }
}

impl Inbox {
    /// The next command, or `None` once every sender is gone. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Control> {
        loop {
            let notified = self.0.wake.notified();
            match self.try_recv() {
                Ok(c) => return Some(c),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => notified.await,
            }
        }
    }

    /// The next control, if one is waiting.
    pub fn try_recv(&self) -> Result<Control, TryRecvError> {
        let mut st = lock(&self.0);
        loop {
            match st.items.pop_front() {
                Some(c) if c.reply.is_closed() => {
                    tracing::info!(
                        command = c.command.as_str(),
                        "command dropped unexecuted: its deadline passed while it waited"
                    );
                }
                Some(c) => return Ok(c),
                None if st.senders == 0 => return Err(TryRecvError::Disconnected),
                None => return Err(TryRecvError::Empty),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::oneshot;

    fn control(kind: CommandKind) -> (Control, oneshot::Receiver<Result<String, String>>) {
        let (reply, rx) = oneshot::channel();
        (
            Control {
                command: kind,
                params: Default::default(),
                command_id: "c".into(),
                issuer: None,
                reply,
            },
            rx,
        )
    }

    #[tokio::test]
    async fn stop_overtakes_queued_work_which_is_answered_superseded() {
        let (tx, mut rx) = inbox();
        let (pause, mut pause_rx) = control(CommandKind::Pause);
        let (start, mut start_rx) = control(CommandKind::Start);
        let (stop, _stop_rx) = control(CommandKind::Stop);
        tx.send(pause).unwrap();
        tx.send(start).unwrap();
        tx.send(stop).unwrap();
        assert_eq!(rx.recv().await.map(|c| c.command), Some(CommandKind::Stop));
        assert!(matches!(rx.try_recv(), Err(TryRecvError::Empty)));
        assert_eq!(
            pause_rx.try_recv().unwrap(),
            Err("superseded by a stop".into())
        );
        assert_eq!(
            start_rx.try_recv().unwrap(),
            Err("superseded by a stop".into())
        );
    }

    #[tokio::test]
    async fn a_full_queue_refuses_work_but_never_a_stop() {
        let (tx, mut rx) = inbox();
        let mut waiting = Vec::new();
        for _ in 0..QUEUE_LIMIT {
            let (c, r) = control(CommandKind::Pause);
            tx.send(c).unwrap();
            waiting.push(r);
        }
        assert!(matches!(
            tx.send(control(CommandKind::Resume).0),
            Err(Refused::Busy(_))
        ));
        let (stop, _stop_rx) = control(CommandKind::Stop);
        tx.send(stop).unwrap();
        assert_eq!(rx.recv().await.map(|c| c.command), Some(CommandKind::Stop));
    }

    #[tokio::test]
    async fn receiver_sees_the_end_when_senders_are_gone_and_senders_see_a_closed_inbox() {
        let (tx, mut rx) = inbox();
        let tx2 = tx.clone();
        drop(tx);
        let (pause, _pause_rx) = control(CommandKind::Pause);
        tx2.send(pause).unwrap();
        drop(tx2);
        assert!(rx.recv().await.is_some());
        assert!(rx.recv().await.is_none());

        let (tx, rx) = inbox();
        drop(rx);
        assert!(matches!(
            tx.send(control(CommandKind::Stop).0),
            Err(Refused::Closed(_))
        ));
    }

    #[tokio::test]
    async fn a_command_nobody_waits_for_any_more_is_not_executed() {
        let (tx, mut rx) = inbox();
        let (pause, pause_rx) = control(CommandKind::Pause);
        let (resume, _resume_rx) = control(CommandKind::Resume);
        tx.send(pause).unwrap();
        tx.send(resume).unwrap();
        drop(pause_rx);
        assert_eq!(
            rx.recv().await.map(|c| c.command),
            Some(CommandKind::Resume)
        );
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_on_send() {
        let (tx, mut rx) = inbox();
        let waiter = tokio::spawn(async move { rx.recv().await.map(|c| c.command) });
        tokio::task::yield_now().await;
        let (resume, _resume_rx) = control(CommandKind::Resume);
        tx.send(resume).unwrap();
        assert_eq!(waiter.await.unwrap(), Some(CommandKind::Resume));
    }
}
