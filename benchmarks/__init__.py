"""Stand-alone speed measurements; each module runs with `python -m benchmarks.<name>`
from the repository's root (or with it on PYTHONPATH).

They live outside the `alexnet_jax` package: they compare it with PyTorch,
which the package never imports, and may time the CPU kernels
(`alexnet_jax.cpu`) directly, which the package reaches through
`alexnet_jax.backend` only.
"""

import json
import os


def write_json(result: dict, path: str) -> None:
  """Writes `result` to `path` (creating its folder) and says where."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as fp:
    json.dump(result, fp, indent=2)
  print(f'Wrote {path}')
