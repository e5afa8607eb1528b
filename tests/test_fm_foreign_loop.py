"""fm inside a plain optax training loop that knows nothing of rftjax (the README example)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fm


def make_train_step(optimizer, detector):
    """A regression step that also computes fm statistics and runs the detector, all jitted."""

    def loss_fn(params, x, y):
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

    @jax.jit
    def train_step(params, opt_state, det_state, x, y, lr_scale):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: u * lr_scale, updates)
        stats = fm.stats.optimization_stats(grads, updates, params, lr=1e-2 * lr_scale)
        stats["loss"] = loss
        out, det_state = detector.update(stats, det_state, None)
        return optax.apply_updates(params, updates), opt_state, det_state, out

    return train_step


def test_fm_detects_a_learning_rate_spike_in_a_foreign_loop():
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=(8, 1)).astype(np.float32)
    optimizer = optax.sgd(1e-2)
    detector = fm.detect.detector(
        [
            fm.detect.Signal("update_param_ratio", direction="up"),
            fm.detect.Signal("loss", direction="up"),
            fm.detect.Signal("nonfinite_grads", kind="invariant"),
        ]
    )
    params = {"w": jnp.zeros((8, 1)), "b": jnp.zeros((1,))}
    opt_state, det_state = optimizer.init(params), detector.init()
    train_step = make_train_step(optimizer, detector)
    alarms = []
    for step in range(150):
        x = rng.normal(size=(64, 8)).astype(np.float32)
        y = x @ w_true + 0.1 * rng.normal(size=(64, 1)).astype(np.float32)
        lr_scale = 300.0 if step >= 120 else 1.0  # the fault: a learning-rate spike at step 120
        params, opt_state, det_state, out = train_step(
            params, opt_state, det_state, x, y, jnp.float32(lr_scale)
        )
        alarms.append(bool(out.alarm))
    assert train_step._cache_size() == 1
    first = alarms.index(True)
    assert first == 120, f"first alarm at step {first}"
