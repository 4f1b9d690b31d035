//! Helpers for sluice's integration tests: real services spawned per test.

pub mod scripted_smtp;
