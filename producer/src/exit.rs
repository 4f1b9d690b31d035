//! How a command ended, and the exit code that tells scripts.

use std::process::ExitCode;

/// A command that ran to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Everything as asked (exit 0).
    Success,
    /// The campaign finished, but some jobs bounced or are dead (exit 3).
    CampaignFailed,
    /// `watch --timeout` passed before every job had a final outcome (exit 4).
    Incomplete,
}

/// Arguments that clap accepted but that do not fit the configuration (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The campaign's input is invalid; the problems were listed on stderr (exit 65).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InvalidInput(pub String);

/// A stop signal ended the command before its end (exit 130 after SIGINT, 143 after
/// SIGTERM, as shells report them); the message says how far it got.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Interrupted {
    pub signal: StopSignal,
    pub message: String,
}

/// The signal that stopped a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGINT (Ctrl-C): exit 130.
    Interrupt,
    /// SIGTERM: exit 143.
    Terminate,
}

impl StopSignal {
    /// Its name, as `kill -l` spells it.
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Interrupt => "SIGINT",
            StopSignal::Terminate => "SIGTERM",
        }
    }
}

/// Exit code of a command line usage error, as clap uses.
pub const USAGE: u8 = 2;
/// The campaign finished with bounces or dead jobs.
pub const CAMPAIGN_FAILED: u8 = 3;
/// `watch --timeout` passed first.
pub const INCOMPLETE: u8 = 4;
/// `EX_DATAERR`: the input data was incorrect.
pub const INVALID_INPUT: u8 = 65;
/// Stopped by SIGINT (128 + 2, as shells report Ctrl-C).
pub const INTERRUPTED: u8 = 130;
/// Stopped by SIGTERM (128 + 15).
pub const TERMINATED: u8 = 143;

/// Report `result` on stderr (errors with their cause chain) and pick the exit code.
pub fn report(result: anyhow::Result<Status>) -> ExitCode {
    match result {
        Ok(Status::Success) => ExitCode::SUCCESS,
        Ok(Status::CampaignFailed) => ExitCode::from(CAMPAIGN_FAILED),
        Ok(Status::Incomplete) => ExitCode::from(INCOMPLETE),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(code_of(&error))
        }
    }
}

/// The exit code of an error: its kind decides, wherever it is in the chain.
pub fn code_of(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<UsageError>().is_some() {
        USAGE
    } else if error.downcast_ref::<InvalidInput>().is_some() {
        INVALID_INPUT
    } else if let Some(interrupted) = error.downcast_ref::<Interrupted>() {
        match interrupted.signal {
            StopSignal::Interrupt => INTERRUPTED,
            StopSignal::Terminate => TERMINATED,
        }
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn error_kinds_map_to_exit_codes() {
        let cases: Vec<(anyhow::Error, u8)> = vec![
            (anyhow::anyhow!("broker down"), 1),
            (UsageError("--relay is required".into()).into(), USAGE),
            (
                anyhow::Error::from(InvalidInput("2 invalid rows".into())).context("send"),
                INVALID_INPUT,
            ),
            (
                Interrupted {
                    signal: StopSignal::Interrupt,
                    message: "confirmed through line 4".into(),
                }
                .into(),
                INTERRUPTED,
            ),
            (
                Interrupted {
                    signal: StopSignal::Terminate,
                    message: "confirmed through line 4".into(),
                }
                .into(),
                TERMINATED,
            ),
            (
                Err::<(), _>(std::io::Error::other("disk"))
                    .context("reading")
                    .unwrap_err(),
                1,
            ),
        ];
        for (error, code) in cases {
            assert_eq!(code_of(&error), code, "{error:#}");
        }
    }
}
