//! The canary analysis over one reconcile's scrape of the model's pods
//! ([`crate::scrape::scrape_variants`]): keeps each pod's counters over the window
//! ([`History`]), then judges ([`judge`](mod@crate::rollout::judge)) and decides
//! ([`plan`](crate::rollout::plan)).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use sluice_crds::InferenceModel;
use sluice_crds::inference_model::Analysis;
use tracing::debug;

use crate::rollout::judge::{Counters, Verdict, judge};
use crate::rollout::plan::{Decision, decide, millis_between};
use crate::scrape::Scraped;

/// Identifies one pod's series: model (`namespace/name`), variant, pod.
type PodKey = (String, String, String);

#[derive(Debug)]
struct PodHistory {
    generation: i64,
    snapshots: VecDeque<(Timestamp, Counters)>,
}

/// The counters read from each pod, kept for one window, per model generation. Lives in the
/// controller's Context (analysis state that is cheap to lose: after an operator restart the
/// window starts again at the first scrape).
#[derive(Debug, Default)]
pub struct History(Mutex<HashMap<PodKey, PodHistory>>);

// === impl History ===

impl History {
    /// Records `counters` read from a pod at `now` and returns their increase over `window`
    /// (since the newest reading at least `window` old, else since the oldest reading of this
    /// generation; zero on the first reading).
    pub fn observe(
        &self,
        key: (&str, &str, &str),
        generation: i64,
        now: Timestamp,
        counters: Counters,
        window: Duration,
    ) -> Counters {
        // A poisoned lock only means another reconcile panicked; the map is still usable.
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let key = (key.0.to_owned(), key.1.to_owned(), key.2.to_owned());
        let h = map.entry(key).or_insert_with(|| PodHistory {
            generation,
            snapshots: VecDeque::new(),
        });
        if h.generation != generation {
            // A new spec generation: what was served before the edit no longer counts.
            h.generation = generation;
            h.snapshots.clear();
        }
        // Readings less than a second apart (a burst of watch events) replace each other.
        if let Some((t, _)) = h.snapshots.back()
            && millis_between(*t, now) < 1000
            && h.snapshots.len() > 1
        {
            h.snapshots.pop_back();
        }
        h.snapshots.push_back((now, counters.clone()));
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX);
        // Keep one reading at or before the window's start (the base), drop older ones.
        while h.snapshots.len() > 1 && millis_between(h.snapshots[1].0, now) >= window_ms {
            h.snapshots.pop_front();
        }
        let base = &h.snapshots[0].1;
        counters.delta(base)
    }

    /// Forgets the pods of `model` that are not in `live` (deleted pods, removed variants).
    pub fn retain(&self, model: &str, live: &BTreeSet<(String, String)>) {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|(m, v, p), _| m != model || live.contains(&(v.clone(), p.clone())));
    }

    /// Forgets everything about `model` (analysis turned off, model deleted).
    pub fn forget(&self, model: &InferenceModel) {
        self.retain(&model_key(model), &BTreeSet::new());
    }
}

/// What a model's pods are kept under in the [`History`]: `namespace/name`.
fn model_key(model: &InferenceModel) -> String {
    format!(
        "{}/{}",
        model.namespace().unwrap_or_default(),
        model.name_any()
    )
}

/// Each variant's counters' increase over the window, from the `scraped` pods of `model`:
/// what its own pods answered, plus the forwards to it that other pods saw fail (a variant
/// whose pods are all down is judged by those alone). Pods that could not be scraped are
/// skipped.
pub fn measure(
    history: &History,
    model: &InferenceModel,
    scraped: &[Scraped],
    analysis: &Analysis,
    now: Timestamp,
) -> BTreeMap<String, Counters> {
    let model_key = model_key(model);
    let generation = model.metadata.generation.unwrap_or(0);
    let mut out: BTreeMap<String, Counters> = BTreeMap::new();
    let mut live = BTreeSet::new();
    for Scraped {
        variant,
        pod: ep,
        samples,
    } in scraped
    {
        let Ok(samples) = samples else { continue };
        // What the pod answered as its own variant, and what its forwards to each other
        // variant that failed say about that one; each kept as its own counter history.
        for judged in &model.spec.variants {
            let counters = if judged.name == *variant {
                Counters::from_samples(samples, variant)
            } else {
                Counters::from_forward_failures(samples, &judged.name)
            };
            live.insert((judged.name.clone(), ep.name.clone()));
            let delta = history.observe(
                (&model_key, &judged.name, &ep.name),
                generation,
                now,
                counters,
                analysis.window.into(),
            );
            out.entry(judged.name.clone()).or_default().add(&delta);
        }
    }
    history.retain(&model_key, &live);
    out
}

/// Judges and decides for one model from this reconcile's `scraped` pods: the model with its
/// new `status.rollout` (what [`crate::rollout::plan::route_plan`] and
/// [`crate::status::compute`] read). Without `spec.rollout` the model is returned with no
/// rollout state; without `spec.rollout.analysis` the samples are not read.
pub fn analyze(
    history: &History,
    model: &InferenceModel,
    scraped: &[Scraped],
    now: Timestamp,
) -> (InferenceModel, Decision) {
    let analysis = model
        .spec
        .rollout
        .as_ref()
        .and_then(|r| r.analysis.as_ref());
    let verdicts: BTreeMap<String, Verdict> = match analysis {
        Some(a) => measure(history, model, scraped, a, now)
            .into_iter()
            .map(|(v, c)| {
                let verdict = judge(&c, a);
                debug!(variant = %v, ?verdict, "canary analysis");
                (v, verdict)
            })
            .collect(),
        None => {
            history.forget(model);
            BTreeMap::new()
        }
    };
    let decision = decide(model, &verdicts, now);
    let mut planned = model.clone();
    if decision.rollout.is_some() || planned.status.as_ref().is_some_and(|s| s.rollout.is_some()) {
        planned.status.get_or_insert_default().rollout = decision.rollout.clone();
    }
    (planned, decision)
}
