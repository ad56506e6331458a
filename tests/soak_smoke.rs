//! A few seconds of the soak (tests/soak/mod.rs) in the suite, against the debug binary: the capacity
//! measurement, the open-loop load, key rotations, registry edits through the admin API, the answer
//! oracle, RSS sampling and the clean stop all run. The real soak is `cargo bench --bench soak`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod soak;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_with_rotations_and_registry_edits_gets_every_answer_right() {
    let report = soak::run(soak::Options::smoke()).await;
    report.print();
    assert!(report.calls > 100, "the load ran: {report:?}");
    assert_eq!(report.failed, 0, "{:?}", report.problems);
    assert_eq!(report.wrong, 0, "{:?}", report.problems);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert!(
        report.rotations >= 1,
        "a key rotation completed: {report:?}"
    );
    assert!(
        report.edits >= 5,
        "a whole cycle of registry edits: {report:?}"
    );
    // Every state the oracle knows was seen, so the checks were not vacuous.
    for answer in [
        "allow as Orders Integration",
        "allow as Soak Reader",
        "allow as Soak Writer",
        "APPLICATION_NOT_ALLOWED",
        "APPLICATION_DISABLED",
        "ROLE_MISSING",
        "ISSUER_NOT_TRUSTED",
        "TOKEN_EXPIRED",
        "KEY_NOT_FOUND",
    ] {
        assert!(
            report.answers.get(answer).is_some_and(|n| *n > 0),
            "no `{answer}` among {:?}",
            report.answers
        );
    }
    assert!(!report.rss.is_empty(), "RSS was sampled");
    assert!(report.log_errors.is_empty(), "{:?}", report.log_errors);
    assert_eq!(report.exit_code, Some(0), "exit after SIGTERM");
    assert!(report.passed());
}

#[test]
fn the_sustained_rss_level_ignores_a_transient_but_not_a_step() {
    // One sample of a burst is not a level; a rise that stays is.
    let transient = [100, 100, 100, 160, 100, 100, 100, 100];
    assert!(
        soak::rolling_median(&transient, 6)
            .iter()
            .all(|v| *v == 100)
    );
    let step = [100, 100, 100, 120, 120, 120, 120, 120, 120, 120];
    assert_eq!(soak::rolling_median(&step, 6).last(), Some(&120));
    // Fewer samples than a window: one median of them all.
    assert_eq!(soak::rolling_median(&[3, 1, 2], 6), [2]);
    assert!(soak::rolling_median(&[], 6).is_empty());
}
