"""fm inside a plain optax training loop that knows nothing of rftjax (the README example)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fm


def make_train_step(optimizer, monitor):
    """A regression step that also runs fm's monitor (statistics, audits, detector), jitted."""

    def loss_fn(params, x, y):
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

    @jax.jit
    def train_step(params, opt_state, fm_state, x, y, lr_scale):
        read = monitor.read(params, opt_state, None)  # the weights as this step finds them
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u: u * lr_scale, updates)
        params = optax.apply_updates(params, updates)
        inputs = fm.monitor.StepInputs(grads=grads, updates=updates, params=params, lr=lr_scale)
        stats, out, fm_state = monitor.update(
            inputs, fm_state, stats={"loss": loss}, read=read, sealed=(params, opt_state)
        )
        return params, opt_state, fm_state, out

    return train_step


def test_fm_detects_a_learning_rate_spike_in_a_foreign_loop():
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=(8, 1)).astype(np.float32)
    optimizer = optax.sgd(1e-2)
    monitor = fm.monitor.monitor(
        group_size=1,
        max_len=1,
        inputs=("grads", "updates", "params", "lr"),
        signals=[
            fm.detect.Signal("update_param_ratio", direction="up"),
            fm.detect.Signal("loss", direction="up"),  # the trainer's own statistic
            fm.detect.Signal("nonfinite_grads", kind="invariant"),
            fm.detect.Signal("check_weights", kind="invariant"),
            fm.detect.Signal("reward_mean"),  # needs rewards: left out, with the reason
        ],
    )
    assert [name for name, _ in monitor.unavailable] == ["reward_mean"]
    params = {"w": jnp.zeros((8, 1)), "b": jnp.zeros((1,))}
    opt_state = optimizer.init(params)
    fm_state = monitor.init(params, opt_state, None)
    train_step = make_train_step(optimizer, monitor)
    alarms = []
    for step in range(150):
        x = rng.normal(size=(64, 8)).astype(np.float32)
        y = x @ w_true + 0.1 * rng.normal(size=(64, 1)).astype(np.float32)
        lr_scale = 300.0 if step >= 120 else 1.0  # the fault: a learning-rate spike at step 120
        params, opt_state, fm_state, out = train_step(
            params, opt_state, fm_state, x, y, jnp.float32(lr_scale)
        )
        alarms.append(fm.detect.Reading.from_record(fm.detect.flags_to_dict(monitor.detector, out)))
    assert train_step._cache_size() == 1
    first = next(i for i, r in enumerate(alarms) if r.alarm)
    assert first == 120, f"first alarm at step {first}"
    assert "update_param_ratio" in alarms[120].flagged
    assert "check_weights" not in alarms[120].flagged  # nothing touched the weights between steps
