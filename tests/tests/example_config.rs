//! `deploy/sluice.example.toml`, the config a newcomer copies, stays valid, names every key
//! the code knows, and states the defaults the code really has; `docs/configuration.md`
//! names every key too.

use sluice_tests::processes::{Binary, ConfigFile};
use std::path::PathBuf;

fn print_config(path: &std::path::Path) -> serde_json::Value {
    let output = Binary::new("sluice-worker")
        .arg("print-config")
        .config(path)
        .env_clear()
        .output();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("print-config prints JSON")
}

/// Every key of a printed config, as `section.key` (relay tables under `relays.*`).
fn keys(value: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    if let serde_json::Value::Object(map) = value {
        for (key, child) in map {
            let path = if prefix == "relays" {
                "relays.*".to_string()
            } else if prefix.is_empty() {
                key.clone()
            } else {
                format!("{prefix}.{key}")
            };
            if child.is_object() {
                keys(child, &path, out);
            } else {
                out.push(path);
            }
        }
    }
}

#[test]
fn the_example_config_loads_documents_every_key_and_states_the_real_defaults() {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/sluice.example.toml");
    let text = std::fs::read_to_string(&example).expect("read the example config");
    let printed = print_config(&example);

    // Every key the code prints appears in the example, set or commented out.
    let mut all = Vec::new();
    keys(&printed, "", &mut all);
    for key in &all {
        let name = key.rsplit('.').next().unwrap();
        let mentioned = text.lines().any(|line| {
            let line = line.trim_start_matches(['#', ' ']);
            line.starts_with(&format!("{name} ="))
        });
        assert!(
            mentioned,
            "deploy/sluice.example.toml does not document {key}"
        );
    }

    // docs/configuration.md, the page a reader lands on, names every key too.
    let docs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md");
    let docs = std::fs::read_to_string(&docs).expect("read docs/configuration.md");
    for key in &all {
        let name = key.rsplit('.').next().unwrap();
        let mentioned = docs.lines().any(|line| {
            let line = line.trim_start_matches(['#', ' ']);
            line.starts_with(&format!("{name} =")) || line.contains(&format!("`{name}`"))
        }) || docs.contains(&format!("`{key}`"))
            || docs.contains(&format!(".{name}`"));
        assert!(mentioned, "docs/configuration.md does not document {key}");
    }

    // The values it sets are the defaults: the same as a config that sets nothing but a
    // relay's host.
    let minimal = ConfigFile::new("[relays.primary]\nhost = \"127.0.0.1\"\n");
    assert_eq!(
        printed,
        print_config(&minimal.path),
        "the example states a value that is not the default"
    );
}
