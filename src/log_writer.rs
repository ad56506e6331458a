//! The log sink: every thread appends its formatted line to one shared buffer, and a thread of its own
//! writes that buffer to stderr in blocks.
//!
//! Why not a channel with a writer thread (tracing-appender's non-blocking writer): with one line per
//! decision, its writer thread drains the channel, flushes and parks between two lines, so every line
//! costs a wake-up of that thread and a `write(2)` — at saturation a few microseconds per decision, the
//! largest item of a token-cache hit. Here a line costs a short critical section and a copy; the writer
//! thread wakes [`FLUSH_EVERY`] after the first line of a block (or sooner, when [`FLUSH_AT`] bytes are
//! waiting), and writes all of them at once. With nothing to write it sleeps until a line comes: the
//! logging thread that finds the buffer empty and the writer asleep wakes it, so an idle sidecar is not
//! woken at all, and under load, where the buffer is never empty for long, no line pays for a wake-up.
//! Nothing is dropped: past [`MAX_PENDING`] bytes a logging thread waits for the writer (stderr that
//! cannot keep up slows the service rather than losing its audit trail).
//!
//! A line reaches stderr at most [`FLUSH_EVERY`] after it was logged; on exit [`LogGuard`] writes what
//! is left. What a SIGKILL interrupts in the last [`FLUSH_EVERY`] is lost, as with any user-space buffer.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a line may wait in the buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// The writer thread is woken early when this much is waiting.
pub const FLUSH_AT: usize = 64 * 1024;
/// Logging threads wait for the writer beyond this much.
pub const MAX_PENDING: usize = 8 * 1024 * 1024;

#[derive(Default)]
struct State {
    pending: Vec<u8>,
    closed: bool,
    /// The writer is asleep until a line comes (nothing was pending): the next line wakes it.
    writer_idle: bool,
    /// Logging threads waiting for room, past [`MAX_PENDING`]: only then is `room` signalled.
    room_waiters: usize,
}

struct Shared {
    state: Mutex<State>,
    /// The writer thread waits on it: signalled at [`FLUSH_AT`] and at close.
    wake: Condvar,
    /// Logging threads past [`MAX_PENDING`] wait on it: signalled after every block written.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A thread that panicked while holding the lock left a valid byte buffer: keep logging.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A `MakeWriter` for the fmt layer: appends each line to the shared buffer, or writes it to stderr
/// directly when the writer thread could not be started or has stopped.
#[derive(Clone)]
pub struct BlockWriter {
    shared: Option<Arc<Shared>>,
}

/// Keep it until the process ends: dropping it writes what is left and stops the writer thread.
pub struct LogGuard {
    shared: Option<Arc<Shared>>,
    thread: Option<JoinHandle<()>>,
}

/// A block writer to stderr, and the guard that flushes it at exit.
pub fn stderr() -> (BlockWriter, LogGuard) {
    spawn(io::stderr)
}

/// A block writer to the sink `open` makes on the writer thread.
pub fn spawn<W, F>(open: F) -> (BlockWriter, LogGuard)
where
    W: Write,
    F: FnOnce() -> W + Send + 'static,
{
    let shared = Arc::new(Shared {
        state: Mutex::new(State::default()),
        wake: Condvar::new(),
        room: Condvar::new(),
    });
    let worker = shared.clone();
    match std::thread::Builder::new()
        .name("s2s-authz-log".to_owned())
        .spawn(move || write_blocks(&worker, open()))
    {
        Ok(thread) => (
            BlockWriter {
                shared: Some(shared.clone()),
            },
            LogGuard {
                shared: Some(shared),
                thread: Some(thread),
            },
        ),
        Err(_) => (
            BlockWriter { shared: None },
            LogGuard {
                shared: None,
                thread: None,
            },
        ),
    }
}

/// The writer thread: sleeps until a line is pending, gives it [`FLUSH_EVERY`] of company (less when
/// woken at [`FLUSH_AT`] or by close), and writes the block outside the lock; until closed and empty.
fn write_blocks(shared: &Shared, mut sink: impl Write) {
    let mut block = Vec::with_capacity(FLUSH_AT);
    loop {
        let closed = {
            let mut state = shared.lock();
            while state.pending.is_empty() && !state.closed {
                state.writer_idle = true;
                state = shared.wake.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            state.writer_idle = false;
            if state.pending.len() < FLUSH_AT && !state.closed {
                state = shared
                    .wake
                    .wait_timeout(state, FLUSH_EVERY)
                    .map_or_else(|e| e.into_inner().0, |(s, _)| s);
            }
            std::mem::swap(&mut state.pending, &mut block);
            state.closed
        };
        if !block.is_empty() {
            // Nowhere to report a failing stderr; the lines are dropped rather than retried forever.
            let _ = sink.write_all(&block).and_then(|()| sink.flush());
            block.clear();
            if shared.lock().room_waiters > 0 {
                shared.room.notify_all();
            }
        }
        if closed && shared.lock().pending.is_empty() {
            return;
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            shared.lock().closed = true;
            shared.wake.notify_one();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One line's writer, as the fmt layer asks for it.
pub struct LineWriter<'a> {
    shared: Option<&'a Shared>,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let Some(shared) = self.shared else {
            return io::stderr().write(bytes);
        };
        let mut state = shared.lock();
        while state.pending.len() >= MAX_PENDING && !state.closed {
            shared.wake.notify_one();
            state.room_waiters += 1;
            state = shared.room.wait(state).unwrap_or_else(|e| e.into_inner());
            state.room_waiters -= 1;
        }
        if state.closed {
            drop(state);
            return io::stderr().write(bytes);
        }
        let before = state.pending.len();
        state.pending.extend_from_slice(bytes);
        // One wake-up starts a block: of the sleeping writer by the line that ends its sleep, or of a
        // waiting one by the line that fills the block early.
        let wake = std::mem::take(&mut state.writer_idle)
            || (before < FLUSH_AT && state.pending.len() >= FLUSH_AT);
        drop(state);
        if wake {
            shared.wake.notify_one();
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BlockWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: self.shared.as_deref(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::MakeWriter as _;

    /// What was written, and in how many `write` calls.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<(Vec<u8>, usize)>>);

    impl Sink {
        fn spawn(&self) -> (BlockWriter, LogGuard) {
            let sink = self.clone();
            spawn(move || sink)
        }
    }

    impl Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let mut sink = self.0.lock().unwrap();
            sink.0.extend_from_slice(bytes);
            sink.1 += 1;
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn every_line_of_every_thread_is_written_whole_and_in_blocks() {
        let sink = Sink::default();
        let (writer, guard) = sink.spawn();
        std::thread::scope(|s| {
            for t in 0..4 {
                let writer = writer.clone();
                s.spawn(move || {
                    for i in 0..5_000 {
                        let line = format!("thread {t} line {i}\n");
                        writer.make_writer().write_all(line.as_bytes()).unwrap();
                    }
                });
            }
        });
        drop(guard);
        let (bytes, writes) = sink.0.lock().unwrap().clone();
        let text = String::from_utf8(bytes).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 20_000);
        for t in 0..4 {
            let mine: Vec<&str> = lines
                .iter()
                .copied()
                .filter(|l| l.starts_with(&format!("thread {t} ")))
                .collect();
            let expected: Vec<String> =
                (0..5_000).map(|i| format!("thread {t} line {i}")).collect();
            assert_eq!(mine, expected, "thread {t}: every line, whole, in order");
        }
        assert!(writes < 20_000 / 10, "{writes} writes for 20,000 lines");
    }

    /// Waits for `done` up to a generous bound.
    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: not within 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_line_is_written_without_more_lines_or_an_exit() {
        let sink = Sink::default();
        let (writer, _guard) = sink.spawn();
        writer.make_writer().write_all(b"alone\n").unwrap();
        wait_until("the line is written", || {
            !sink.0.lock().unwrap().0.is_empty()
        });
        assert_eq!(sink.0.lock().unwrap().0, b"alone\n");
    }

    #[test]
    fn an_idle_writer_sleeps_without_a_timer_and_the_next_line_wakes_it() {
        let sink = Sink::default();
        let (writer, _guard) = sink.spawn();
        let shared = writer.shared.clone().unwrap();
        let mut expected = Vec::new();
        for line in [b"first\n".as_slice(), b"second\n", b"third\n"] {
            writer.make_writer().write_all(line).unwrap();
            expected.extend_from_slice(line);
            wait_until("the line is written", || {
                sink.0.lock().unwrap().0 == expected
            });
            // Nothing is pending: the writer waits for the next line, not for a timer.
            wait_until("the writer sleeps until a line comes", || {
                shared.lock().writer_idle
            });
        }
        assert_eq!(sink.0.lock().unwrap().1, 3, "one block per line");
    }

    /// A `Sink` whose writes wait until it is opened.
    #[derive(Clone, Default)]
    struct Gated {
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
        sink: Sink,
    }

    impl Gated {
        fn open(&self) {
            let (open, opened) = &*self.open;
            *open.lock().unwrap() = true;
            opened.notify_all();
        }
    }

    /// Opens the gate when dropped, so that a failing test ends instead of hanging in `LogGuard::drop`.
    struct OpenOnDrop(Gated);

    impl Drop for OpenOnDrop {
        fn drop(&mut self) {
            self.0.open();
        }
    }

    impl Write for Gated {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            let (open, opened) = &*self.open;
            let mut is_open = open.lock().unwrap();
            while !*is_open {
                is_open = opened.wait(is_open).unwrap();
            }
            self.sink.write(bytes)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.sink.flush()
        }
    }

    #[test]
    fn a_logging_thread_past_the_limit_waits_for_the_writer_and_loses_nothing() {
        let sink = Gated::default();
        let writer_sink = sink.clone();
        let (writer, guard) = spawn(move || writer_sink);
        let _open_at_end = OpenOnDrop(sink.clone());
        let shared = writer.shared.clone().unwrap();
        let line = [b'x'; 1023]
            .iter()
            .chain(b"\n")
            .copied()
            .collect::<Vec<u8>>();
        // The writer may take up to MAX_PENDING in the block it is stuck writing; past that, as much
        // again must fill the buffer before the logging thread has to wait.
        let lines = (2 * MAX_PENDING + 2 * FLUSH_AT) / line.len();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let logger = {
            let (writer, line, done) = (writer.clone(), line.clone(), done.clone());
            std::thread::spawn(move || {
                for _ in 0..lines {
                    writer.make_writer().write_all(&line).unwrap();
                }
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            })
        };
        wait_until("the logging thread waits for room", || {
            shared.lock().room_waiters > 0
        });
        assert!(!done.load(std::sync::atomic::Ordering::SeqCst));
        sink.open();
        wait_until("the logging thread gets room", || {
            done.load(std::sync::atomic::Ordering::SeqCst)
        });
        logger.join().unwrap();
        drop(guard);
        assert_eq!(sink.sink.0.lock().unwrap().0.len(), lines * line.len());
    }
}
