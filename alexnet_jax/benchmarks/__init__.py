"""Stand-alone speed measurements; each module runs with `python -m`."""

import json
import os


def write_json(result: dict, path: str) -> None:
  """Writes `result` to `path` (creating its folder) and says where."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as fp:
    json.dump(result, fp, indent=2)
  print(f'Wrote {path}')
