"""A client and a server, many runs, one start each: the driver behind tests/test_remote.py and tests/test_ranks.py.

Launched twice, as two groups of one or two processes (`accelerate launch --config_file cpu.yaml|cpu_2proc.yaml
tests/pairs_driver.py ROLE PLAN`, `helpers.run_drivers`): ROLE `server` serves each case of PLAN in turn
(`recipes/serve.py`'s `main`, as one server of that many ranks); ROLE `client` trains each case in one process (or
as the local two-process DDP split), then as a client of that many processes against that server
(`recipes/train.py`'s `main`, once without and once with `--server`). A case with
`refused` instead joins a server of one rank and records what each client rank raised. Starting each group once,
not once per case, keeps the suite short; the code under test is the recipes' own.

PLAN is a JSON list of cases: {"name", "local": argv, "client": argv, "server": argv} or {"name", "refused": argv,
"record": path}. A case may add `"wait_for": path` (the client joins once the file exists: the test probes the
server first), leave out "local", or add `"die": {"rank", "step", "record"}`: that server rank exits abruptly (no
goodbye, as a killed process) after that optimizer step, having written the time to `record`.
"""

import json
import os
import sys
import time
from pathlib import Path

import torch.distributed as dist

from hf_adc.distributed import ServerHalf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import serve  # noqa: E402
import train  # noqa: E402


def _die_after(rank: int, step: int, record: str) -> None:
    """Server rank `rank` exits abruptly once it has taken optimizer step `step`."""
    step_as_usual = ServerHalf.optimizer_step

    def optimizer_step(half, *args):
        total = step_as_usual(half, *args)
        if half.steps == step and dist.get_rank() == rank:
            Path(record).write_text(str(time.time()))
            os._exit(3)
        return total

    ServerHalf.optimizer_step = optimizer_step


def _wait_for(path: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {seconds} s.")
        time.sleep(0.2)


def main(role: str, plan: str) -> None:
    for case in json.loads(Path(plan).read_text()):
        if role == "server":
            if "die" in case:
                _die_after(**case["die"])
            if "server" in case:
                serve.main(case["server"])
        elif "refused" in case:
            try:
                train.main(case["refused"])
                error = None
            except Exception as caught:  # noqa: BLE001 - recorded for the test to read
                error = f"{type(caught).__name__}: {caught}"
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
            if dist.get_rank() == 0:
                Path(case["record"]).write_text(json.dumps(errors))
        else:
            if "local" in case:
                train.main(case["local"])
            if "wait_for" in case:
                _wait_for(case["wait_for"])
            train.main(case["client"])


if __name__ == "__main__":
    from hf_adc.experiment import run_recipe

    run_recipe(lambda argv: main(*argv), sys.argv[1:])
