//! `amqp.url` with several nodes: a client connects to one that answers, and no password
//! of any of them reaches the output.

#[path = "../src/producer_support.rs"]
mod producer_support;

use producer_support::ProducerEnv;

#[tokio::test]
async fn a_node_that_does_not_answer_is_skipped_and_no_password_is_printed() {
    let env = ProducerEnv::new("purls").await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("port").port()
    };
    let urls = format!(
        "amqp://guest:Cl0sedNodePw@127.0.0.1:{closed}/%2f,amqp://guest:guest@127.0.0.1:5672/%2f"
    );
    let recipients = env.file("r.csv", "email\nann@example.org\nbob@example.org\n");
    let text = env.file("t.txt", "Hello");
    let env_vars = [("SLUICE__AMQP__URL", urls.as_str())];

    // The first node is tried first on about half the runs: three runs try both orders
    // with a probability of 3/4, and every run must succeed.
    let mut runs = Vec::new();
    for i in 0..3 {
        let campaign = format!("urls{i}");
        runs.push(env.run_with_env(
            &[
                "send",
                "--recipients",
                &recipients,
                "--from",
                "news@example.com",
                "--subject",
                "Hi",
                "--text",
                &text,
                "--campaign",
                &campaign,
            ],
            &env_vars,
        ));
    }
    let dead_list = env.run_with_env(&["dead", "list"], &env_vars);

    for run in runs.iter().chain([&dead_list]) {
        run.expect_code(0);
        let output = format!("{}{}", run.stdout, run.stderr);
        assert!(!output.contains("Cl0sedNodePw"), "{output}");
        assert!(!output.contains("guest:guest"), "{output}");
    }
    assert_eq!(env.ns.queue_len(&env.jobs_queue()).await, 6);

    // With no node answering, the error names each node, passwords masked.
    let none = format!(
        "amqp://guest:Cl0sedNodePw@127.0.0.1:{closed}/%2f,amqp://guest:OtherPw@127.0.0.1:{closed}/v"
    );
    let refused = env.run_with_env(&["dead", "list"], &[("SLUICE__AMQP__URL", none.as_str())]);
    assert_ne!(refused.code, Some(0));
    assert!(
        refused.stderr.contains("guest:***@127.0.0.1"),
        "{}",
        refused.stderr
    );
    assert!(
        !refused.stderr.contains("Cl0sedNodePw") && !refused.stderr.contains("OtherPw"),
        "{}",
        refused.stderr
    );
}
