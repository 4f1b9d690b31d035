//! One job in a lane: parse, ensure a session, attempt, settle. Every broker action happens
//! in the last step, through [`crate::settle`].

use std::time::Duration;

use anyhow::Context;
use lapin::message::Delivery;
use prometheus::IntGauge;
use sluice_shared::control::CampaignState;
use sluice_shared::{Job, Priority};

use crate::broker::BrokerError;
use crate::budget::Pacer;
use crate::context::LaneContext;
use crate::deliver::{self, PreparedMessage};
use crate::feed::Feed;
use crate::limits::{now_ms, Change};
use crate::pushback::{Moment, Pushback};
use crate::relay::Relay;
use crate::settle::{Action, AttemptInfo, Outcome, SettleError};
use crate::smtp::SmtpSession;
use crate::tracing_spans::{DeliverAttributes, DeliverSpan};

/// What a lane needs to send jobs while it holds a slot: its relay, its session, its pace.
pub struct Sender<'a> {
    pub ctx: &'a LaneContext,
    pub relay: &'a Relay,
    session: Option<LaneSession>,
    pacer: Pacer,
    /// The budget slot held: one at or above the relay's effective session limit is given
    /// back after the current job.
    slot: u32,
    /// Close the session before the next job (the relay throttled it).
    retire_session: bool,
    /// Time spent in SMTP transactions (what the lane's window is sized by).
    pub sending: Duration,
}

impl<'a> Sender<'a> {
    /// A sender for slot `slot` of `relay`, taken just now (no session yet).
    pub fn new(ctx: &'a LaneContext, relay: &'a Relay, slot: u32) -> Self {
        Self {
            ctx,
            relay,
            session: None,
            pacer: Pacer::new(relay.limits.share()),
            slot,
            retire_session: false,
            sending: Duration::ZERO,
        }
    }

    /// Open a session with the relay, marking the relay up or down.
    pub async fn open_session(&mut self) -> bool {
        match self.relay.client.open().await {
            Ok(session) => {
                self.relay.health.mark_up();
                let open = self.ctx.metrics.sessions_open(self.relay.name());
                self.session = Some(LaneSession::new(session, open));
                true
            }
            Err(error) => {
                let pushback = error.reply().and_then(|(code, text)| {
                    self.relay.rules.classify(Moment::Opening, code, text)
                });
                match pushback {
                    Some(
                        pushback @ (Pushback::Throttle { .. }
                        | Pushback::TooManyConnections
                        | Pushback::Suspend { .. }),
                    ) => heed(self.ctx, self.relay, pushback, &error),
                    _ => self.relay.health.mark_down(&error),
                }
                false
            }
        }
    }

    /// Say QUIT, if a session is open.
    pub async fn close_session(&mut self) {
        if let Some(session) = self.session.take() {
            session.close().await;
        }
    }
}

/// An open SMTP session, counted in `sluice_smtp_sessions_open` for exactly as long as it
/// lives: dropping it (a broken session, an aborted lane) drops the connection and the
/// count together.
pub struct LaneSession {
    /// `Some` until [`LaneSession::close`].
    session: Option<SmtpSession>,
    open: IntGauge,
}

impl LaneSession {
    fn new(session: SmtpSession, open: IntGauge) -> Self {
        open.inc();
        Self {
            session: Some(session),
            open,
        }
    }

    /// The session itself.
    pub fn smtp(&mut self) -> &mut SmtpSession {
        self.session
            .as_mut()
            .expect("a session is open until closed")
    }

    /// Say QUIT and close.
    pub async fn close(mut self) {
        if let Some(session) = self.session.take() {
            session.close().await;
        }
    }
}

impl Drop for LaneSession {
    fn drop(&mut self) {
        self.open.dec();
    }
}

/// What the lane does after a job.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// The relay failed or the job could not be attempted: give the slot back.
    GiveUpSlot,
}

/// The broker connection has shown no life for half its heartbeat: the slot may already
/// belong to another worker, so no transaction may start.
#[derive(Debug, thiserror::Error)]
#[error("the broker connection shows no sign of life; no SMTP transaction starts")]
pub struct FenceClosed;

/// A delivery read as a job.
struct Parsed {
    job: Result<Job, String>,
    message: Result<PreparedMessage, String>,
    /// The job id, or the message id when the body is not a job.
    id: String,
}

/// Deliver one job of the `index`-th queue of `feed` and settle it.
pub(crate) async fn deliver_one(
    sender: &mut Sender<'_>,
    feed: &mut Feed,
    index: usize,
    delivery: Delivery,
) -> anyhow::Result<Next> {
    let ctx = sender.ctx;
    let source_relay = feed.relay(index).to_string();
    ctx.metrics.received(&source_relay);
    if let Some(published) = delivery.properties.timestamp() {
        let class = feed.class(index).as_str();
        ctx.metrics.head_taken(&source_relay, class, *published);
    }
    // Held until the job is settled (which may publish its body again): the bodies being
    // worked on stay within the worker's byte budget, whatever the number of lanes.
    let _hold = ctx.bodies.hold(delivery.data.len()).await;
    let parsed = parse(&delivery, ctx.max_message_bytes, feed.class(index));
    let span = start_span(
        sender,
        (&source_relay, feed.class(index)),
        &delivery,
        &parsed,
    );

    let ids = span.ids();
    let (trace_id, span_id) = (
        ids.as_ref().map(|(trace, _)| trace.as_str()),
        ids.as_ref().map(|(_, span)| span.as_str()),
    );
    let outcome = match &parsed.message {
        Err(reason) => {
            tracing::warn!(job.id = %parsed.id, relay = %source_relay, %reason, trace_id, span_id, "invalid job set aside");
            Outcome::Invalid {
                reason: reason.clone(),
            }
        }
        Ok(message) => match steer(ctx, &parsed.job, &delivery) {
            Some(steered) => steered,
            None => attempt(sender, &span, message).await?,
        },
    };
    let outcome = listen(sender, outcome);
    if let Outcome::RelayFault { code, reply } = &outcome {
        sender.relay.health.mark_down(&format!(
            "it refuses us, not the recipient: {} {reply}",
            code.unwrap_or(0)
        ));
    }

    let campaign_header;
    let (campaign, to) = match &parsed.job {
        Ok(job) => (job.campaign_or_default(), job.to.as_str()),
        Err(_) => {
            // The body cannot be read: the producer's header still names the campaign.
            campaign_header = sluice_shared::headers::get_str(
                delivery.properties.headers().as_ref(),
                sluice_shared::headers::CAMPAIGN,
            )
            .filter(|name| sluice_shared::job::is_campaign_name(name));
            (
                campaign_header
                    .as_deref()
                    .unwrap_or(sluice_shared::events::DEFAULT_CAMPAIGN),
                "",
            )
        }
    };
    log(
        &outcome,
        &parsed.id,
        sender.relay.name(),
        (trace_id, span_id),
    );
    let info = AttemptInfo {
        via_relay: sender.relay.name(),
        job_id: &parsed.id,
        campaign,
        to,
        span: &span,
    };
    let settled = feed.settler(index).settle(&delivery, &info, &outcome).await;
    match &settled {
        Ok(Action::Requeue) => span.requeued(outcome.reply()),
        Ok(_) => span.finish(outcome.smtp_code(), outcome.error_type(), outcome.reply()),
        Err(e) => span.failed(e),
    }
    let action = match settled {
        // Not a failure of the lane: it gives its slot back and waits for the broker to
        // unblock; the job, unacknowledged, goes back to its queue with the channel.
        Err(SettleError::Broker(BrokerError::Blocked { .. })) => return Ok(Next::GiveUpSlot),
        settled => settled.with_context(|| format!("settling job {}", parsed.id))?,
    };
    if sender.slot >= sender.relay.limits.sessions() {
        // The relay wants fewer sessions from the fleet than this slot's number.
        return Ok(Next::GiveUpSlot);
    }
    if matches!(outcome, Outcome::PushedBack { .. }) {
        // The pace or the session changed already; the slot goes on serving.
        return Ok(Next::Continue);
    }
    if action == Action::Requeue || sender.relay.health.record_refusal(&outcome, to) {
        return Ok(Next::GiveUpSlot);
    }
    Ok(Next::Continue)
}

/// Read the delivery, taken from a queue of `class`, as a job and build its message. A job
/// whose `priority` disagrees with its class's routing key is invalid.
fn parse(delivery: &Delivery, max_message_bytes: usize, class: Priority) -> Parsed {
    let mut job = Job::from_bytes(&delivery.data, max_message_bytes)
        .and_then(|job| job.check_class(class).map(|()| job))
        .map_err(|e| e.to_string());
    // The message takes the job's text and html (no copy); the job keeps the rest.
    let message = job
        .as_mut()
        .map_err(|e| e.clone())
        .and_then(|job| deliver::prepare(job).map_err(|e| e.to_string()));
    let id = match &job {
        Ok(job) => job.id.clone(),
        Err(_) => delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.to_string())
            .unwrap_or_else(|| format!("unknown-{}", delivery.delivery_tag)),
    };
    Parsed { job, message, id }
}

fn start_span(
    sender: &Sender<'_>,
    (source_relay, class): (&str, Priority),
    delivery: &Delivery,
    parsed: &Parsed,
) -> DeliverSpan {
    let incoming = delivery.properties.headers().as_ref();
    // Builds nothing (the closure is not even called) when tracing is off.
    DeliverSpan::start(incoming, || DeliverAttributes {
        queue: sender.ctx.topology.class_queue(source_relay, class).into(),
        message_id: &parsed.id,
        routing_key: delivery.routing_key.as_str(),
        relay: sender.relay.name(),
        campaign: parsed
            .job
            .as_ref()
            .map_or("default", |job| job.campaign_or_default()),
        attempt: sluice_shared::headers::get_int(incoming, sluice_shared::headers::ATTEMPT)
            .unwrap_or(1)
            .max(1),
    })
}

/// What the operators' commands and the job's own times say before it is sent: cancelled,
/// paused, expired or not yet due (`None`: send it). Checked for each job as its turn
/// comes, so a pause or a cancel reaches the jobs a lane already received too.
fn steer(ctx: &LaneContext, job: &Result<Job, String>, delivery: &Delivery) -> Option<Outcome> {
    let job = job.as_ref().ok()?;
    match ctx.control.campaign(job.campaign_or_default()) {
        Some(CampaignState::Cancelled { .. }) => return Some(Outcome::Cancelled),
        Some(CampaignState::Paused { since_ms }) => {
            // A job `resume` sent back after this pause: this worker has not read the resume
            // yet, and holding the job again would strand it.
            let resumed_at = sluice_shared::headers::get_int(
                delivery.properties.headers().as_ref(),
                sluice_shared::headers::RESUMED_AT,
            )
            .and_then(|at| u64::try_from(at).ok());
            if resumed_at.is_none_or(|resumed| resumed < since_ms) {
                return Some(Outcome::Paused);
            }
        }
        None => {}
    }
    let now = now_ms();
    if job.not_after_ms().is_some_and(|at| at < now) {
        return Some(Outcome::Expired);
    }
    match job.not_before_ms() {
        Some(at) if at > now => Some(Outcome::NotYet {
            wait: Duration::from_millis(at - now),
        }),
        _ => None,
    }
}

/// Hand the message to the relay, within the lane's pace, through an open session.
async fn attempt(
    sender: &mut Sender<'_>,
    span: &DeliverSpan,
    message: &PreparedMessage,
) -> anyhow::Result<Outcome> {
    let ctx = sender.ctx;
    if !ctx.broker.fence_open() {
        return Err(FenceClosed.into());
    }
    if ctx.broker.is_blocked() {
        return Ok(Outcome::NotAttempted {
            why: "the broker blocks publishing; requeued untouched".into(),
        });
    }
    if !ensure_session(sender, span).await {
        return Ok(Outcome::NotAttempted {
            why: "no SMTP session to the relay; requeued untouched".into(),
        });
    }
    sender.pacer.set_share(sender.relay.limits.share());
    sender.pacer.wait_turn().await;
    if !ctx.broker.fence_open() {
        return Err(FenceClosed.into());
    }
    let settings = sender.relay.client.settings();
    let send = span.child(
        "smtp.send",
        sender.relay.name(),
        &settings.host,
        settings.port,
    );
    let started = std::time::Instant::now();
    let session = sender.session.as_mut().expect("a session is open");
    let outcome = deliver::attempt(session.smtp(), message).await;
    send.end(
        outcome.smtp_code(),
        matches!(outcome, Outcome::Delivered { .. }),
        outcome.reply(),
    );
    let took = started.elapsed();
    sender.sending += took;
    ctx.metrics
        .send_seconds(sender.relay.name(), took.as_secs_f64());
    if !session.smtp().is_usable() {
        // A timeout or a broken connection: nothing said on it can be trusted.
        sender.session = None;
    }
    Ok(outcome)
}

/// Read an attempt's negative reply with the relay's reply rules: pushback turns the job's
/// outcome into [`Outcome::PushedBack`] (the job goes back untouched) and changes the
/// fleet's limits; a rule's `defer` or `bounce` decides the job's outcome; anything else
/// stands.
fn listen(sender: &mut Sender<'_>, outcome: Outcome) -> Outcome {
    let (code, reply) = match &outcome {
        Outcome::Deferred {
            code: Some(code),
            reply,
            ..
        }
        | Outcome::Bounced { code, reply, .. }
        | Outcome::RelayFault {
            code: Some(code),
            reply,
        } => (*code, reply.clone()),
        _ => return outcome,
    };
    let relay = sender.relay;
    let Some(pushback) = relay.rules.classify(Moment::Transaction, code, &reply) else {
        return outcome;
    };
    match pushback {
        Pushback::Defer => Outcome::Deferred {
            code: Some(code),
            retry_after: crate::classify::retry_hint(&reply),
            reply,
        },
        Pushback::Bounce => Outcome::Bounced {
            code,
            reply,
            at_rcpt: false,
        },
        Pushback::SessionFault => {
            sender
                .ctx
                .metrics
                .throttled(relay.name(), pushback.reason());
            // The relay ends the session: nothing more is said on it.
            sender.session = None;
            Outcome::PushedBack {
                code: Some(code),
                reply,
            }
        }
        Pushback::Throttle { .. } | Pushback::TooManyConnections | Pushback::Suspend { .. } => {
            let line = format!("{code} {reply}");
            heed(sender.ctx, relay, pushback, &line);
            if let Some(session) = sender.session.as_mut() {
                // Postfix answers the rest of a pipelined batch after a throttle with
                // errors (503), counts them per session, answers a session past ten errors
                // a second late each time and ends it at twenty: this session is done
                // (the next job opens a fresh one, which pipelines again), and pipelines no
                // more meanwhile.
                session.smtp().stop_pipelining();
                sender.retire_session = true;
            }
            Outcome::PushedBack {
                code: Some(code),
                reply,
            }
        }
    }
}

/// Change the fleet's limits for `relay` as `pushback` says, here and (through the control
/// stream) on every worker.
fn heed(ctx: &LaneContext, relay: &Relay, pushback: Pushback, why: &dyn std::fmt::Display) {
    ctx.metrics.throttled(relay.name(), pushback.reason());
    let change = match pushback {
        Pushback::Throttle { hold } => relay.limits.cut_rate(hold),
        Pushback::TooManyConnections => relay.limits.cut_sessions(),
        Pushback::Suspend { hold } => {
            let hold = hold.unwrap_or(relay.client.settings().down_cooloff);
            relay.health.mark_down_for(why, hold);
            let now = now_ms();
            Some(Change::Down {
                relay: relay.name().to_string(),
                until_ms: now.saturating_add(hold.as_millis() as u64),
                at_ms: now,
                reason: why.to_string(),
            })
        }
        _ => None,
    };
    if let Some(change) = change {
        ctx.control.tell(change);
    }
}

/// Make sure the lane has a usable session with room for one more message.
async fn ensure_session(sender: &mut Sender<'_>, span: &DeliverSpan) -> bool {
    let settings = sender.relay.client.settings();
    if std::mem::take(&mut sender.retire_session) {
        if let Some(old) = sender.session.take() {
            old.close().await;
        }
    }
    let reusable = sender.session.as_mut().is_some_and(|s| {
        let smtp = s.smtp();
        smtp.is_usable() && smtp.sent() < settings.max_messages_per_connection
    });
    if reusable {
        return true;
    }
    if let Some(old) = sender.session.take() {
        old.close().await;
    }
    let connect = span.child(
        "smtp.connect",
        sender.relay.name(),
        &settings.host,
        settings.port,
    );
    let opened = sender.open_session().await;
    connect.end(None, opened, "cannot open an SMTP session");
    opened
}

/// One line per attempt that did not deliver (debug for delivered), with the attempt's
/// trace and span ids when it is traced, so a log line leads to its trace and back.
fn log(outcome: &Outcome, job_id: &str, relay: &str, ids: (Option<&str>, Option<&str>)) {
    let (trace_id, span_id) = ids;
    match outcome {
        Outcome::Delivered { .. } => {
            tracing::debug!(job.id = job_id, relay, trace_id, span_id, "delivered")
        }
        Outcome::Invalid { .. } => {}
        other => tracing::info!(
            job.id = job_id,
            relay,
            code = other.smtp_code(),
            reply = other.reply(),
            trace_id,
            span_id,
            "not delivered"
        ),
    }
}
