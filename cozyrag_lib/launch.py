"""Training from a notebook: torchrun in a subprocess (one process per GPU, or one on a CPU), its output live.

    >>> launch(cfg, nproc_per_node=2)   # doctest: +SKIP
"""
from __future__ import annotations

import codecs
import json
import os
import subprocess
import sys

from .atomic import atomic_write_text
from .config import Config
from .errors import CozyError


def config_toml(cfg: Config) -> str:
    """The resolved config as a preset file (TOML); JSON literals are valid TOML values for these types."""
    lines = ["# resolved config written by cozyrag_lib.launch"]
    for k, v in cfg.to_dict().items():
        lines.append(f"{k} = {json.dumps(v, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def launch(cfg: Config, nproc_per_node: int = 1, resume: bool = False) -> int:
    """Run training under torchrun in a subprocess, streaming its output live; CozyError when it fails.

    The resolved config goes to `{run_dir}/train/launch.toml` and the command is
    `python -m torch.distributed.run --standalone --nproc_per_node=N -m cozyrag_lib.train --preset=<that file>`.
    """
    cfg.paths.upgrade()
    path = cfg.paths.train / "launch.toml"
    atomic_write_text(path, config_toml(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={int(nproc_per_node)}",
           "-m", "cozyrag_lib.train", f"--preset={path}"] + (["--resume"] if resume else [])
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # chunks, not lines: progress bars use \r
            sys.stdout.write(decoder.decode(chunk))
            sys.stdout.flush()
    except KeyboardInterrupt:
        proc.terminate()
        raise
    rc = proc.wait()
    if rc != 0:
        raise CozyError(f"training exited with status {rc}; its error is printed above")
    return rc
