"""`--what=memory`: the step compiled for abstract arguments (no weights) reports the memory
that XLA reports for the same step compiled on real, placed arrays."""

import jax

from rftjax import models, parallel
from rftjax.benchmarks import memory
from rftjax.config import RLConfig
from rftjax.knobs import make_knobs
from rftjax.train.step import PromptBatch, init_state

SMALL = dict(hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=128,
             vocab_size=64, max_position_embeddings=64)  # fmt: skip
SHAPE = memory.Shape(prompts=2, group_size=2, prompt_len=8, new_tokens=4, answer_len=4)


def test_abstract_compile_reports_the_memory_of_the_real_step():
    cfg = memory.model_config("qwen2.5-0.5b", **SMALL)
    compiled, (state_abs, batch_abs, knobs_abs) = memory.compiled_step(cfg, SHAPE, "")
    aot = memory.memory_figures(compiled)

    mesh = parallel.make_mesh("")
    rl = RLConfig(prompts_per_step=2, group_size=2, max_new_tokens=4)
    _, params = models.create(cfg, 0)
    state = parallel.place_state(init_state(params, rl, 0), mesh)
    batch = parallel.place_batch(
        PromptBatch(*(jax.numpy.zeros(x.shape, x.dtype) for x in batch_abs)), mesh
    )
    knobs = parallel.replicate(make_knobs(), mesh)
    assert jax.tree.structure(state) == jax.tree.structure(state_abs)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == jax.tree.map(
        lambda x: (x.shape, x.dtype), state_abs
    )
    real = memory._learner_step(cfg, SHAPE, mesh).lower(state, batch, knobs, None).compile()
    assert memory.memory_figures(real) == aot
    # The donated state is reused by the outputs, and the figures add up.
    assert aot["alias_bytes"] > 0 and aot["temp_bytes"] > 0
    assert aot["total_bytes"] == (
        aot["argument_bytes"] + aot["output_bytes"] + aot["temp_bytes"] - aot["alias_bytes"]
    )
    # One device: the arguments are the whole state, batch and knobs.
    leaves = jax.tree.leaves((state_abs, batch_abs, knobs_abs))
    # (XLA leaves out an argument the program never reads: a few bytes.)
    assert 0 <= sum(x.size * x.dtype.itemsize for x in leaves) - aot["argument_bytes"] <= 16
