//! Which relay a command acts on: the names users give on the command line, checked once.

use sluice_shared::Settings;

use crate::cli::RelayChoice;
use crate::exit::UsageError;

/// Relay name used when the configuration names none.
pub const DEFAULT_RELAY: &str = "primary";

/// The relay whose queue takes the jobs: `--relay`, else the only configured one, else
/// `primary` when none is configured.
pub fn choose_relay(settings: &Settings, asked: Option<&str>) -> Result<String, UsageError> {
    let configured: Vec<&String> = settings.relays.keys().collect();
    match (asked, configured.as_slice()) {
        (Some(name), []) => {
            check_relay_name(name)?;
            Ok(name.to_string())
        }
        (Some(name), _) if settings.relays.contains_key(name) => Ok(name.to_string()),
        (Some(name), names) => Err(UsageError(format!(
            "--relay {name}: no such relay in the configuration (configured: {})",
            join(names)
        ))),
        (None, []) => Ok(DEFAULT_RELAY.to_string()),
        (None, [only]) => Ok(only.to_string()),
        (None, names) => Err(UsageError(format!(
            "several relays are configured ({}): choose one with --relay",
            join(names)
        ))),
    }
}

/// The relays a `dead` command acts on: `--relay`, else every configured relay, else
/// `primary`. A relay no longer configured may still have dead jobs, so any name goes.
pub fn chosen_relays(settings: &Settings, choice: &RelayChoice) -> Result<Vec<String>, UsageError> {
    match &choice.relay {
        Some(name) => {
            check_relay_name(name)?;
            Ok(vec![name.clone()])
        }
        None if settings.relays.is_empty() => Ok(vec![DEFAULT_RELAY.to_string()]),
        None => Ok(settings.relays.keys().cloned().collect()),
    }
}

/// A relay name goes into queue names: letters, digits, '-' and '_'.
pub fn check_relay_name(name: &str) -> Result<(), UsageError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(UsageError(format!(
            "--relay {name:?}: a relay name uses letters, digits, '-' and '_'"
        )))
    }
}

fn join(names: &[&String]) -> String {
    names
        .iter()
        .map(|n| n.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
