"""A run's set-up: task, model, compiled learner and evaluator, checkpointer.

Compiled functions are kept in a `CompileCache` by everything static that shapes them: runs of
one process that share a model, task kind and step configuration (a campaign's runs across
seeds, severities and onsets) compile once.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

import faults
from rftjax import models, parallel
from rftjax.checkpoint import Checkpointer
from rftjax.config import TrainConfig
from rftjax.models import hf
from rftjax.tasks import Task, make_task
from rftjax.train import monitor
from rftjax.train.evaluation import Evaluator
from rftjax.train.step import Learner, PromptBatch, make_learner


class CompileCache:
    """Compiled functions by a key of hashable static configuration."""

    def __init__(self) -> None:
        self._entries: dict[tuple, Any] = {}

    def get(self, key: tuple, build: Callable[[], Any]) -> Any:
        """The entry of `key`, built by `build()` the first time."""
        if key not in self._entries:
            self._entries[key] = build()
        return self._entries[key]

    def learners(self) -> list[Learner]:
        """The learners built so far, oldest first."""
        return [v[0] for k, v in self._entries.items() if k[0] == "learner"]


# The cache of `rftjax.train.loop.run` when the caller passes none: one per process.
SHARED = CompileCache()


def check_master_weights(model_cfg: models.ModelConfig) -> None:
    """Refuses weights (and so Adam moments) in anything but float32."""
    if model_cfg.param_dtype != "float32":
        raise ValueError(
            f"param_dtype={model_cfg.param_dtype!r}: RL training keeps float32 master weights "
            "(an update of lr=1e-6 is below bfloat16's resolution of a weight); use "
            "dtype=bfloat16 for bfloat16 compute"
        )


def build_model_config(cfg: TrainConfig, task: Task) -> models.ModelConfig:
    if os.path.isdir(cfg.model):  # a Hugging Face checkpoint folder
        model_cfg = models.from_hf_config(cfg.model)
    else:
        model_cfg = models.get_preset(cfg.model)
    if cfg.model_overrides:
        model_cfg = model_cfg.replace(**models.parse_overrides(cfg.model_overrides))
    check_master_weights(model_cfg)
    if model_cfg.vocab_size < len(task.tokenizer):
        raise ValueError(
            f"model vocab_size={model_cfg.vocab_size} is smaller than the "
            f"tokenizer's {len(task.tokenizer)} tokens"
        )
    return model_cfg


def to_prompt_batch(batch) -> PromptBatch:
    """Checks the left-padding layout (every row ends in a real token) and casts to int32."""
    if not np.all(np.asarray(batch.prompt_mask)[:, -1]):
        raise ValueError(
            "prompts must be left-padded with at least one real token per row "
            "(the last prompt column is padding in some row)"
        )
    return PromptBatch(
        np.asarray(batch.prompts, np.int32),
        np.asarray(batch.prompt_mask, np.int32),
        np.asarray(batch.answers, np.int32),
    )


class Run(NamedTuple):
    """What the RL loop needs, built once by `setup`."""

    cfg: TrainConfig
    workdir: str
    task: Task
    learner: Learner
    evaluator: Evaluator
    checkpointer: Checkpointer
    fault: faults.Fault | None
    fault_params: faults.FaultParams | None
    cache: CompileCache
    mesh: jax.sharding.Mesh | None = None  # None: one device


class Model(NamedTuple):
    """The model graph, its initial weights and fm's monitor of the step (None: fm off)."""

    graphdef: Any
    params: Any
    monitor: Any


def setup(cfg: TrainConfig, cache: CompileCache) -> tuple[Run, Model]:
    workdir = os.path.abspath(cfg.workdir)
    os.makedirs(workdir, exist_ok=True)
    checkpoint = cfg.model if os.path.isdir(cfg.model) else None
    tokenizer = hf.load_tokenizer(checkpoint) if checkpoint else None
    task = make_task(
        cfg.task, seed=cfg.seed, eval_size=cfg.eval_size, tokenizer=tokenizer, **cfg.task_options()
    )
    tok = task.tokenizer
    model_cfg = build_model_config(cfg, task)
    if checkpoint:  # the checkpoint's weights, read into an abstract (unallocated) template
        graphdef, params = hf.load(checkpoint, model_cfg)
    else:
        graphdef, params = models.create(model_cfg, cfg.model_seed)
    static = (model_cfg, type(task).__name__, task.jnp_reward, tok.eos_token_id, tok.pad_token_id)
    mesh = parallel.make_mesh(cfg.mesh) if cfg.mesh else None

    def build():
        tools = task.tool_spec()
        fm = None
        if cfg.fm != "off":
            fm = monitor.make_monitor(cfg.rl, tools=tools is not None, sharded=mesh is not None)
        fault = None
        if cfg.fault != "none":
            rl = cfg.rl
            setup = faults.Setup(rl.group_size, rl.max_new_tokens, rl.normalize_adv_std, tools)
            fault = faults.make(cfg.fault, setup)
        learner = make_learner(
            graphdef,
            cfg.rl,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            reward_fn=task.jnp_reward,
            monitor=fm,
            fault=fault,
            trajectories=cfg.record_trajectories,
            tools=tools,
            mesh=mesh,
        )
        return learner, fm, fault

    key = ("learner", *static, cfg.rl, cfg.fm, cfg.fault, cfg.record_trajectories, mesh)
    learner, fm, fault = cache.get(key, build)
    evaluator = Evaluator(
        graphdef, task, max_new_tokens=cfg.rl.max_new_tokens, cache=cache, cache_key=static
    )
    checkpointer = Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=cfg.keep_checkpoints
    )
    fault_params = parallel.replicate(cfg.fault_params(), mesh)
    run = Run(
        cfg, workdir, task, learner, evaluator, checkpointer, fault, fault_params, cache, mesh
    )
    return run, Model(graphdef, params, fm)
