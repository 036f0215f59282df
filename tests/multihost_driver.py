"""One process of the two-process CPU test (run by test_multihost.py, not by pytest).

Trains a tiny stage-1 run through the real loop across 2 processes x 4 CPU devices
(gloo collectives), then restores the saved parameters onto this 2-process mesh and
process 0 writes them to an .npz for the test to compare against a 1-process restore.
"""

import sys

import jax

pid, port, workdir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=pid)

from absl import flags  # noqa: E402

flags.FLAGS(sys.argv[:1], known_only=True)

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

sys.path.insert(0, ".")
from cacophony_jax.train import loop  # noqa: E402
from tests.helpers import restore_params_sharded, tiny_config  # noqa: E402

config = tiny_config("mae", 3, **{"train.checkpoint_every": 3, "mesh.fsdp": 2})
loop.run(config, workdir)
params = restore_params_sharded(config, workdir)
flat = {jax.tree_util.keystr(k): np.asarray(multihost_utils.process_allgather(v, tiled=True))
        for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
if jax.process_index() == 0:
    np.savez(out, **flat)

# A failure on one host stops both, each naming it; so does a config that differs.
import json  # noqa: E402

from cacophony_jax.train import agree  # noqa: E402

try:
    agree.agree("a check", ValueError("its disk lacks data/train.jsonl") if pid == 1 else None)
except ValueError as e:
    print(f"agree: {e}", flush=True)
config_json = json.loads(config.to_json_best_effort())
if pid == 1:
    config_json["optim"]["learning_rate"] = 0.05
try:
    agree.check_same_run(config_json)
except ValueError as e:
    print(f"same run: {e}", flush=True)
agree.check_same_run(json.loads(config.to_json_best_effort()))  # equal: passes
# A recipe: a host-local setting may differ, the workdir may not.
recipe = {"stages": {"mae": json.loads(config.to_json_best_effort())},
          "workdir": "runs/a" if pid == 0 else "runs/b"}
recipe["stages"]["mae"]["data"]["num_workers"] = pid
agree.check_devices()  # equal: passes
try:
    agree.check_same_run(recipe)
except ValueError as e:
    print(f"recipe: {e}", flush=True)
print(f"process {pid} done", flush=True)
