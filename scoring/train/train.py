#!/usr/bin/env python3
"""Trains feedgraph's two demo ranking models and exports them for serving.

Input: the CSV that `feedgraph export-features` writes — the exact features the broker
sends the ML scorer, for sampled users of the demo graph. The demo graph has no real
engagement, so this script simulates it: a hidden click-probability function of the
features (with interactions a linear light score cannot express) and Bernoulli labels.

Output (under --out, the repository's scoring/models by default):
  engagement_mlp/1/{model.onnx,schema.toml}   an MLP (scikit-learn → ONNX), run by tract
  engagement_gbdt/1/{model.txt,schema.toml}   LightGBM trees, run by feedgraph's evaluator
and under --reference (scoring/tests/reference): a fixed input set and both models'
outputs on it, which the Rust tests must reproduce within 1e-5; and metrics.json
(held-out AUC of each model against the light score).

Run through `scoring/train/train.sh`, which builds the exporter and a pinned venv.
"""

import argparse
import json
import os

import lightgbm as lgb
import numpy as np
import onnxruntime as ort
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.metrics import roc_auc_score
from sklearn.neural_network import MLPRegressor

SEED = 7

ITEM = ["quality", "saves", "clicks", "closeups", "age_hours", "click_rate", "closeup_rate",
        "light_score", "from_user", "from_board", "from_topic", "from_engaged_topic", "position",
        "follows_owner", "owner_share", "board_share"]
USER = ["user.follows_users", "user.follows_boards", "user.follows_topics", "user.home",
        "user.candidates", "user.sessions_7d", "user.tenure_days", "user.mobile", "user.saves_30d",
        "user.clicks_30d", "user.hour", "user.weekday", "user.notifications", "user.country_us",
        "user.age_bucket", "user.followers"]
LOG1P = {"saves", "clicks", "closeups", "age_hours", "position", "user.follows_users",
         "user.follows_boards", "user.candidates", "user.sessions_7d", "user.tenure_days",
         "user.saves_30d", "user.clicks_30d", "user.followers"}
# Defaults for features a caller leaves out: typical values, not zero, for counters.
DEFAULTS = {"user.sessions_7d": 4.0, "user.tenure_days": 1000.0, "user.mobile": 1.0,
            "user.saves_30d": 8.0, "user.clicks_30d": 20.0, "user.hour": 12.0,
            "user.weekday": 3.0, "user.age_bucket": 2.0, "user.followers": 50.0,
            "user.candidates": 500.0}


def read(path):
    with open(path) as f:
        header = f.readline().strip().split(",")
    data = np.loadtxt(path, delimiter=",", skiprows=1, usecols=range(3, len(header)), dtype=np.float64)
    names = header[3:]
    # Values travel as float32 on the wire: train and check on exactly those.
    data = data.astype(np.float32).astype(np.float64)
    return {n: data[:, i] for i, n in enumerate(names)}, data.shape[0]


def engagement_probability(f):
    """The hidden truth: what simulated users click."""
    z = (-5.4
         + 2.0 * f["quality"]
         + 0.30 * np.log1p(f["saves"])
         + 0.25 * np.minimum(f["click_rate"], 6.0)
         - 0.55 * np.log1p(f["age_hours"])
         + 0.70 * f["from_user"] + 0.35 * f["from_board"] + 0.25 * f["from_topic"]
         + 0.45 * f["follows_owner"]
         - 4.0 * f["owner_share"]
         - 0.0015 * f["position"]
         + 0.30 * np.log1p(f["user.sessions_7d"])
         + 0.15 * f["user.notifications"]
         # Interactions a linear light score cannot express.
         + f["user.mobile"] * (0.9 * f["quality"] - 0.25 * f["closeup_rate"])
         + f["user.home"] * f["from_engaged_topic"] * 0.6
         + 0.3 * np.sin(f["user.hour"] / 24.0 * 2 * np.pi))
    return 1.0 / (1.0 + np.exp(-z))


def transform(f, names, stats=None):
    cols = []
    for n in names:
        v = f[n]
        if n in LOG1P:
            v = np.log1p(np.maximum(v, 0.0))
        cols.append(v)
    x = np.stack(cols, axis=1)
    if stats is None:
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        std[std < 1e-9] = 1.0
        stats = (mean, std)
    return (x - stats[0]) / stats[1], stats


def schema_toml(names, stats):
    mean, std = stats
    out = ["# Feature schema: input columns in order, written by scoring/train/train.py.", ""]
    for i, n in enumerate(names):
        out += ["[[feature]]",
                f'name = "{n}"',
                f'source = "{"user" if n.startswith("user.") else "item"}"',
                f"default = {float(DEFAULTS.get(n, 0.0))!r}",
                f'transform = "{"log1p" if n in LOG1P else "identity"}"',
                f"mean = {float(mean[i])!r}",
                f"std = {float(std[i])!r}",
                ""]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--reference", required=True)
    ap.add_argument("--metrics", required=True)
    args = ap.parse_args()

    names = ITEM + USER
    f, n = read(args.features)
    rng = np.random.default_rng(SEED)
    p = engagement_probability(f)
    y = (rng.random(n) < p).astype(np.float64)
    order = rng.permutation(n)
    split = int(n * 0.8)
    train_idx, test_idx = order[:split], order[split:]

    x_all, stats = transform(f, names)
    x_train, x_test = x_all[train_idx], x_all[test_idx]
    y_train, y_test = y[train_idx], y[test_idx]

    mlp = MLPRegressor(hidden_layer_sizes=(64, 32), activation="relu", alpha=1e-4,
                       learning_rate_init=1e-3, max_iter=60, early_stopping=True,
                       random_state=SEED)
    mlp.fit(x_train, y_train)
    onnx_model = convert_sklearn(mlp, initial_types=[("features", FloatTensorType([None, len(names)]))],
                                 target_opset=15)

    gbdt = lgb.train(
        # Depth is capped: the evaluator descends every tree to its full depth
        # (branch-free), so serving cost follows max depth, not leaf count. Measured
        # on this data: unlimited depth (max 7) AUC 0.7754, depth 4 AUC 0.7745 at about
        # 0.4× the scoring time (1,000 rows: p50 1.06 → 0.42 ms).
        {"objective": "binary", "num_leaves": 15, "max_depth": 4, "learning_rate": 0.1, "min_data_in_leaf": 50,
         "feature_fraction": 0.9, "seed": SEED, "deterministic": True, "num_threads": 1,
         "verbose": -1},
        lgb.Dataset(x_train, label=y_train, feature_name=names),
        num_boost_round=80,
    )

    mlp_dir = os.path.join(args.out, "engagement_mlp", "1")
    gbdt_dir = os.path.join(args.out, "engagement_gbdt", "1")
    for d in (mlp_dir, gbdt_dir):
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "schema.toml"), "w") as out:
            out.write(schema_toml(names, stats))
    with open(os.path.join(mlp_dir, "model.onnx"), "wb") as out:
        out.write(onnx_model.SerializeToString())
    gbdt.save_model(os.path.join(gbdt_dir, "model.txt"))

    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])

    def mlp_scores(x):
        return session.run(None, {"features": x.astype(np.float32)})[0].reshape(-1).astype(np.float64)

    # Held-out quality, against the light score the model replaces.
    auc = {
        "light_score": roc_auc_score(y_test, f["light_score"][test_idx]),
        "engagement_mlp": roc_auc_score(y_test, mlp_scores(x_test)),
        "engagement_gbdt": roc_auc_score(y_test, gbdt.predict(x_test)),
        "oracle": roc_auc_score(y_test, p[test_idx]),
    }
    sk = mlp.predict(x_test[:1000])
    assert np.max(np.abs(sk - mlp_scores(x_test[:1000]))) < 1e-4, "ONNX export disagrees with sklearn"

    # The fixed reference set: 64 held-out rows, raw (as the scorer receives them).
    ref_idx = test_idx[:64]
    rows = [{"item": {k: float(f[k][i]) for k in ITEM}, "user": {k: float(f[k][i]) for k in USER}}
            for i in ref_idx]
    x_ref = x_all[ref_idx]
    os.makedirs(args.reference, exist_ok=True)
    with open(os.path.join(args.reference, "inputs.json"), "w") as out:
        json.dump({"item_features": ITEM, "rows": rows}, out, indent=0)
    for name, scores in (("engagement_mlp", mlp_scores(x_ref)), ("engagement_gbdt", gbdt.predict(x_ref))):
        with open(os.path.join(args.reference, f"{name}.json"), "w") as out:
            json.dump({"model": name, "version": 1, "scores": [float(s) for s in scores]}, out, indent=0)

    metrics = {"rows": int(n), "train_rows": int(split), "positive_rate": float(y.mean()),
               "held_out_auc": {k: round(float(v), 4) for k, v in auc.items()},
               "mlp_iterations": int(mlp.n_iter_), "gbdt_trees": int(gbdt.num_trees())}
    with open(args.metrics, "w") as out:
        json.dump(metrics, out, indent=2)
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
