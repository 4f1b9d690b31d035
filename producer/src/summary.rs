//! The campaign summary: the message `send` publishes after a campaign's last job, and what
//! `watch` waits for to know how many outcomes make the campaign complete.

/// AMQP `type` of the message that tells `watch` how many jobs a campaign has.
pub const SUMMARY_KIND: &str = "campaign-summary";
/// Header of the summary message: the number of jobs published.
pub const EXPECTED_HEADER: &str = "x-sluice-expected";
