//! `shared/event.schema.json`, the contract of event batches: every batch a test reads is
//! checked against it.

use std::sync::OnceLock;

/// Panic, naming every violation, unless `batch` (an event message's body) is valid.
pub fn assert_valid_batch(batch: &[u8]) {
    static VALIDATOR: OnceLock<jsonschema::Validator> = OnceLock::new();
    let validator = VALIDATOR.get_or_init(|| {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/event.schema.json");
        let text = std::fs::read_to_string(path).expect("read shared/event.schema.json");
        let schema: serde_json::Value = serde_json::from_str(&text).expect("schema is JSON");
        jsonschema::options()
            .should_validate_formats(true)
            .build(&schema)
            .expect("the event schema compiles")
    });
    let instance: serde_json::Value = serde_json::from_slice(batch).unwrap_or_else(|e| {
        panic!(
            "an event batch is not JSON ({e}): {}",
            String::from_utf8_lossy(batch)
        )
    });
    let errors: Vec<String> = validator
        .iter_errors(&instance)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "an event batch breaks shared/event.schema.json: {errors:?}\n{instance}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_tells_good_batches_from_bad() {
        let good = br#"[{"id":"c-2","campaign":"c","to":"a@example.org","relay":"r",
            "outcome":"delivered","attempt":1,"smtp_code":250,"smtp_reply":"ok",
            "at":"2026-12-04T10:00:00Z"}]"#;
        assert_valid_batch(good);
        for bad in [
            &b"[]"[..],
            br#"{"id":"c-2"}"#,
            br#"[{"id":"c-2","campaign":"c.x","to":"","relay":"r","outcome":"delivered",
                "attempt":1,"smtp_code":250,"smtp_reply":"ok","at":"2026-12-04T10:00:00Z"}]"#,
            br#"[{"id":"c-2","campaign":"c","to":"","relay":"r","outcome":"sent",
                "attempt":1,"smtp_code":250,"smtp_reply":"ok","at":"2026-12-04T10:00:00Z"}]"#,
            br#"[{"id":"c-2","campaign":"c","to":"","relay":"r","outcome":"delivered",
                "attempt":0,"smtp_code":250,"smtp_reply":"ok","at":"yesterday"}]"#,
        ] {
            let result = std::panic::catch_unwind(|| assert_valid_batch(bad));
            assert!(result.is_err(), "{} passed", String::from_utf8_lossy(bad));
        }
    }
}
