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
