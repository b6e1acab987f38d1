"""One of two processes of a jax.distributed run on the CPU (gloo collectives), run by
tests/test_sharding.py: `python distributed_check.py PORT PROCESS_ID`. The model is
split over one device of each process; prints a JSON line with the greedy tokens and
the logits of a forward pass, which must equal one process's own."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.experimental.multihost_utils  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, process_id = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

import jaxllm  # noqa: E402
from jaxllm import sharding  # noqa: E402
from test_sharding import CONFIG, PROMPTS, TOKENS  # noqa: E402

assert len(jax.devices()) == 2 and len(jax.local_devices()) == 1
params = jax.tree.map(np.asarray, jaxllm.init_params(CONFIG, jax.random.PRNGKey(0)))  # the same on both
sp, sc = sharding.shard(params, CONFIG, sharding.make_mesh(2))
logits = jaxllm.forward(sp, sc, np.asarray(TOKENS, np.int32))
tokens = jaxllm.generate(sp, sc, PROMPTS, max_new_tokens=6, settings=jaxllm.SamplerSettings.greedy()).tokens
print(json.dumps({"process": process_id, "tokens": tokens,
                  "logits": np.asarray(jax.experimental.multihost_utils.process_allgather(logits, tiled=True)
                                       if not logits.is_fully_addressable else logits).tolist()}))
