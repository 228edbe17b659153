"""Scale-out benchmark: children per minute on 1 and on N processes of this machine.

    .venv/bin/python bench/scaleout.py                        # real children (digits)
    .venv/bin/python bench/scaleout.py --evaluator=synthetic  # protocol only

Expected run time: about 5 minutes on a shared 2-core CPU (real children),
1 minute with --evaluator=synthetic. Prints a Markdown table; --out=FILE.json
also keeps the raw numbers.

Each setting runs the real entry point (`python -m rlnas.main`) with the same
seed in a fresh workdir: one process with one device (the plain child-by-child
loop), P processes joined by JAX's runtime on 127.0.0.1 (rlnas.distributed),
and optionally one process with D virtual CPU devices (one thread per
device). It reports, from process 0's log and the history:
- children/min (steady): children finished after the first controller step,
  divided by the time they took; the first step (controller and first child
  compilations, process start) is left out, and shown apart as "first step".
- scaling efficiency: steady rate / (workers x the one-worker rate).
- straggler idle: worker-seconds spent waiting, at the end of a step, for the
  children of other workers, as a share of all worker-seconds.
- per worker: children and children/min of busy time, from `metrics.process`
  and `metrics.worker_seconds` of every history line.
All settings must write the same history (checked, apart from who evaluated a
child and how long it took).
"""

import argparse
import collections
import datetime
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = '''
import sys
sys.path.insert(0, {repo!r})
import ml_collections
from configs import default


def get_config():
  config = default.get_config()
  config.search.evaluator = {evaluator!r}
  config.search.max_children = {max_children}
  config.search.children_per_step = {children_per_step}
  config.search.tensorboard = False
  # Synthetic children: 1-2 s of sleep each (uneven, so stragglers show).
  config.synthetic = ml_collections.ConfigDict({{"seconds": 1.0, "spread": 1.0}})
  return config
'''
STEP_LINE = re.compile(r"^I(\d{4}) (\d\d:\d\d:\d\d\.\d+) .*search\.py:\d+\] step (\d+)\s+"
                       r"children (\d+)/(\d+)")
IDLE_LINE = re.compile(r"children in ([\d.]+) s on (\d+) workers \(idle (\d+)%, "
                       r"([\d.]+) s waiting for stragglers\)")
WHO_AND_WHEN = ("process", "device", "computed_on", "worker_seconds",
                "train_seconds", "compile_seconds")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _seconds(clock: str) -> float:
  t = datetime.datetime.strptime(clock, "%H:%M:%S.%f")
  return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6


def run_setting(config: str, workdir: str, processes: int, devices: int,
                python: str) -> dict:
  """Runs one search; returns its measurements."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  if devices > 1:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  port = _free_port()
  start = time.perf_counter()
  now = datetime.datetime.now()
  start_clock = now.hour * 3600 + now.minute * 60 + now.second + now.microsecond / 1e6
  procs = []
  for i in range(processes):
    cmd = [python, "-m", "rlnas.main", f"--config={config}", f"--workdir={workdir}"]
    if processes > 1:
      cmd += [f"--config.distributed.coordinator_address=127.0.0.1:{port}",
              f"--config.distributed.num_processes={processes}",
              f"--config.distributed.process_id={i}"]
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  logs = [p.communicate()[0] for p in procs]
  wall = time.perf_counter() - start
  for p, log in zip(procs, logs):
    if p.returncode:
      raise RuntimeError(f"a process failed ({p.returncode}):\n{log[-3000:]}")

  steps = [(_seconds(m.group(2)), int(m.group(4)))
           for m in map(STEP_LINE.match, logs[0].splitlines()) if m]
  (t0, done0), (t1, done1) = steps[0], steps[-1]
  idle = [(float(m.group(1)), int(m.group(2)), float(m.group(4)))
          for m in IDLE_LINE.finditer(logs[0])][1:]  # steady steps only
  with open(os.path.join(workdir, "history.jsonl")) as f:
    history = [json.loads(line) for line in f]
  per_worker = collections.defaultdict(lambda: [0, 0.0])
  for r in history:
    m = r["metrics"]
    name = f"p{m.get('process', 0)}/{m.get('device', 'cpu:0')}"
    per_worker[name][0] += 1
    # The plain loop records no worker_seconds; child training its own times.
    per_worker[name][1] += m.get("worker_seconds", m.get("train_seconds", 0.0)
                                 + m.get("compile_seconds", 0.0))
  workers = processes * devices
  capacity = sum(seconds * n for seconds, n, _ in idle)
  return {
      "processes": processes, "devices_per_process": devices, "workers": workers,
      "children": done1, "wall_seconds": round(wall, 1),
      "first_step_seconds": round(t0 - start_clock, 1),
      "steady_children": done1 - done0, "steady_seconds": round(t1 - t0, 2),
      "children_per_minute": round(60 * (done1 - done0) / max(t1 - t0, 1e-9), 2),
      "straggler_idle_fraction": (round(sum(s for _, _, s in idle) / capacity, 3)
                                  if capacity else 0.0),
      "per_worker": {k: {"children": n, "busy_children_per_minute":
                         round(60 * n / s, 2) if s else None}
                     for k, (n, s) in sorted(per_worker.items())},
      "history": [{k: v for k, v in r.items() if k != "metrics"} |
                  {"metrics": {k: v for k, v in r["metrics"].items()
                               if k not in WHO_AND_WHEN}} for r in history],
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--evaluator", default="child_trainer",
                      choices=("child_trainer", "synthetic"))
  parser.add_argument("--max_children", type=int, default=40)
  parser.add_argument("--children_per_step", type=int, default=8)
  parser.add_argument("--processes", default="1,2",
                      help="comma-separated process counts (1 device each)")
  parser.add_argument("--virtual_devices", type=int, default=0,
                      help="also run 1 process with this many CPU devices (0: skip)")
  parser.add_argument("--python", default=sys.executable)
  parser.add_argument("--out", default="", help="also write the numbers as JSON here")
  args = parser.parse_args()

  tmp = tempfile.mkdtemp(prefix="rlnas_scaleout_")
  config = os.path.join(tmp, "config.py")
  with open(config, "w") as f:
    f.write(CONFIG.format(repo=REPO, evaluator=args.evaluator,
                          max_children=args.max_children,
                          children_per_step=args.children_per_step))
  settings = [(int(p), 1) for p in args.processes.split(",")]
  if args.virtual_devices > 1:
    settings.append((1, args.virtual_devices))
  results = []
  for processes, devices in settings:
    print(f"running {processes} process(es) x {devices} device(s) ...", file=sys.stderr)
    results.append(run_setting(config, os.path.join(tmp, f"p{processes}_d{devices}"),
                               processes, devices, args.python))
  same = all(r["history"] == results[0]["history"] for r in results)
  base = results[0]["children_per_minute"] / results[0]["workers"]

  print(f"\n{args.evaluator} children, {args.max_children} children, "
        f"{args.children_per_step} per step, {os.cpu_count()} CPU cores; "
        f"same history in every setting: {same}\n")
  print("| processes x devices | children/min (steady) | scaling efficiency | "
        "straggler idle | first step (s) | wall (s) | per worker: children, children/min busy |")
  print("|---|---|---|---|---|---|---|")
  for r in results:
    eff = r["children_per_minute"] / (base * r["workers"])
    workers = "; ".join(f"{k} {v['children']}, {v['busy_children_per_minute'] or '-'}"
                        for k, v in r["per_worker"].items())
    print(f"| {r['processes']} x {r['devices_per_process']} | "
          f"{r['children_per_minute']:.1f} | {eff:.0%} | "
          f"{r['straggler_idle_fraction']:.0%} | {r['first_step_seconds']} | "
          f"{r['wall_seconds']} | {workers} |")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"args": vars(args), "same_history": same,
                 "results": [{k: v for k, v in r.items() if k != "history"}
                             for r in results]}, f, indent=2)
  if not same:
    sys.exit("the settings wrote different histories")


if __name__ == "__main__":
  main()
