//! Test builders and a mocked API server (the controller-rs `ApiServerVerifier` pattern): each
//! test states the exact requests it expects, in order, with their responses.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::client::Body;
use kube::runtime::events::Reporter;
use serde_json::{Value, json};
use sluice_crds::InferenceModel;

use crate::controller::{Context, desired_state};
use crate::desired::weights::{EffectiveWeights, for_plan};
use crate::desired::{Desired, Settings};
use crate::metrics::Metrics;
use crate::names::{FIELD_MANAGER, LABEL_MODEL, LABEL_VARIANT};
use crate::observe::ReadyCounts;
use crate::policy::merge::ModelLimits;
use crate::rollout::plan::route_plan;
use crate::scrape::MetricsSource;

type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// Images used by every test.
pub fn settings() -> Settings {
    Settings {
        sidecar_image: "sidecar:test".to_owned(),
        sidecar_cuda_image: "sidecar-cuda:test".to_owned(),
        tracing_env: Vec::new(),
    }
}

/// The fixed clock of the tests.
pub fn test_now() -> Timestamp {
    Timestamp::from_second(1_700_000_000).expect("valid timestamp")
}

/// Parses an InferenceModel.
pub fn model_from_yaml(yaml: &str) -> InferenceModel {
    serde_yaml::from_str(yaml).expect("valid InferenceModel")
}

/// Parses a Pod.
pub fn pod_from_yaml(yaml: &str) -> Pod {
    serde_yaml::from_str(yaml).expect("valid Pod")
}

/// What a reconcile of `model` in namespace `ns` applies with `limits` and `ready` pods (the
/// rollout state `model` carries decides the weights).
pub fn desired_with(
    model: &InferenceModel,
    limits: &ModelLimits,
    ready: &ReadyCounts,
) -> crate::Result<Desired> {
    desired_state(model, "ns", &settings(), limits, ready, &[]).map(|(_, desired)| desired)
}

/// [`desired_for`] among the InferenceModels `models` of its namespace.
pub fn desired_in(model: &InferenceModel, models: &[InferenceModel]) -> crate::Result<Desired> {
    desired_state(
        model,
        "ns",
        &settings(),
        &ModelLimits::default(),
        &ReadyCounts::none(),
        models,
    )
    .map(|(_, desired)| desired)
}

/// [`desired_with`] with no policies and no ready pod.
pub fn desired_for(model: &InferenceModel) -> crate::Result<Desired> {
    desired_with(model, &ModelLimits::default(), &ReadyCounts::none())
}

/// The effective weights a reconcile computes for `model` with `ready` pods.
pub fn weights_for(model: &InferenceModel, ready: &ReadyCounts) -> EffectiveWeights {
    for_plan(&route_plan(model), ready)
}

/// A variant's Deployment as the API server reports it.
pub fn deployment_with_status(model: &str, variant: &str, replicas: i32, ready: i32) -> Deployment {
    Deployment {
        metadata: ObjectMeta {
            name: Some(format!("{model}-{variant}")),
            generation: Some(1),
            labels: Some(
                [
                    (LABEL_MODEL.to_owned(), model.to_owned()),
                    (LABEL_VARIANT.to_owned(), variant.to_owned()),
                ]
                .into(),
            ),
            ..Default::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(replicas),
            ..Default::default()
        }),
        status: Some(DeploymentStatus {
            observed_generation: Some(1),
            replicas: Some(replicas),
            updated_replicas: Some(replicas),
            ready_replicas: Some(ready),
            available_replicas: Some(ready),
            ..Default::default()
        }),
    }
}

// === impl Context ===

impl Context {
    /// A context whose client talks to the returned mocked API server.
    pub fn test() -> (Arc<Self>, ApiServerVerifier) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: Some("test".to_owned()),
        };
        let ctx =
            Context::new(client, settings(), Metrics::default(), reporter).with_clock(test_now);
        (Arc::new(ctx), ApiServerVerifier(handle))
    }

    /// [`Context::test`] whose canary analysis reads sidecar metrics from `source`.
    pub fn test_with_metrics(source: Arc<dyn MetricsSource>) -> (Arc<Self>, ApiServerVerifier) {
        let (ctx, server) = Self::test();
        let ctx = Arc::into_inner(ctx)
            .expect("just created: one reference")
            .with_metrics_source(source);
        (Arc::new(ctx), server)
    }
}

/// One expected request and the answer the mocked API server gives.
#[derive(Clone, Debug)]
pub struct Step {
    method: Method,
    path: String,
    reply: Reply,
}

#[derive(Clone, Debug)]
enum Reply {
    /// A list with these items.
    List(Vec<Value>),
    /// Echo the request body back (what a successful apply/create returns, near enough).
    Echo,
    /// This body.
    Json(Value),
    /// An error Status with this code.
    Error(u16),
    /// A success Status (deletes).
    Success,
}

// === impl Step ===

impl Step {
    /// `GET path` (a list, with a label selector) answered with `items`.
    pub fn list(path: &str, items: Vec<Value>) -> Self {
        Self {
            method: Method::GET,
            path: path.to_owned(),
            reply: Reply::List(items),
        }
    }

    /// `PATCH path` as a forced server-side apply under the operator's field manager.
    pub fn apply(path: &str) -> Self {
        Self {
            method: Method::PATCH,
            path: path.to_owned(),
            reply: Reply::Echo,
        }
    }

    /// `PATCH` of `model`'s status subresource (forced server-side apply), answered with the
    /// model.
    pub fn apply_status(model: &InferenceModel) -> Self {
        let meta = &model.metadata;
        Self {
            method: Method::PATCH,
            path: format!(
                "/apis/sluice.dev/v1alpha1/namespaces/{}/inferencemodels/{}/status",
                meta.namespace.as_deref().unwrap_or("default"),
                meta.name.as_deref().unwrap_or_default()
            ),
            reply: Reply::Json(serde_json::to_value(model).expect("encodes")),
        }
    }

    /// `PATCH path` as a forced server-side apply, answered with `reply` (for status patches of
    /// other kinds, whose echoed body alone would not decode).
    pub fn apply_replying(path: &str, reply: Value) -> Self {
        Self {
            method: Method::PATCH,
            path: path.to_owned(),
            reply: Reply::Json(reply),
        }
    }

    /// `GET path` of one object: `Some(body)`, or 404 for `None`.
    pub fn get(path: &str, body: Option<Value>) -> Self {
        let reply = match body {
            Some(v) => Reply::Json(v),
            None => Reply::Error(404),
        };
        Self {
            method: Method::GET,
            path: path.to_owned(),
            reply,
        }
    }

    /// The list of every InferenceModel of `ns` (no label selector: all of them), answered with
    /// `items`.
    pub fn models(ns: &str, items: Vec<Value>) -> Self {
        Self::get(
            &format!("/apis/sluice.dev/v1alpha1/namespaces/{ns}/inferencemodels"),
            Some(json!({
                "apiVersion": "sluice.dev/v1alpha1",
                "kind": "InferenceModelList",
                "metadata": {},
                "items": items,
            })),
        )
    }

    /// `POST path` (a create), echoed.
    pub fn create(path: &str) -> Self {
        Self {
            method: Method::POST,
            path: path.to_owned(),
            reply: Reply::Echo,
        }
    }

    /// `PUT path` (a replace), echoed.
    pub fn replace(path: &str) -> Self {
        Self {
            method: Method::PUT,
            path: path.to_owned(),
            reply: Reply::Echo,
        }
    }

    /// `DELETE path`.
    pub fn delete(path: &str) -> Self {
        Self {
            method: Method::DELETE,
            path: path.to_owned(),
            reply: Reply::Success,
        }
    }

    /// `POST` of an Event in `ns`.
    pub fn event(ns: &str) -> Self {
        Self {
            method: Method::POST,
            path: format!("/apis/events.k8s.io/v1/namespaces/{ns}/events"),
            reply: Reply::Echo,
        }
    }

    /// The `POST` of a forwarding Secret in `ns`, refused because it exists (the reconcile
    /// leaves it alone, unread).
    pub fn forwarding_secret_exists(ns: &str) -> Self {
        Self::create(&format!("/api/v1/namespaces/{ns}/secrets")).fails_with(409)
    }

    /// Answers this step with an error Status instead.
    pub fn fails_with(mut self, code: u16) -> Self {
        self.reply = Reply::Error(code);
        self
    }
}

/// A request the mocked API server received.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// HTTP method.
    pub method: Method,
    /// Path without the query.
    pub path: String,
    /// The query string.
    pub query: String,
    /// The JSON body (Null when empty).
    pub body: Value,
    /// The status the mocked API server answered.
    pub status: StatusCode,
}

// === impl Recorded ===

impl Recorded {
    /// Whether the request left the cluster as it was: a read, or a write the API server
    /// refused (the forwarding Secret's create when it exists).
    pub fn changes_nothing(&self) -> bool {
        self.method == Method::GET || !self.status.is_success()
    }
}

/// The mocked API server side.
pub struct ApiServerVerifier(ApiServerHandle);

impl ApiServerVerifier {
    /// Serves `steps` in order, asserting each request matches, then stops (any further request
    /// fails on the client side). Returns what was received.
    pub fn run(self, steps: Vec<Step>) -> tokio::task::JoinHandle<Vec<Recorded>> {
        tokio::spawn(async move {
            let mut handle = self.0;
            let mut recorded = Vec::new();
            for (i, step) in steps.into_iter().enumerate() {
                let (request, send) =
                    tokio::time::timeout(std::time::Duration::from_secs(5), handle.next_request())
                        .await
                        .unwrap_or_else(|_| {
                            panic!(
                                "step {i}: timed out waiting for {} {}",
                                step.method, step.path
                            )
                        })
                        .unwrap_or_else(|| {
                            panic!("step {i}: client gone before {} {}", step.method, step.path)
                        });
                let method = request.method().clone();
                let path = request.uri().path().to_owned();
                let query = request.uri().query().unwrap_or_default().to_owned();
                let content_type = request
                    .headers()
                    .get(http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let bytes = request
                    .into_body()
                    .collect()
                    .await
                    .expect("body")
                    .to_bytes();
                let body: Value = if bytes.is_empty() {
                    Value::Null
                } else {
                    serde_json::from_slice(&bytes).expect("JSON body")
                };
                assert_eq!(
                    (&method, path.as_str()),
                    (&step.method, step.path.as_str()),
                    "step {i}: unexpected request (query {query})"
                );
                if method == Method::PATCH {
                    assert_eq!(
                        content_type, "application/apply-patch+yaml",
                        "step {i}: {path} must be a server-side apply"
                    );
                    assert!(
                        query.contains(&format!("fieldManager={FIELD_MANAGER}")),
                        "step {i}: {path}: field manager missing in {query}"
                    );
                    assert!(
                        query.contains("force=true"),
                        "step {i}: {path}: force missing in {query}"
                    );
                }
                if matches!(step.reply, Reply::List(_)) {
                    assert!(
                        query.contains("labelSelector="),
                        "step {i}: {path}: list without a label selector"
                    );
                }
                let (status, reply) = match &step.reply {
                    Reply::List(items) => (
                        StatusCode::OK,
                        json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": "1"}, "items": items}),
                    ),
                    Reply::Echo => (StatusCode::OK, body.clone()),
                    Reply::Json(v) => (StatusCode::OK, v.clone()),
                    Reply::Success => (
                        StatusCode::OK,
                        json!({"apiVersion": "v1", "kind": "Status", "status": "Success", "code": 200}),
                    ),
                    Reply::Error(code) => (
                        StatusCode::from_u16(*code).expect("status code"),
                        json!({
                            "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code,
                            // As the API server words them (a create of an existing name is
                            // AlreadyExists; other 409s are Conflict).
                            "reason": match (code, &method) {
                                (409, &Method::POST) => "AlreadyExists",
                                (409, _) => "Conflict",
                                (404, _) => "NotFound",
                                (403, _) => "Forbidden",
                                _ => "InternalError",
                            },
                            "message": format!("mocked {code}"),
                        }),
                    ),
                };
                let response = Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&reply).expect("encodes")))
                    .expect("response");
                send.send_response(response);
                recorded.push(Recorded {
                    method,
                    path,
                    query,
                    body,
                    status,
                });
            }
            recorded
        })
    }
}
