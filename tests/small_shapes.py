"""Small model shapes shared by the tests (fast to compile on a 2-core CPU)."""

from rftjax import models

# Grouped-query attention (4 query heads, 2 kv heads) and Qwen2's QKV bias, untied head.
MODEL = models.ModelConfig(
    vocab_size=32,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    qkv_bias=True,
)
# `--model_overrides` of a 1-layer model for end-to-end runs of the tiny preset's tokenizer.
OVERRIDES = "num_layers=1,hidden_size=32,intermediate_size=64,num_heads=2,num_kv_heads=2"
# Entry-point flags of a small run: that model and 4 prompts × 4 completions a step.
RUN_FLAGS = (f"--model_overrides={OVERRIDES}", "--prompts_per_step=4", "--group_size=4")


def run_config(workdir, steps, **kw):
    """A `TrainConfig` of a small end-to-end run: that model, 4 × 4 completions a step, a
    10-step warm-up, evaluation and a checkpoint every 2 steps."""
    from rftjax.config import RLConfig, TrainConfig

    return TrainConfig(
        workdir=str(workdir),
        steps=steps,
        model_overrides=OVERRIDES,
        warmup_steps=10,
        warmup_batch_size=16,
        eval_size=16,
        eval_every=2,
        checkpoint_every=2,
        rl=RLConfig(prompts_per_step=4, group_size=4),
        **kw,
    )
