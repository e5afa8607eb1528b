"""rftjax against TRL's GRPOTrainer (PyTorch, CPU) on one configuration, side by side.

Both trainers start from the same weights: a Llama-style model is initialized by rftjax,
written as a Hugging Face checkpoint (`rftjax.models.hf.export`), and read back by both
(`hf.load`; TRL through transformers). Same prompts (the arith task's, BOS included), batch,
group size, new tokens, β (with a reference model), clip ε, token-mean loss, one optimizer
update a step. Steps alternate (a TRL step, then an rftjax step, from a TRL callback) after
warm-up; each thread setting runs in its own process, since a backend's thread pool is fixed
when it starts:

- ``default``: each library's own thread pools over all cores;
- ``pinned``: the process pinned to one core, torch at one thread, XLA single-threaded.

Precision: float32 throughout by default. ``matmul_dtype="bfloat16"`` compares both trainers'
bf16 matmuls: rftjax's projections with bf16 operands and float32 sums (`models.mixed`;
weights, activations, optimizer in float32), TRL with ``bf16=True`` (torch's CPU autocast in
its log-prob forwards; it generates as it loaded the model, in float32).

FLOPs are counted by hand (`step_flops`) and set against a large fp32 matmul measured in the
same process, per library. Needs the ``trl`` extra.

  python -m rftjax.benchmarks.vs_trl --threads=pinned --config='{"new_tokens": 64}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

SETTINGS = ("default", "pinned")
MODEL_FIELDS = (
    "hidden_size", "num_layers", "num_heads", "intermediate_size", "vocab_size", "matmul_dtype",
)  # fmt: skip
_MARK = "VS_TRL "


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """The compared configuration: model shape, batch and RL settings, and step counts."""

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 1024
    vocab_size: int = 64
    prompts: int = 8
    group_size: int = 8
    new_tokens: int = 64
    beta: float = 0.04
    lr: float = 1e-5
    seed: int = 0
    warmup: int = 2
    steps: int = 6
    length_buckets: int = 0  # rftjax's learner only (`RLConfig.length_buckets`; 0: its choice)
    matmul_dtype: str = "float32"  # or "bfloat16": both trainers' matmuls (see the module)

    def __post_init__(self):
        for name in ("prompts", "group_size", "new_tokens", "steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Config.{name} must be > 0, got {getattr(self, name)}")
        if self.warmup < 1:
            raise ValueError(f"Config.warmup must be >= 1 (compilation), got {self.warmup}")
        if self.matmul_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"Config.matmul_dtype={self.matmul_dtype!r}; accepted: float32, "
                             "bfloat16")  # fmt: skip
        if self.vocab_size < 56:
            raise ValueError(f"vocab_size must hold the 56-token character vocabulary, got "
                             f"{self.vocab_size}")  # fmt: skip

    @property
    def rows(self) -> int:
        return self.prompts * self.group_size


def config_from_flags(values) -> Config:
    """A `Config` from launch.bench's flags: ``--model_overrides`` (hidden_size, num_layers,
    num_heads, intermediate_size, vocab_size, matmul_dtype), and ``--prompts_per_step``,
    ``--group_size``, ``--max_new_tokens``, ``--kl_coef``, ``--lr``, ``--seed``, ``--repeats``
    (timed steps) where given on the command line; the rest keeps `Config`'s defaults (the
    shape of the comparison in BUILD_NOTES)."""
    from rftjax.models.config import parse_overrides

    kw = parse_overrides(values.model_overrides) if values.model_overrides else {}
    unknown = sorted(set(kw) - set(MODEL_FIELDS))
    if unknown:
        raise ValueError(f"vs_trl: overrides {unknown} not supported; accepted: {MODEL_FIELDS}")
    given = {
        "prompts_per_step": "prompts", "group_size": "group_size", "max_new_tokens": "new_tokens",
        "kl_coef": "beta", "lr": "lr", "seed": "seed", "repeats": "steps",
        "length_buckets": "length_buckets",
    }  # fmt: skip
    for flag, field in given.items():
        if values[flag].present:
            kw[field] = getattr(values, flag)
    return Config(**kw)


def model_config(config: Config):
    """The rftjax `ModelConfig` (Llama: no attention bias, untied head, full multi-head)."""
    from rftjax.models import ModelConfig

    return ModelConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_kv_heads=config.num_heads,
        max_position_embeddings=512,
    )


def forward_flops(cfg, *, prompts: int, group_size: int, prompt_len: int, new_tokens: int):
    """FLOPs of one forward over a rollout as rftjax computes it: each prompt once, then its
    ``group_size`` responses against the shared prompt keys (`sampling.response_logprobs`).

    A matmul of ``m × k`` by ``k × n`` is ``2mkn``. A token costs twice the weight matmuls'
    parameters (the output head only for response tokens) and ``4 · L · H_q · d`` per key it
    attends over (scores and weighted values, over every slot the dense mask covers: ``P``
    for a prompt token, ``P + N`` for a response token, padding after EOS included).
    Norms, softmax and activations are left out (a few % at hidden 64, less when wider).
    """
    d = cfg.resolved_head_dim
    per_layer = cfg.hidden_size * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    per_layer += 3 * cfg.hidden_size * cfg.intermediate_size
    trunk = cfg.num_layers * per_layer
    head = cfg.hidden_size * cfg.vocab_size
    per_key = 4 * cfg.num_layers * cfg.num_heads * d
    p, n = prompt_len, new_tokens
    prompt_part = prompts * p * (2 * trunk + per_key * p)
    response_part = prompts * group_size * n * (2 * (trunk + head) + per_key * (p + n))
    return float(prompt_part + response_part)


def step_flops(cfg, *, prompts: int, group_size: int, prompt_len: int, new_tokens: int):
    """FLOPs of one rftjax GRPO step (one update), by stage.

    The rollout decodes at most ``N`` tokens one at a time against a cache of ``P + N`` slots
    after prefilling each prompt once: the same FLOPs as `forward_flops` when no row stops
    early (an upper bound: the decode loop ends when every row has emitted EOS). The
    reference model is one forward, the policy a forward and its backward (twice the forward).

    Returns:
      FLOPs of ``rollout``, ``reference``, ``policy`` (forward + backward) and ``total``.
    """
    fwd = forward_flops(
        cfg, prompts=prompts, group_size=group_size, prompt_len=prompt_len, new_tokens=new_tokens
    )
    out = {"rollout": fwd, "reference": fwd, "policy": 3.0 * fwd}
    out["total"] = sum(out.values())
    return out


def matmul_peak(library: str, n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of an fp32 ``n × n`` matmul in ``library`` (``jax`` or ``torch``), best of runs."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), np.float32)
    if library == "jax":
        import jax

        x = jax.device_put(a)
        f = jax.jit(lambda u: u @ u)
        run = lambda: f(x).block_until_ready()
    elif library == "torch":
        import torch

        x = torch.from_numpy(a)
        run = lambda: x @ x
    else:
        raise ValueError(f"library={library!r}; accepted: jax, torch")
    run()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def write_checkpoint(folder: str, config: Config) -> None:
    """An rftjax-initialized model and the character tokenizer, as a Hugging Face folder."""
    from rftjax import models
    from rftjax.models import hf
    from rftjax.tokenizer import char_tokenizer

    cfg = model_config(config)
    _, params = models.create(cfg, config.seed)
    hf.export(folder, cfg, params, char_tokenizer())


def prompt_batches(config: Config, count: int):
    """``count`` arith-task prompt batches (`PromptBatch`) and their rows as text
    (``{"prompt", "answer"}``, BOS spelled out so that TRL's tokens are rftjax's)."""
    from rftjax.tasks import make_task
    from rftjax.train.loop import to_prompt_batch

    task = make_task("arith", seed=config.seed)
    batches, rows = [], []
    for i in range(count):
        b = task.train_batch(i, config.prompts)
        batches.append(to_prompt_batch(b))
        for p, m, a in zip(b.prompts, b.prompt_mask, b.answer_text, strict=True):
            rows.append({"prompt": task.tokenizer.decode(p[m == 1].tolist()), "answer": a})
    return task, batches, rows


class RftjaxRunner:
    """rftjax's compiled GRPO step on the checkpoint's weights; ``step()`` runs one."""

    def __init__(self, folder: str, config: Config, task, batches, dtype: str = "float32"):
        import jax

        from rftjax.config import RLConfig
        from rftjax.knobs import make_knobs
        from rftjax.models import from_hf_config, hf
        from rftjax.train.step import init_state, make_learner

        # compute dtype; fp32 weights
        self.cfg = from_hf_config(folder).replace(dtype=dtype, matmul_dtype=config.matmul_dtype)
        self.graphdef, params = hf.load(folder, self.cfg)
        rl = RLConfig(
            prompts_per_step=config.prompts,
            group_size=config.group_size,
            max_new_tokens=config.new_tokens,
            length_buckets=config.length_buckets,
        )
        tok = task.tokenizer
        self.learner = make_learner(
            self.graphdef, rl, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
            reward_fn=task.jnp_reward,
        )  # fmt: skip
        self.state = init_state(params, rl, config.seed)
        self.knobs = make_knobs(lr=config.lr, kl_coef=config.beta)
        self.batches = [jax.device_put(b) for b in batches]
        self.rows, self.i = config.rows, 0

    def step(self) -> tuple[float, float]:
        """``(seconds, generated tokens)`` of one step."""
        import jax

        batch = self.batches[self.i % len(self.batches)]
        self.i += 1
        t0 = time.perf_counter()
        self.state, metrics = self.learner.step(self.state, batch, self.knobs)
        length = float(jax.device_get(metrics["length_mean"]))
        return time.perf_counter() - t0, length * self.rows


def trl_trainer(folder: str, out: str, config: Config, rows: list[dict], callback):
    """TRL's GRPOTrainer on the checkpoint, configured as rftjax's step (see the module)."""
    import trl
    from datasets import Dataset

    def exact_match(completions, answer, **kwargs):
        return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]

    args = trl.GRPOConfig(
        output_dir=out, per_device_train_batch_size=config.rows,
        num_generations=config.group_size, max_completion_length=config.new_tokens,
        max_steps=config.warmup + config.steps, beta=config.beta, learning_rate=config.lr,
        epsilon=0.2, epsilon_high=0.28, loss_type="dapo", temperature=1.0, top_k=0, top_p=1.0,
        num_iterations=1, shuffle_dataset=False, seed=config.seed, use_cpu=True,
        bf16=config.matmul_dtype == "bfloat16",
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    dataset = Dataset.from_list(rows)
    return trl.GRPOTrainer(
        model=folder, reward_funcs=exact_match, args=args, train_dataset=dataset,
        callbacks=[callback],
    )  # fmt: skip


def _alternating_callback(runner: RftjaxRunner, record: dict):
    """A TrainerCallback that times each TRL step (step begin to end), reads its mean
    completion length from the step's log, then runs and times one rftjax step."""
    from transformers import TrainerCallback

    class Alternate(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            record["trl_seconds"].append(time.perf_counter() - self.t0)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                record["trl_tokens"].append(logs["completions/mean_length"] * runner.rows)
                seconds, tokens = runner.step()
                record["rftjax_seconds"].append(seconds)
                record["rftjax_tokens"].append(tokens)

    return Alternate()


def _summary(seconds: list[float], tokens: list[float], rows: int, flops: float, peak: float):
    import numpy as np

    s = float(np.median(seconds))
    return {
        "seconds_per_step": s,
        "completions_per_second": rows / s,
        "generated_tokens_per_second": float(np.mean(tokens)) / s,
        "mean_length": float(np.mean(tokens)) / rows,
        "matmul_peak_gflops": peak / 1e9,
        "flops_share_of_peak": flops / s / peak,
    }


def measure(config: Config, threads: str) -> dict:
    """Both trainers in this process, alternating; the figures of the timed steps (medians)."""
    import torch

    if threads == "pinned":
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "model")
        write_checkpoint(folder, config)
        task, batches, rows = prompt_batches(config, config.warmup + config.steps + 1)
        runner = RftjaxRunner(folder, config, task, batches)
        for _ in range(2):  # compile and settle, as launch.bench's other benchmarks do
            runner.step()
        record = {k: [] for k in ("trl_seconds", "trl_tokens", "rftjax_seconds", "rftjax_tokens")}
        trainer = trl_trainer(folder, os.path.join(tmp, "trl"), config, rows,
                              _alternating_callback(runner, record))  # fmt: skip
        trainer.train()
    flops = step_flops(
        runner.cfg,
        prompts=config.prompts,
        group_size=config.group_size,
        prompt_len=batches[0].prompts.shape[1],
        new_tokens=config.new_tokens,
    )
    timed = slice(config.warmup, None)
    out = {"threads": threads, "torch_threads": torch.get_num_threads(), "flops": flops}
    for name, library in (("rftjax", "jax"), ("trl", "torch")):
        out[name] = _summary(record[f"{name}_seconds"][timed], record[f"{name}_tokens"][timed],
                             config.rows, flops["total"], matmul_peak(library))  # fmt: skip
    out["ratio_completions_per_second"] = (
        out["rftjax"]["completions_per_second"] / out["trl"]["completions_per_second"]
    )
    return out


def child_env(threads: str) -> dict[str, str]:
    """The environment of a measuring process: single-threaded BLAS / XLA when pinned."""
    env = dict(os.environ)
    if threads == "pinned":
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                            "intra_op_parallelism_threads=1").strip()  # fmt: skip
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", JAX_PLATFORMS="cpu")
    return env


def run(config: Config, settings=SETTINGS, core: int = 0, timeout: float = 3600) -> list[dict]:
    """`measure` in a fresh process per thread setting (``pinned``: on CPU ``core``)."""
    results = []
    for threads in settings:
        if threads not in SETTINGS:
            raise ValueError(f"thread setting {threads!r}; accepted: {SETTINGS}")
        cmd = [sys.executable, "-m", "rftjax.benchmarks.vs_trl", f"--threads={threads}",
               f"--core={core}", f"--config={json.dumps(dataclasses.asdict(config))}"]  # fmt: skip
        proc = subprocess.run(cmd, env=child_env(threads), capture_output=True, text=True,
                              timeout=timeout)  # fmt: skip
        lines = [x for x in proc.stdout.splitlines() if x.startswith(_MARK)]
        if proc.returncode or not lines:
            raise RuntimeError(f"vs_trl ({threads}) failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(lines[-1][len(_MARK) :]))
    return results


def table(config: Config, results: list[dict]) -> str:
    """The figures as a Markdown table, one row per trainer and thread setting."""
    lines = [
        f"{config.rows} completions ({config.prompts} x {config.group_size}), "
        f"{config.new_tokens} new tokens, beta {config.beta}; hidden {config.hidden_size}, "
        f"{config.num_layers} layers, {config.num_heads} heads, MLP {config.intermediate_size}, "
        f"vocab {config.vocab_size}; {config.matmul_dtype} matmuls; median of {config.steps} "
        f"steps after {config.warmup}; the peak is an fp32 matmul's",
        "",
        "| threads | trainer | s/step | completions/s | gen tokens/s | mean length | "
        "GFLOP/step | share of matmul peak (GFLOP/s) | rftjax/TRL completions/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name in ("rftjax", "trl"):
            f = r[name]
            ratio = f"{r['ratio_completions_per_second']:.2f}" if name == "rftjax" else ""
            lines.append(
                f"| {r['threads']} | {name} | {f['seconds_per_step']:.3f} | "
                f"{f['completions_per_second']:.1f} | {f['generated_tokens_per_second']:.0f} | "
                f"{f['mean_length']:.1f} | {r['flops']['total'] / 1e9:.1f} | "
                f"{f['flops_share_of_peak']:.0%} ({f['matmul_peak_gflops']:.0f}) | {ratio} |"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", choices=SETTINGS, default="default")
    parser.add_argument("--core", type=int, default=0, help="pinned: the CPU core")
    parser.add_argument("--config", default="{}", help="Config fields as JSON")
    args = parser.parse_args(argv)
    if args.threads == "pinned":  # before any library starts its threads
        os.environ.update(child_env(args.threads))
        os.sched_setaffinity(0, {args.core})
    config = Config(**json.loads(args.config))
    print(_MARK + json.dumps(measure(config, args.threads)), flush=True)


if __name__ == "__main__":
    main()
