"""A 2-process ZeRO-3 GRPO run for the chaos test (test_rel_chaos.py), under torchrun; never
imported by pytest:

    torchrun --nproc_per_node 2 chaos_runner.py OUT CKPT JUDGE_URL MAX_STEPS DS_JSON

The tiny Qwen2.5-VL under DeepSpeed ZeRO-3 (gloo, CPU) with a length reward and a
ProcessReward judged by the local rubric server; both ranks share one judge cache
(OUT/judge.sqlite). DS_JSON: a ZeRO-3 config (tests/grpo/ds_common.py). A checkpoint every step,
resumed with resume_from_checkpoint="auto".
Each rank prints ``READY rank=R pid=P`` once its engine is built and ``DONE rank=R`` at the end.

``PAUSE_AT=R:POINT`` makes rank R stop at POINT, print ``PAUSED R:POINT`` and wait there to be
SIGKILLed (the other rank soon blocks in a collective):

    generate:N      round N's completions are sampled, not yet scored
    judge:N:K       K judgments of round N are returned on rank R, others in flight or unsent
    backward:S:M    step S's update: M micro-batches backpropagated, the optimizer step not taken
    stepped:S       step S's optimizer step taken, its metrics not yet logged
    metrics:S       step S's metrics line written (rank 0), its checkpoint not yet
    dssave:S        checkpoint S: DeepSpeed's shards written, the consolidated model not yet
    manifest:S      checkpoint S: every file written in .tmp-checkpoint-S, MANIFEST.json not
    prune:S         checkpoint-S published, older checkpoints not yet pruned (rank 0)
    resume:S        checkpoint-S loaded by the resumed run, no step taken

The judge gate: before a judge request is sent, the rank adds it to OUT/inflight-rank<R> and
then looks for OUT/GATE; if the test has created that file the request is withdrawn and waits
forever. The count drops when a request's verdict is committed to the cache. So once GATE
exists and every inflight file reads 0, no judgment is in flight: every judgment the server
has answered is in the cache, and a SIGKILL then loses none. Pre-flight probes (one uncached
request per rank and start, when the trainer sends them) pass the same gate; each answered one
is recorded in OUT/probes-rank<R>, so that the test can tell them from judgments.
"""
import asyncio
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import torch  # noqa: E402

torch.set_num_threads(1)
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "grpo"))

import grpo.checkpoint as ckpt  # noqa: E402
import grpo.metrics  # noqa: E402
from ds_common import LengthReward, dataset  # noqa: E402
from grpo import GRPOConfig, GRPOTrainer  # noqa: E402
from models import ModelConfig, load_processor  # noqa: E402
from rewards import JudgeConfig, ProcessReward  # noqa: E402

RANK = int(os.environ["RANK"])
_spec = os.environ.get("PAUSE_AT", "").split(":") if os.environ.get("PAUSE_AT") else None
PAUSE = _spec[1:] if _spec and int(_spec[0]) == RANK else None
STATE = {"round": -1, "scored": 0, "backward": 0, "inflight": 0}


def wanted(kind: str, *args) -> bool:
    return bool(PAUSE) and PAUSE[0] == kind and [int(x) for x in PAUSE[1:]] == list(args)


def pause() -> None:
    print(f"PAUSED {RANK}:{':'.join(PAUSE)}", flush=True)
    time.sleep(3600)  # the test SIGKILLs every process of the job here


class PausingProcessReward(ProcessReward):
    async def ascore(self, sample):
        score = await super().ascore(sample)
        STATE["scored"] += 1
        if wanted("judge", STATE["round"], STATE["scored"]):
            print(f"PAUSED {RANK}:{':'.join(PAUSE)}", flush=True)
            await asyncio.sleep(3600)  # the batch's other judgments go on (or wait at the gate)
        return score


def gate_judge(client, out: Path) -> None:
    """Route judge requests through the gate (see the module docstring): paid judgments
    (``_judge_uncached``) and, where the client has them, pre-flight probes, which are paid but
    never cached. Each probe that got its reply adds a line to OUT/probes-rank<R>."""
    counter, gate, probes = out / f"inflight-rank{RANK}", out / "GATE", out / f"probes-rank{RANK}"

    def publish():
        tmp = counter.with_name(counter.name + ".tmp")
        tmp.write_text(str(STATE["inflight"]))
        os.replace(tmp, counter)

    def gated(call, on_reply=None):
        async def wrapper(*args, **kw):
            STATE["inflight"] += 1
            publish()                      # counted first, then the gate: the test cannot miss it
            if gate.exists():
                STATE["inflight"] -= 1
                publish()
                await asyncio.sleep(3600)  # never sent
            try:
                result = await call(*args, **kw)   # a judgment returns after its cache commit
                if on_reply:
                    on_reply()
                return result
            finally:
                STATE["inflight"] -= 1
                publish()
        return wrapper

    def probe_answered():
        with open(probes, "a") as f:
            f.write("probe\n")
            f.flush()
            os.fsync(f.fileno())

    client._judge_uncached = gated(client._judge_uncached)
    if hasattr(client, "probe"):
        client.probe = gated(client.probe, probe_answered)
    publish()


def main(out: str, ckpt_path: str, judge_url: str, max_steps: int, ds_json: str) -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    judge = PausingProcessReward(JudgeConfig(base_url=judge_url, cache_path=str(out_dir / "judge.sqlite"),
                                             max_retries=2, timeout=60.0))
    gate_judge(judge.client, out_dir)
    cfg = GRPOConfig(num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=max_steps,
                     learning_rate=1e-2, max_completion_length=8, beta=0.04, output_dir=out, disable_tqdm=True,
                     seed=7, save_steps=1, save_total_limit=2, log_completions=True, num_completions_to_print=2, resume_from_checkpoint="auto",
                     deepspeed=ds_json)
    trainer = GRPOTrainer(ModelConfig(ckpt_path, freeze_vision=True), [LengthReward(), judge], args=cfg,
                          train_dataset=dataset(), processing_class=load_processor(ckpt_path))
    engine = trainer.engine
    rollout, sampler, backward, step = trainer.rollout, trainer.sampler, engine.backward, engine.step
    save_model, write_manifest, prune, load = engine.save_model, ckpt.write_manifest, ckpt._prune, ckpt.load_checkpoint
    metrics_write = grpo.metrics.MetricsLog.write

    def tracked_rollout(round_idx):
        STATE.update(round=round_idx, scored=0)
        return rollout(round_idx)

    def pausing_sampler(*args, **kw):
        comp = sampler(*args, **kw)
        if wanted("generate", STATE["round"]):
            pause()
        return comp

    def pausing_backward(loss, last=True):
        backward(loss, last)
        STATE["backward"] += 1
        if wanted("backward", trainer.step + 1, STATE["backward"]):
            pause()

    def pausing_step():
        norm = step()
        STATE["backward"] = 0
        if wanted("stepped", trainer.step + 1):
            pause()
        return norm

    def pausing_metrics(self, step_no, metrics):
        metrics_write(self, step_no, metrics)
        if wanted("metrics", step_no):
            pause()

    def pausing_save_model(folder):
        if wanted("dssave", trainer.step) and folder.parent.name == f".tmp-checkpoint-{trainer.step}":
            pause()
        save_model(folder)

    def pausing_manifest(folder):
        if wanted("manifest", trainer.step) and folder.name == f".tmp-checkpoint-{trainer.step}":
            pause()
        write_manifest(folder)

    def pausing_prune(output_dir, keep):
        if wanted("prune", trainer.step):
            pause()
        prune(output_dir, keep)

    def pausing_load(engine_, folder):
        state = load(engine_, folder)
        if wanted("resume", int(state["step"])):
            pause()
        return state

    trainer.rollout, trainer.sampler = tracked_rollout, pausing_sampler
    engine.backward, engine.step, engine.save_model = pausing_backward, pausing_step, pausing_save_model
    ckpt.write_manifest, ckpt._prune, ckpt.load_checkpoint = pausing_manifest, pausing_prune, pausing_load
    grpo.metrics.MetricsLog.write = pausing_metrics
    print(f"READY rank={RANK} pid={os.getpid()}", flush=True)
    trainer.train()
    print(f"DONE rank={RANK}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
