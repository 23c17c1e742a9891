//! The admin HTTP API (`[admin] listen`), and the client the CLI's operator commands use.
//!
//! Every call needs `Authorization: Bearer <admin.token>` (compared in constant time); with no
//! token configured every call is refused. Reads come from PostgreSQL (a contact's review items
//! from the manual-review topic too), so any instance answers for every partition.
//! State-changing calls (release, re-submit, cancel) queue or cancel an operator command
//! (`store::postgres::commands`) and write a `cc_admin_audit` row: the actor the caller names,
//! that the bearer token was valid, what was asked, when, and the result. The partition's owner
//! applies a command inside a batch (`pipeline::operator`); it reads as `applied` once that
//! batch is committed in Kafka.
//!
//! The routes and their responses are documented in [`OPENAPI`] (`src/admin/openapi.json`),
//! served at `GET /v1/openapi.json`.

pub mod client;
pub mod review;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use secrecy::ExposeSecret;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use sqlx::PgPool;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::pipeline::health::Health;
use crate::store::postgres::{self as pg, CommandAction, NewCommand, NotQueued, SkipTarget};

/// The OpenAPI document of this API, kept beside the code.
pub const OPENAPI: &str = include_str!("openapi.json");

/// What the audit records about the caller's credentials.
const AUTH_VALID: &str = "bearer token valid";
/// Longest actor name.
const MAX_ACTOR: usize = 128;

/// A running admin API.
pub struct Server {
    pub addr: SocketAddr,
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds `config.admin.listen` and serves until `shutdown` fires.
pub async fn serve(
    config: Arc<Config>,
    pool: PgPool,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> anyhow::Result<Server> {
    let listen = &config.admin.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding the admin API on admin.listen {listen}"))?;
    let addr = listener.local_addr()?;
    let token = config.admin.token.expose_secret();
    if token.is_empty() {
        tracing::warn!(%addr, "admin API: no admin.token configured, every call is refused");
    }
    let app = router(Arc::new(Api {
        token: (!token.is_empty()).then(|| token.as_bytes().to_vec()),
        config: config.clone(),
        pool,
        health,
    }));
    tracing::info!(%addr, "admin API listening");
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "admin API stopped");
        }
    });
    Ok(Server { addr, task })
}

struct Api {
    /// `None`: no token configured, every call refused.
    token: Option<Vec<u8>>,
    config: Arc<Config>,
    pool: PgPool,
    health: Arc<Health>,
}

type Shared = State<Arc<Api>>;

fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/ready", get(ready))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/backlog", get(backlog))
        .route("/v1/held", get(held))
        .route("/v1/contacts/{contact_id}", get(contact))
        .route("/v1/contacts/{contact_id}/reviews", get(reviews))
        .route("/v1/contacts/{contact_id}/release", post(release))
        .route("/v1/resubmissions", post(resubmit))
        .route("/v1/commands", get(commands))
        .route("/v1/commands/{id}", get(command))
        .route("/v1/commands/{id}/cancel", post(cancel))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            api.clone(),
            authenticate,
        ))
        .with_state(api)
}

/// An error answer: `{"error": code, "message": text}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }

    fn store(e: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %e, "admin API: a store did not answer");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!("a store did not answer: {e}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.code, "message": self.message });
        let mut r = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"causal-commit\""),
            );
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Every call: a configured token, and the caller's bearer token equal to it (constant time).
async fn authenticate(State(api): Shared, request: Request, next: Next) -> Response {
    let Some(token) = &api.token else {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "no admin.token is configured: every admin call is refused",
        )
        .into_response();
    };
    let given = bearer(request.headers());
    let valid = given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(token)));
    if !valid {
        tracing::warn!(
            method = %request.method(),
            path = %request.uri().path(),
            token_given = given.is_some(),
            "admin API: call refused, bearer token missing or wrong"
        );
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required (Authorization: Bearer <admin.token>)",
        )
        .into_response();
    }
    next.run(request).await
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route (see GET /v1/openapi.json)")
}

async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "alive" }))
}

async fn ready(State(api): Shared) -> Response {
    let view = api.health.view();
    let status = if view.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(view)).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn backlog(State(api): Shared) -> ApiResult<Json<serde_json::Value>> {
    let partitions = pg::commands::backlog(&api.pool, &api.config.kafka.intents_topic)
        .await
        .map_err(ApiError::store)?;
    Ok(Json(serde_json::json!({ "partitions": partitions })))
}

async fn held(State(api): Shared) -> ApiResult<Json<serde_json::Value>> {
    let held = pg::commands::held_contacts(&api.pool, &api.config.kafka.intents_topic)
        .await
        .map_err(ApiError::store)?;
    Ok(Json(serde_json::json!({ "contacts": held })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

const MAX_LIMIT: i64 = 10_000;

fn limit(given: Option<i64>, default: i64) -> ApiResult<i64> {
    match given.unwrap_or(default) {
        n if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        n => Err(ApiError::bad_request(format!(
            "limit must be from 1 to {MAX_LIMIT}, got {n}"
        ))),
    }
}

async fn contact(
    State(api): Shared,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> ApiResult<Json<pg::commands::ContactDetail>> {
    let contact_id = contact_id(&api, path)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let after = q.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::bad_request(format!(
            "after must be at least 0, got {after}"
        )));
    }
    let limit = limit(q.limit, 1000)?;
    pg::commands::contact_detail(
        &api.pool,
        &api.config.kafka.intents_topic,
        &contact_id,
        after,
        limit,
    )
    .await
    .map_err(ApiError::store)?
    .map(Json)
    .ok_or_else(|| ApiError::not_found(format!("contact {contact_id:?} is unknown")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReviewsQuery {
    limit: Option<i64>,
}

/// The contact's items on the manual-review topic (read_committed, keyed by the contact), read
/// from [`review::LIST_SLACK_MS`] before its first audited review: where each one is, what it
/// says, its intent's outcome now, and whether `resubmit` would take it (why not, if not). What
/// an operator needs to re-submit a held contact's intents, through the API alone.
async fn reviews(
    State(api): Shared,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ReviewsQuery>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let contact_id = contact_id(&api, path)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = limit(q.limit, 100)?;
    let topic = api.config.kafka.manual_review_topic.clone();
    let first = pg::commands::first_review_ms(&api.pool, &contact_id)
        .await
        .map_err(ApiError::store)?;
    let Some(first) = first else {
        return Ok(Json(serde_json::json!({
            "contact_id": contact_id, "topic": topic, "read_from_ms": null,
            "items": [], "more": false,
        })));
    };
    let since = first - review::LIST_SLACK_MS;
    let (config, contact) = (api.config.clone(), contact_id.clone());
    let (listed, more) = tokio::task::spawn_blocking(move || {
        review::list(
            &config,
            &contact,
            since,
            usize::try_from(limit).unwrap_or(1),
        )
    })
    .await
    .map_err(ApiError::store)?
    .map_err(ApiError::store)?;
    let ids: Vec<String> = listed
        .iter()
        .filter_map(|l| l.review.as_ref().ok())
        .map(|r| r.intent_id.clone())
        .collect();
    let outcomes = pg::commands::latest_outcomes(&api.pool, &ids)
        .await
        .map_err(ApiError::store)?;
    let items: Vec<serde_json::Value> = listed
        .iter()
        .map(|l| {
            let (p, o) = (l.partition, l.offset);
            let r = match &l.review {
                Ok(r) => r,
                Err(why) => {
                    return serde_json::json!({
                        "partition": p, "offset": o, "resubmittable": false, "why_not": why,
                    })
                }
            };
            let outcome = outcomes.get(&r.intent_id).map(String::as_str);
            let why_not = not_resubmittable(&api.config, p, o, r, outcome).map(|e| e.message);
            let reason = crate::proto::ReviewReason::try_from(r.reason).map_or_else(
                |_| format!("unknown ({})", r.reason),
                |x| x.as_str_name().into(),
            );
            serde_json::json!({
                "partition": p,
                "offset": o,
                "intent_id": r.intent_id,
                "reason": reason,
                "expected_sequence": r.expected_sequence,
                "received_sequence": r.received_sequence,
                "waited_ms": r.waited_ms,
                "reviewed_at_ms": r.reviewed_at_ms,
                "detail": r.detail,
                "outcome": outcome,
                "resubmittable": why_not.is_none(),
                "why_not": why_not,
            })
        })
        .collect();
    Ok(Json(serde_json::json!({
        "contact_id": contact_id, "topic": topic, "read_from_ms": since,
        "items": items, "more": more,
    })))
}

/// A contact id from the path, checked like an intent's (printable, bounded).
fn contact_id(api: &Api, path: Result<Path<String>, PathRejection>) -> ApiResult<String> {
    let Path(id) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    printable("contact_id", &id, api.config.limits.max_id_bytes)?;
    Ok(id)
}

fn printable(field: &str, value: &str, max: usize) -> ApiResult<()> {
    if value.is_empty() || value.chars().count() > max || value.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "{field} must be 1 to {max} characters of printable text"
        )));
    }
    Ok(())
}

/// A JSON body, with a 400 that says what is wrong.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> ApiResult<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid: {e}")))
}

fn actor(given: &str) -> ApiResult<&str> {
    printable("actor", given, MAX_ACTOR)?;
    Ok(given)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    actor: String,
    /// Any JSON value when present (`null` too): validated here, so that a value above
    /// 2^63-1 gets a clear answer.
    #[serde(default, deserialize_with = "present")]
    skip_to: Option<serde_json::Value>,
}

/// A field that, when present, is `Some` even when `null` (which the handler then refuses).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

async fn release(
    State(api): Shared,
    path: Result<Path<String>, PathRejection>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let parsed = contact_id(&api, path).and_then(|c| {
        let b: ReleaseBody = body(&bytes)?;
        actor(&b.actor)?;
        Ok((c, b))
    });
    let (contact_id, b) = match parsed {
        Ok(p) => p,
        Err(e) => return refuse_unnamed(&api, "release", e).await,
    };
    let actor = b.actor.as_str();
    let action = match &b.skip_to {
        None => CommandAction::Resume,
        Some(n) => {
            let target = n
                .as_u64()
                .ok_or_else(|| pg::commands::BadSkipTarget(n.to_string()))
                .and_then(SkipTarget::new);
            match target {
                Ok(t) => CommandAction::SkipTo(t),
                Err(e) => {
                    let request = serde_json::json!({ "skip_to": n });
                    return refuse(
                        &api,
                        actor,
                        "skip_to",
                        &contact_id,
                        request,
                        ApiError::bad_request(e.to_string()),
                    )
                    .await;
                }
            }
        }
    };
    queue(&api, actor, &contact_id, action).await
}

/// Who a refused call is audited as when it named no valid actor.
const UNNAMED: &str = "(unnamed: malformed request)";

/// A state-changing call refused before it named a valid actor (a malformed path or body):
/// audited under [`UNNAMED`] with the error.
async fn refuse_unnamed(api: &Api, action: &str, error: ApiError) -> ApiResult<Response> {
    refuse(api, UNNAMED, action, "", serde_json::json!({}), error).await
}

/// Audits a refused state-changing call, then answers with its error.
async fn refuse(
    api: &Api,
    actor: &str,
    action: &str,
    contact_id: &str,
    mut request: serde_json::Value,
    error: ApiError,
) -> ApiResult<Response> {
    request["auth"] = AUTH_VALID.into();
    request["result"] = format!("refused ({}): {}", error.status.as_u16(), error.message).into();
    pg::audit_admin(&api.pool, actor, action, contact_id, request)
        .await
        .map_err(ApiError::store)?;
    Err(error)
}

async fn queue(
    api: &Api,
    actor: &str,
    contact_id: &str,
    action: CommandAction,
) -> ApiResult<Response> {
    let name = action.as_str();
    let request = match &action {
        CommandAction::SkipTo(t) => serde_json::json!({ "skip_to": t.get() }),
        CommandAction::Resubmit(r) => serde_json::json!({
            "intent_id": r.intent_id,
            "review": { "partition": r.review_partition, "offset": r.review_offset },
        }),
        CommandAction::Resume => serde_json::json!({}),
    };
    let queued = pg::queue_command(
        &api.pool,
        &NewCommand {
            topic: &api.config.kafka.intents_topic,
            contact_id,
            action,
            actor,
            auth: AUTH_VALID,
        },
    )
    .await
    .map_err(ApiError::store)?;
    match queued {
        Ok(view) => {
            tracing::info!(
                command = view.id,
                contact_id,
                action = name,
                actor,
                "operator command queued"
            );
            Ok((StatusCode::ACCEPTED, Json(view)).into_response())
        }
        Err(NotQueued::UnknownContact) => {
            let e = ApiError::not_found(format!("contact {contact_id:?} is unknown"));
            refuse(api, actor, name, contact_id, request, e).await
        }
        Err(NotQueued::NotHeld) => {
            let e = ApiError::conflict(format!("contact {contact_id:?} is not on hold"));
            refuse(api, actor, name, contact_id, request, e).await
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResubmitBody {
    actor: String,
    /// The manual-review topic (this instance's; optional).
    #[serde(default, deserialize_with = "present")]
    topic: Option<serde_json::Value>,
    /// The review record on the manual-review topic.
    partition: i32,
    offset: i64,
}

/// Review reasons whose decision a re-submission reopens (manual review, not conflicts).
const REOPENABLE: [crate::proto::ReviewReason; 3] = [
    crate::proto::ReviewReason::WaitTimeout,
    crate::proto::ReviewReason::ContactOnHold,
    crate::proto::ReviewReason::ContactBacklogOverflow,
];

/// Why the review at `partition`/`offset` is not re-submitted, given its intent's latest
/// outcome (`None`: no outcome recorded), or `None` when it is: what `resubmit` refuses with
/// (422 for the item itself, 409 for its intent's outcome), and what a listing of a contact's
/// items says of each.
fn not_resubmittable(
    config: &Config,
    partition: i32,
    offset: i64,
    review: &crate::proto::ManualReview,
    outcome: Option<&str>,
) -> Option<ApiError> {
    let unprocessable =
        |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "not_resubmittable", m);
    let reason = crate::proto::ReviewReason::try_from(review.reason)
        .unwrap_or(crate::proto::ReviewReason::Unspecified);
    if !REOPENABLE.contains(&reason) || review.intent_id.is_empty() {
        return Some(unprocessable(format!(
            "review {partition}/{offset} ({}) is not re-submittable: only WAIT_TIMEOUT, CONTACT_ON_HOLD and CONTACT_BACKLOG_OVERFLOW items are reopened; a conflict's decision stands and invalid input stays invalid",
            reason.as_str_name()
        )));
    }
    if review.original_truncated {
        // Never for the reasons above (valid records always fit whole), but a cut record must
        // not come back as a shorter one.
        return Some(unprocessable(format!(
            "review {partition}/{offset} holds only the first part of the original {} value bytes",
            review.original_value_size
        )));
    }
    if review.source_topic != config.kafka.intents_topic.as_str() {
        return Some(unprocessable(format!(
            "review {partition}/{offset} is of topic {:?}, not {:?}",
            review.source_topic, config.kafka.intents_topic
        )));
    }
    match outcome {
        Some("resubmitted") => Some(ApiError::conflict(format!(
            "intent {:?} is re-submitted already and not decided again yet (it waits for its \
             predecessor, or the batch deciding it is in flight); only a manual_review decision \
             is reopened",
            review.intent_id
        ))),
        Some(state) if state != "manual_review" => Some(ApiError::conflict(format!(
            "intent {:?} is {state} now; only a manual_review decision is reopened",
            review.intent_id
        ))),
        _ => None,
    }
}

async fn resubmit(State(api): Shared, bytes: Bytes) -> ApiResult<Response> {
    let parsed = body::<ResubmitBody>(&bytes).and_then(|b| {
        actor(&b.actor)?;
        if b.topic.as_ref().is_some_and(|t| !t.is_string()) {
            return Err(ApiError::bad_request("topic must be a string"));
        }
        if b.partition < 0 || b.offset < 0 {
            return Err(ApiError::bad_request(format!(
                "partition and offset must be at least 0, got {} and {}",
                b.partition, b.offset
            )));
        }
        Ok(b)
    });
    let b = match parsed {
        Ok(b) => b,
        Err(e) => return refuse_unnamed(&api, "resubmit", e).await,
    };
    let actor = b.actor.as_str();
    let (partition, offset) = (b.partition, b.offset);
    let request = serde_json::json!({ "review": { "partition": partition, "offset": offset } });
    let topic = api.config.kafka.manual_review_topic.as_str();
    if b.topic.as_ref().is_some_and(|t| t.as_str() != Some(topic)) {
        let e = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_resubmittable",
            format!("only items of this instance's manual-review topic {topic:?} are re-submitted"),
        );
        return refuse(&api, actor, "resubmit", "", request, e).await;
    }
    let config = api.config.clone();
    let read = tokio::task::spawn_blocking(move || review::read(&config, partition, offset))
        .await
        .map_err(ApiError::store)?;
    let unprocessable =
        |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "not_resubmittable", m);
    let review = match read {
        Ok(r) => r,
        Err(e @ review::Error::Kafka { .. }) => return Err(ApiError::store(e)),
        Err(e @ review::Error::NotFound { .. }) => {
            return refuse(
                &api,
                actor,
                "resubmit",
                "",
                request,
                ApiError::not_found(e.to_string()),
            )
            .await
        }
        Err(e @ review::Error::NotAReview { .. }) => {
            return refuse(
                &api,
                actor,
                "resubmit",
                "",
                request,
                unprocessable(e.to_string()),
            )
            .await
        }
    };
    let contact_id = review.contact_id.clone();
    let outcomes =
        pg::commands::latest_outcomes(&api.pool, std::slice::from_ref(&review.intent_id))
            .await
            .map_err(ApiError::store)?;
    let outcome = outcomes.get(&review.intent_id).map(String::as_str);
    if let Some(e) = not_resubmittable(&api.config, partition, offset, &review, outcome) {
        return refuse(&api, actor, "resubmit", &contact_id, request, e).await;
    }
    let action = CommandAction::Resubmit(Box::new(pg::Resubmission {
        intent_id: review.intent_id.clone(),
        review_partition: partition,
        review_offset: offset,
        source_partition: review.source_partition,
        source_offset: review.source_offset,
        key: (!review.original_key.is_empty()).then(|| review.original_key.to_vec()),
        value: review.original_value.to_vec(),
        correlation_id: review.correlation_id.clone(),
    }));
    queue(&api, actor, &contact_id, action).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandsQuery {
    state: Option<String>,
    limit: Option<i64>,
}

async fn commands(
    State(api): Shared,
    query: Result<Query<CommandsQuery>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let unfinished = match q.state.as_deref().unwrap_or("unfinished") {
        "unfinished" => true,
        "all" => false,
        other => {
            return Err(ApiError::bad_request(format!(
                "state must be unfinished or all, got {other:?}"
            )))
        }
    };
    let limit = limit(q.limit, 100)?;
    let list = pg::list_commands(
        &api.pool,
        &api.config.kafka.intents_topic,
        unfinished,
        limit,
    )
    .await
    .map_err(ApiError::store)?;
    Ok(Json(serde_json::json!({ "commands": list })))
}

fn command_id(path: Result<Path<String>, PathRejection>) -> ApiResult<i64> {
    let Path(id) = path.map_err(|e| ApiError::bad_request(e.body_text()))?;
    id.parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| {
        ApiError::bad_request(format!("command id must be a positive integer, got {id:?}"))
    })
}

async fn command(
    State(api): Shared,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<pg::CommandView>> {
    let id = command_id(path)?;
    pg::command(&api.pool, id)
        .await
        .map_err(ApiError::store)?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("command {id} is unknown")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    actor: String,
}

async fn cancel(
    State(api): Shared,
    path: Result<Path<String>, PathRejection>,
    bytes: Bytes,
) -> ApiResult<Response> {
    let parsed = command_id(path).and_then(|id| {
        let b: CancelBody = body(&bytes)?;
        actor(&b.actor)?;
        Ok((id, b))
    });
    let (id, b) = match parsed {
        Ok(p) => p,
        Err(e) => return refuse_unnamed(&api, "cancel_command", e).await,
    };
    let actor = b.actor.as_str();
    let Some((cancelled, view)) = pg::cancel_command(&api.pool, id, actor, AUTH_VALID)
        .await
        .map_err(ApiError::store)?
    else {
        let e = ApiError::not_found(format!("command {id} is unknown"));
        return refuse(
            &api,
            actor,
            "cancel_command",
            "",
            serde_json::json!({ "command": id }),
            e,
        )
        .await;
    };
    if !cancelled {
        return Err(ApiError::conflict(format!(
            "command {id} is {}, not pending: it was not cancelled",
            view.state.name()
        )));
    }
    tracing::info!(command = id, actor, "operator command cancelled");
    Ok(Json(view).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{ManualReview, ReviewReason};

    fn review(reason: ReviewReason) -> ManualReview {
        ManualReview {
            reason: reason as i32,
            intent_id: "i-1".into(),
            source_topic: Config::default().kafka.intents_topic.to_string(),
            ..Default::default()
        }
    }

    /// What `resubmit` refuses and the listing reports, case by case: the item's reason, an
    /// item without an intent id, a cut record, another intents topic, the intent decided since,
    /// the intent re-submitted already and not decided again yet.
    #[test]
    fn an_item_is_resubmittable_only_while_reopenable_whole_ours_and_still_in_review() {
        let config = Config::default();
        let why = |r: &ManualReview, outcome: Option<&str>| {
            not_resubmittable(&config, 0, 7, r, outcome).map(|e| (e.status, e.message))
        };
        for reason in [
            ReviewReason::WaitTimeout,
            ReviewReason::ContactOnHold,
            ReviewReason::ContactBacklogOverflow,
        ] {
            assert_eq!(why(&review(reason), None), None, "{reason:?}");
            assert_eq!(why(&review(reason), Some("manual_review")), None);
        }
        for reason in [
            ReviewReason::VersionConflict,
            ReviewReason::SequenceConflict,
            ReviewReason::IdempotencyConflict,
            ReviewReason::InvalidIntent,
            ReviewReason::Unprocessable,
            ReviewReason::Unspecified,
        ] {
            let (status, message) = why(&review(reason), None).expect("refused");
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
            assert!(message.contains(reason.as_str_name()), "{message}");
        }
        let mut unnamed = review(ReviewReason::WaitTimeout);
        unnamed.intent_id.clear();
        assert_eq!(
            why(&unnamed, None).map(|(s, _)| s),
            Some(StatusCode::UNPROCESSABLE_ENTITY)
        );
        let mut cut = review(ReviewReason::WaitTimeout);
        cut.original_truncated = true;
        cut.original_value_size = 2_000_000;
        let (_, message) = why(&cut, None).expect("refused");
        assert!(message.contains("2000000"), "{message}");
        let mut elsewhere = review(ReviewReason::WaitTimeout);
        elsewhere.source_topic = "other-intents".into();
        let (_, message) = why(&elsewhere, None).expect("refused");
        assert!(message.contains("other-intents"), "{message}");
        let (status, message) =
            why(&review(ReviewReason::WaitTimeout), Some("committed_causal")).expect("refused");
        assert_eq!(status, StatusCode::CONFLICT);
        assert!(message.contains("committed_causal"), "{message}");
        let (status, message) =
            why(&review(ReviewReason::WaitTimeout), Some("resubmitted")).expect("refused");
        assert_eq!(status, StatusCode::CONFLICT);
        assert!(message.contains("re-submitted already"), "{message}");
    }
}
