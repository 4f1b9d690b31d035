//! The two binaries agree on what a bad configuration is: the same file makes both exit 2
//! (the usage code) and name the problem, before either contacts a broker or a relay.

use sluice_tests::processes::{Binary, ConfigFile, Run};

/// A namespace no other test uses; nothing is declared in it, because nothing connects.
const NAMESPACE: &str = "cli-contract";

/// One relay table on top of a broker section, with `relay` as the relay's lines.
fn config_with_relay(relay: &str) -> ConfigFile {
    ConfigFile::new(&format!(
        "[amqp]\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\nnamespace = \"{NAMESPACE}\"\n\n\
         [relays.faraway]\n{relay}\n"
    ))
}

/// `sluice-worker` (its default command, the one a container runs) on `config`.
fn worker(config: &ConfigFile) -> Run {
    Binary::new("sluice-worker").config(&config.path).run()
}

/// `sluice-producer status`, a command that would only read, on `config`.
fn producer(config: &ConfigFile) -> Run {
    Binary::new("sluice-producer")
        .config(&config.path)
        .args(["status", "--campaign", "any"])
        .run()
}

/// Both binaries exit 2 on `config` and say `problem` on stderr (and never `secret`).
fn both_refuse(config: &ConfigFile, problem: &[&str], secret: Option<&str>) {
    for (binary, run) in [
        ("sluice-worker", worker(config)),
        ("sluice-producer", producer(config)),
    ] {
        assert_eq!(
            run.code,
            Some(2),
            "{binary} exit code\n--- stdout\n{}\n--- stderr\n{}",
            run.stdout,
            run.stderr
        );
        for word in problem {
            assert!(
                run.stderr.contains(word),
                "{binary} does not say {word:?}:\n{}",
                run.stderr
            );
        }
        if let Some(secret) = secret {
            assert!(!run.stderr.contains(secret), "{binary} printed the secret");
        }
    }
}

#[test]
fn a_mistyped_key_is_a_usage_error_in_both_binaries() {
    let config = config_with_relay("host = \"127.0.0.1\"\nmax_conections = 4");
    both_refuse(&config, &["max_conections"], None);
}

#[test]
fn a_port_out_of_range_is_a_usage_error_in_both_binaries() {
    let config = config_with_relay("host = \"127.0.0.1\"\nport = 70000");
    both_refuse(&config, &["port"], None);
}

#[test]
fn a_username_without_a_password_is_a_usage_error_in_both_binaries() {
    let config = config_with_relay("host = \"127.0.0.1\"\nusername = \"sluice\"");
    both_refuse(&config, &["relays.faraway", "password"], None);
}

#[test]
fn a_password_without_a_username_is_a_usage_error_in_both_binaries() {
    let config = config_with_relay("host = \"127.0.0.1\"\npassword = \"s3cret-orphan\"");
    both_refuse(
        &config,
        &["relays.faraway", "username"],
        Some("s3cret-orphan"),
    );
}

/// 192.0.2.1 is TEST-NET-1: never routed, and never contacted, because the refusal comes
/// from the configuration alone.
#[test]
fn auth_in_clear_text_to_a_remote_relay_is_a_usage_error_in_both_binaries() {
    let config = config_with_relay(
        "host = \"192.0.2.1\"\ntls = \"none\"\nusername = \"sluice\"\npassword = \"s3cret-clear\"",
    );
    both_refuse(
        &config,
        &["relays.faraway", "clear text", "allow_plaintext_auth"],
        Some("s3cret-clear"),
    );
}
