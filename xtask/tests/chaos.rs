//! The saga through crashes, on a three-broker stack: a Kafka node, every service of
//! the stack, an extra instance of each (killed for good, so their partitions must
//! move) and PostgreSQL all die under a steady load of orders placed with
//! Idempotency-Keys, and afterwards the books balance: every accepted order final, one
//! order per key, one payment per order agreeing with it, one notification per
//! outcome, every balance = deposits - confirmed totals, no committed offset moved
//! backwards. The same scenario as `cargo xtask chaos`, smaller.

use std::time::Duration;

use xtask::{
    chaos::{ChaosOptions, run},
    procs::Interrupt,
};

#[test]
fn nothing_is_lost_or_charged_twice_when_parts_of_the_system_die() {
    let interrupt = Interrupt::install().expect("signal handlers");
    let mut options = ChaosOptions::new(env!("CARGO_BIN_EXE_xtask").into());
    options.rate = 5.0;
    options.customers = 12;
    options.gap = Duration::from_secs(3);
    // Runs on this test's own thread: the extra instances it starts die with the
    // thread that spawned them.
    let report = run(&options, &interrupt).expect("the scenario runs");
    println!("{report}");
    assert!(
        report.accepted > 50,
        "too few orders to mean anything:\n{report}"
    );
    assert!(
        report.confirmed > 0 && report.rejected > 0,
        "both outcomes happen:\n{report}"
    );
    assert_eq!(report.faults.len(), 8, "{report}");
    assert!(report.passed(), "a promise was broken:\n{report}");
}
