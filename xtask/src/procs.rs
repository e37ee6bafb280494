//! Child processes that never outlive xtask.
//!
//! Every process xtask starts is a [`Supervised`] child:
//! - in a process group of its own, so stopping it reaches whatever it forked
//!   (PostgreSQL's backends, a test runner's test binaries) and a terminal's Ctrl-C
//!   reaches xtask alone, which then stops everything in order;
//! - with a parent-death signal, so even a `kill -9` of xtask takes the children with
//!   it instead of leaving a broker or a database behind. Linux sends it when the
//!   *thread* that spawned the child ends, so spawn from a thread that outlives the
//!   child (the main thread, a test's own thread), never from a pool thread;
//! - stopped on drop: its signal to the group, a grace period, then SIGKILL.

use std::{
    io,
    process::{Child, Command, ExitStatus},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

/// A running child process and how to stop it.
#[derive(Debug)]
pub struct Supervised {
    name: String,
    child: Child,
    stop_signal: Signal,
    grace: Duration,
    stopped: bool,
    /// Set once [`Supervised::take_exit`] reported the exit.
    exit_reported: bool,
}

impl Supervised {
    /// Starts `command` as a supervised child named `name` (for messages). It is
    /// stopped with SIGTERM unless [`Supervised::stop_with`] says otherwise.
    pub fn spawn(name: &str, command: &mut Command) -> io::Result<Self> {
        use std::os::unix::process::CommandExt;
        let parent = nix::unistd::getpid();
        command.process_group(0);
        // SAFETY: the closure runs in the forked child before exec and calls only
        // async-signal-safe functions (prctl, getppid) without allocating.
        #[allow(unsafe_code)]
        unsafe {
            command.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The parent may have died between fork and prctl.
                if libc::getppid() != parent.as_raw() {
                    return Err(io::Error::other("parent exited during spawn"));
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {name}: {e}")))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            stop_signal: Signal::SIGTERM,
            grace: Duration::from_secs(10),
            stopped: false,
            exit_reported: false,
        })
    }

    /// Uses `signal` (and `grace` before SIGKILL) to stop this child.
    pub fn stop_with(mut self, signal: Signal, grace: Duration) -> Self {
        self.stop_signal = signal;
        self.grace = grace;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the child has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// `Some(status)` the first time this is called after the child exited, `None`
    /// before and after: how a supervisor notices a death exactly once.
    pub fn take_exit(&mut self) -> Option<ExitStatus> {
        if self.exit_reported {
            return None;
        }
        let status = self.exited()?;
        self.exit_reported = true;
        Some(status)
    }

    /// Waits for the child to exit by itself, checking `interrupt` as it goes; on an
    /// interrupt the child is stopped and `None` returned.
    pub fn wait_or_interrupt(&mut self, interrupt: &Interrupt) -> Option<ExitStatus> {
        loop {
            if let Some(status) = self.exited() {
                self.stopped = true;
                return Some(status);
            }
            if interrupt.requested() {
                self.stop();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Signals the child's process group, waits up to the grace period, then kills
    /// the group. Idempotent.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let group = Pid::from_raw(self.child.id() as i32);
        if self.exited().is_none() {
            let _ = killpg(group, self.stop_signal);
            let deadline = Instant::now() + self.grace;
            while self.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // Whatever the leader left in its group goes too (it may have exited first).
        let _ = killpg(group, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Set when xtask receives SIGINT, SIGTERM or SIGHUP. Installing it replaces the
/// default action (dying at once) with an orderly stop of every child.
#[derive(Debug, Clone)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    pub fn install() -> io::Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        for signal in [
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGHUP,
        ] {
            signal_hook::flag::register(signal, flag.clone())?;
        }
        Ok(Self(flag))
    }

    pub fn requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// An error to return from a step that noticed the interrupt.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.requested() {
            anyhow::bail!("interrupted");
        }
        Ok(())
    }
}

/// Runs `command` to completion in the foreground (inheriting stdio), as a
/// supervised child so an interrupt stops it too. Fails unless it exits 0.
pub fn run(name: &str, command: &mut Command, interrupt: &Interrupt) -> anyhow::Result<()> {
    let mut child = Supervised::spawn(name, command)?;
    match child.wait_or_interrupt(interrupt) {
        Some(status) if status.success() => Ok(()),
        Some(status) => anyhow::bail!("{name} failed ({status})"),
        None => anyhow::bail!("interrupted while running {name}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_is_taken_once() {
        let mut child = Supervised::spawn("true", &mut Command::new("true")).expect("spawn");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.take_exit() {
                break status;
            }
            assert!(Instant::now() < deadline, "`true` did not exit");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(status.success());
        assert_eq!(child.take_exit(), None, "reported once");
        assert!(child.exited().is_some(), "while exited() keeps answering");
    }
}
