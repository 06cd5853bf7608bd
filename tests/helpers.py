"""Small test utilities shared across test folders (import as `helpers`)."""
def solid_image(rgb, size=(56, 56)):
    from PIL import Image
    return Image.new("RGB", size, tuple(rgb))


def noise_image(seed, size=(112, 84)):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def spawn_fault_judge():
    """Start tests/rewards/judge/fault_judge.py (the fault-injecting judge) as a subprocess and wait for
    its JUDGE_URL line; returns a ``rewards.judge.server.LocalJudge`` handle (``.url``, ``.close()``)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from rewards.judge.server import LocalJudge
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.Popen([sys.executable, str(root / "tests/rewards/judge/fault_judge.py")], stdout=subprocess.PIPE,
                            text=True, env=env)
    line = proc.stdout.readline()
    assert line.startswith("JUDGE_URL="), f"fault server did not start: {line!r}"
    return LocalJudge(proc, line.strip().split("=", 1)[1])
