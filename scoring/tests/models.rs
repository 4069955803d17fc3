//! The committed models against the training script's reference outputs, and the
//! registry's hot reload under load.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use feedgraph_scoring::{Error, LocalScorer, ModelKind, Registry};

#[test]
fn both_models_reproduce_the_reference_outputs() {
    let (registry, report) = Registry::open(common::models_dir()).unwrap();
    assert!(report.refused.is_empty(), "{report:?}");
    for (model, kind) in [("engagement_mlp", ModelKind::Onnx), ("engagement_gbdt", ModelKind::LightGbm)] {
        let served = registry.get(model).expect(model);
        assert_eq!(served.kind(), kind);
        let want = common::reference_outputs(model);
        assert_eq!(want.scores.len(), 64);
        let batches = common::reference_batches(model);
        let mut worst = 0.0f64;
        for (batch, expected) in batches.iter().zip(&want.scores) {
            let got = registry.score(batch).unwrap();
            assert_eq!((got.model.as_str(), got.version), (model, want.version));
            worst = worst.max((f64::from(got.scores[0]) - expected).abs());
        }
        assert!(worst < 1e-5, "{model}: worst difference {worst}");
        // The scores are not all alike (a constant model would pass trivially).
        let spread = want.scores.iter().cloned().fold(f64::MIN, f64::max)
            - want.scores.iter().cloned().fold(f64::MAX, f64::min);
        assert!(spread > 0.05, "{model}: reference scores barely vary ({spread})");
    }
}

#[test]
fn bad_batches_are_typed_errors() {
    let (registry, _) = Registry::open(common::models_dir()).unwrap();
    let scorer = LocalScorer::new(registry.clone(), 100);
    let batch = common::big_batch("engagement_gbdt", 101);
    assert!(matches!(scorer.score_blocking(&batch), Err(Error::BatchTooLarge { items: 101, max: 100 })));
    let mut batch = common::big_batch("nope", 3);
    assert!(matches!(scorer.score_blocking(&batch), Err(Error::UnknownModel(m)) if m == "nope"));
    batch.model = "engagement_mlp".into();
    let width = batch.feature_names.len();
    batch.values[2 * width + 1] = f32::INFINITY;
    let err = scorer.score_blocking(&batch).unwrap_err().to_string();
    assert!(err.contains("item 2") && err.contains("`saves`"), "{err}");
    batch.values.pop();
    assert!(scorer.score_blocking(&batch).unwrap_err().to_string().contains("for 3 items"));
    // An empty batch scores nothing.
    batch.item_ids.clear();
    batch.values.clear();
    assert!(scorer.score_blocking(&batch).unwrap().scores.is_empty());
}

/// Publishes `dir/<model>/<version>` the way operators are told to: write elsewhere,
/// then rename.
fn publish(dir: &std::path::Path, model: &str, version: u64, edit: impl Fn(&std::path::Path)) {
    let staging = dir.join(model).join(format!(".tmp-{version}"));
    common::copy_tree(&common::models_dir().join(model).join("1"), &staging);
    edit(&staging);
    std::fs::rename(&staging, dir.join(model).join(version.to_string())).unwrap();
}

#[test]
fn hot_reload_swaps_versions_without_failing_requests() {
    let tmp = tempfile::tempdir().unwrap();
    common::copy_tree(&common::models_dir(), tmp.path());
    let (registry, _) = Registry::open(tmp.path()).unwrap();
    let model = "engagement_gbdt";
    let batch = common::big_batch(model, 200);
    let v1 = registry.score(&batch).unwrap();

    // Version 2 reads `quality` on another scale, so its scores differ from version 1.
    publish(tmp.path(), model, 2, |d| {
        let p = d.join("schema.toml");
        let text = shift_first_mean(&std::fs::read_to_string(&p).unwrap());
        std::fs::write(&p, text).unwrap();
    });
    let v2_expected = {
        let m = feedgraph_scoring::LoadedModel::load(model, 2, &tmp.path().join(model).join("2")).unwrap();
        m.score(&batch).unwrap().scores
    };
    assert_ne!(v2_expected, v1.scores);

    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..3 {
        let (registry, batch, stop) = (registry.clone(), batch.clone(), stop.clone());
        let (v1, v2) = (v1.scores.clone(), v2_expected.clone());
        workers.push(std::thread::spawn(move || {
            let mut seen = [0u32; 2];
            for _ in 0..20_000 {
                let s = registry.score(&batch).expect("no request fails during a reload");
                match s.version {
                    1 => assert_eq!(s.scores, v1, "version 1 named, version 1 scores"),
                    2 => assert_eq!(s.scores, v2, "version 2 named, version 2 scores"),
                    v => panic!("unexpected version {v}"),
                }
                seen[s.version as usize - 1] += 1;
                if stop.load(Ordering::Relaxed) && seen[1] > 0 {
                    break;
                }
            }
            seen
        }));
    }
    std::thread::sleep(std::time::Duration::from_millis(30));
    let report = registry.reload().unwrap();
    assert_eq!(report.loaded, vec![(model.to_string(), 2)]);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let seen = w.join().unwrap();
        assert!(seen[1] > 0, "every worker saw version 2 after the swap: {seen:?}");
    }

    // A corrupt version 3 is refused, once, and version 2 keeps serving.
    publish(tmp.path(), model, 3, |d| {
        std::fs::write(d.join("model.txt"), "tree\nversion=v4\nmax_feature_idx=31\nTree=0\nnum_leaves=3\n")
            .unwrap()
    });
    let report = registry.reload().unwrap();
    assert_eq!(report.refused.len(), 1, "{report:?}");
    assert!(report.refused[0].2.contains("3"), "{report:?}");
    assert_eq!(registry.get(model).unwrap().version, 2);
    assert_eq!(registry.score(&batch).unwrap().scores, v2_expected);
    assert_eq!(registry.reload().unwrap(), Default::default(), "a refused version is not retried unchanged");

    // A truncated network is refused too; the MLP keeps its version 1.
    publish(tmp.path(), "engagement_mlp", 2, |d| {
        let p = d.join("model.onnx");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    });
    let report = registry.reload().unwrap();
    assert_eq!(report.refused.len(), 1, "{report:?}");
    assert_eq!(registry.get("engagement_mlp").unwrap().version, 1);

    // Removing a model's directory stops serving it.
    std::fs::remove_dir_all(tmp.path().join("engagement_mlp")).unwrap();
    assert_eq!(registry.reload().unwrap().removed, vec!["engagement_mlp".to_string()]);
    assert!(registry.get("engagement_mlp").is_none());
}

/// Adds 0.1 to the first `mean = ` of a schema.
fn shift_first_mean(text: &str) -> String {
    let mut done = false;
    text.lines()
        .map(|l| match l.strip_prefix("mean = ") {
            Some(v) if !done => {
                done = true;
                let v: f64 = v.parse().unwrap();
                format!("mean = {}", v + 0.1)
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}
