"""Supervised warm-up, greedy evaluation and the host-scored (text) task path."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import small_shapes

from rftjax import models
from rftjax.config import RLConfig, TrainConfig
from rftjax.tasks import make_task
from rftjax.train import warmup as wu
from rftjax.train.evaluation import Evaluator
from rftjax.train.loop import run

MODEL = models.ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=2
)


@pytest.fixture(scope="module")
def task():
    return make_task("arith", seed=0, eval_size=32)


def test_sft_step_lowers_the_loss_and_compiles_once(task):
    graphdef, params = models.create(MODEL, 0)
    optimizer = wu.sft_optimizer(3e-3)
    step = wu.make_sft_step(graphdef, optimizer, pad_id=0)
    state = wu.SFTState(params, optimizer.init(params))
    fixed = task.train_batch(0, 32)
    losses = []
    for _ in range(30):  # the same batch: the loss must fall
        state, loss = step(state, fixed.prompts, fixed.prompt_mask, fixed.answers)
        losses.append(float(loss))
    other = task.train_batch(1, 32)
    step(state, other.prompts, other.prompt_mask, other.answers)
    assert step._cache_size() == 1
    assert losses[-1] < 0.7 * losses[0]
    # Initial loss of a random model is about log(vocab): a mean NLL over answer tokens.
    assert abs(losses[0] - np.log(64)) < 0.5


def test_evaluator_scores_greedy_answers_and_compiles_once(task):
    graphdef, params = models.create(MODEL, 0)
    evaluator = Evaluator(graphdef, task, max_new_tokens=4)
    first = evaluator(params)
    _, other = models.create(MODEL, 1)
    evaluator(other)
    assert evaluator.greedy._cache_size() == 1
    assert 0.0 <= first["eval_accuracy"] <= 1.0
    # Cross-check against decoding on the host and the text verifier.
    response = np.asarray(
        evaluator.greedy(params, evaluator.batch.prompts, evaluator.batch.prompt_mask)
    )
    scores = task.jnp_reward(response, evaluator.batch.answers)
    assert first["eval_accuracy"] == pytest.approx(float(np.mean(scores["correct"])))


def test_jsonl_task_trains_through_host_rewards(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "sums.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for a, b in rng.integers(0, 50, (200, 2)):
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": int(a + b)}) + "\n")
    cfg = TrainConfig(
        workdir=str(tmp_path / "run"),
        task=f"jsonl:{path}",
        steps=3,
        model_overrides=small_shapes.OVERRIDES,
        warmup_steps=5,
        warmup_batch_size=8,
        eval_size=16,
        eval_every=3,
        checkpoint_every=3,
        rl=RLConfig(prompts_per_step=2, group_size=2, max_new_tokens=4),
    )
    summary = run(cfg)
    assert summary["steps_completed"] == 3
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all("reward_format" in r and np.isfinite(r["loss"]) for r in records)


def test_cached_warm_up_gives_every_run_the_same_arrays(tmp_path, task):
    # The run that computes the warm-up and the runs that read it from the cache get the same
    # values and placement, so a step compiled for one serves the others (one compile).
    from rftjax.train.warm_start import run_warmup

    cfg = TrainConfig(
        workdir=str(tmp_path),
        warmup_steps=2,
        warmup_batch_size=4,
        model_overrides=small_shapes.OVERRIDES,  # = MODEL
    )
    graphdef, params = models.create(MODEL, 0)
    computed, seconds = run_warmup(cfg, graphdef, params, task)
    cached, cached_seconds = run_warmup(cfg, graphdef, params, task)
    assert seconds > 0 and cached_seconds == 0.0  # the second call read the cache
    norm = jax.jit(lambda p: sum(jnp.sum(x * x) for x in jax.tree.leaves(p)))
    assert float(norm(computed)) == float(norm(cached))
    assert norm._cache_size() == 1
    for a, b in zip(jax.tree.leaves(computed), jax.tree.leaves(cached), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert (a.sharding, a.committed) == (b.sharding, b.committed)
